"""The tiered FFN: the engine's FFN hook executing a placement plan over RAM and flash.

Per token and layer the selector (the layer's predictor, a synthetic trace, or every neuron)
names the active neurons. RAM-tier neurons compute where they live; flash-tier ones come from
the layer's window cache or are read from the store. Each layer holds one buffer,
uint8 [n_resident + capacity, record_bytes]: its resident records (the store's first positions,
read once at start) followed by the window cache's slots, so a single `kernels.sparse_ffn` call
over `Store.views(buffer)` computes resident and cached neurons together, in place.

With a GPU tier (`offload/gpu.py`) the store's first positions of each layer live on the device
instead: the active set splits at n_gpu, the GPU executor computes its part on its own thread
while this one computes the RAM and flash part, and the two partial outputs are summed.

Look-ahead (Deja Vu): while layer l computes, layer l+1's predicted set, taken from layer l's
input (the residual stream changes little from one layer to the next), is already being read.
Streaming (`stream_pool_bytes`, plans without a window cache whose flash sets are dense): the
layers' whole flash spans are read ahead in decode order through `offload.stream.SpanStream`
instead, and each token's predicted set computes from the span in place.
Prompts (T > 1) compute every neuron, reading each layer's flash records once per prompt chunk.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from hetinfer import kernels
from hetinfer.offload.cache import WindowCache
from hetinfer.offload.reader import FlashReader
from hetinfer.offload.store import Store
from hetinfer.offload.stream import Span, SpanStream

if TYPE_CHECKING:  # the GPU tier imports torch: only deployments with one load it
    from hetinfer.offload.gpu import GPUExecutor

Selector = Callable[[int, np.ndarray], "np.ndarray | None"]  # (layer, h [1, d]) -> neuron ids, None: every one


@dataclass
class OffloadStats:
    """Counters since the last reset; per token they divide by `tokens`."""

    tokens: int = 0
    layer_calls: int = 0
    selected: int = 0  # neurons computed
    flash_active: int = 0  # of those, flash-tier neurons
    hits: int = 0  # flash-tier neurons found in the window cache
    misses: int = 0  # read from flash for a decode step
    ideal_flash_bytes: int = 0  # record bytes of the misses: what had to move
    predict_s: float = 0.0
    io_wait_s: float = 0.0
    compute_s: float = 0.0
    prompt_flash_bytes: int = 0  # read while prefilling (not part of the per-token figures)
    prompt_flash_reads: int = 0
    reader_bytes0: int = 0  # the reader's cumulative counters when these stats started
    reader_reads0: int = 0

    def per_token(self, reader_stats, n_ff: int) -> dict:
        """The per-token figures of `--verbose` and `--stats-json`, given the reader's counters now."""
        t = max(self.tokens, 1)
        spent = self.predict_s + self.io_wait_s + self.compute_s
        flash_bytes = reader_stats.bytes - self.reader_bytes0 - self.prompt_flash_bytes
        flash_reads = reader_stats.requests - self.reader_reads0 - self.prompt_flash_reads
        return {
            "flash_bytes_per_token": flash_bytes / t,
            "flash_reads_per_token": flash_reads / t,
            "ideal_flash_bytes_per_token": self.ideal_flash_bytes / t,
            "cache_hit_rate": self.hits / max(self.flash_active, 1),
            "ffn_density": self.selected / max(self.layer_calls * n_ff, 1),
            "io_wait_share": self.io_wait_s / spent if spent > 0 else 0.0,
            "predict_s_per_token": self.predict_s / t,
            "io_wait_s_per_token": self.io_wait_s / t,
            "compute_s_per_token": self.compute_s / t,
        }


@dataclass
class _Layer:
    buf: np.ndarray  # uint8 [n_resident (+ capacity), record_bytes]: resident records, then (own) slots
    views: tuple  # (gate, up, down_t) QTensors over buf
    slots: np.ndarray  # uint8 [capacity, record_bytes]: the window cache's slots (a view into buf, or a shared pool)
    slot_views: tuple | None  # views over `slots` when they are not part of buf (a second kernel call)
    cache: WindowCache
    n_resident: int  # records [first, first + n_resident) of the store's layer live in RAM
    flash_base: int  # byte offset of the first flash position in the records file
    n_flash: int
    position: np.ndarray  # int64 [n_ff]: neuron id -> store position
    first: int = 0  # positions below it are the GPU tier's (GPUExecutor)
    prefetch: Future | None = None
    prefetched: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # flash ids being read


class TieredFFN:
    """An engine FFN `(layer, h) -> y` over a store whose first `resident[l]` records of each layer
    are held in RAM and the rest are read from flash through a window cache of `capacity[l]` records.
    With `gpu`, the first `gpu.n_gpu[l]` records are the GPU tier's and the RAM ones follow them.

    `select(layer, h)`: neuron ids to compute (sorted int64), or None for every neuron. `scratch_bytes`:
    the buffer of records read for one call beyond the cache (overflow, prompts), processed in passes (a
    prompt's passes are that many records wherever they live).
    `stream_pool_bytes` (window 0 only): stream every layer's flash span through two pools of that
    many bytes instead of reading predicted sets into the window cache's slots.
    `device_select(layer, h)`: `select` for an h on the GPU (a layer whose attention runs there: the
    predictors' `device_rows`), ids left there, so the GPU part's positions never leave the device."""

    def __init__(self, store: Store, reader: FlashReader, select: Selector, resident: np.ndarray,
                 capacity: np.ndarray, window: int, activation: str, scratch_bytes: int, lookahead: bool = True,
                 gpu: GPUExecutor | None = None, stream_pool_bytes: int = 0, device_select=None):
        if stream_pool_bytes and window:
            raise ValueError("streaming whole spans replaces the window cache: it needs window 0")
        if stream_pool_bytes:
            capacity = np.zeros_like(np.asarray(capacity))
        self.store, self.reader, self.select, self.act, self.gpu = store, reader, select, activation, gpu
        self.device_select = device_select
        self._device_positions: dict[int, object] = {}  # layer -> its `position` on the GPU (`_choose_on_device`)
        self.window, self.lookahead = window, lookahead
        self.n_ff = len(store.layers[0].order)
        self.dense_bytes: dict[str, int] = {}  # set by whoever builds the session (deploy.open_session)
        self.token = -1
        rb = max(L.record_bytes for L in store.layers)
        self.pass_rows = max(1, scratch_bytes // rb)  # records per prompt pass, however they are held
        self.scratch = np.empty((0 if stream_pool_bytes else self.pass_rows, rb), np.uint8)  # streaming: the pools
        # With window 0 no record outlives its token, so layers of one parity share a slot pool: layer l
        # computes from its pool while layer l+1's look-ahead reads fill the other.
        shared = window == 0
        rows = int(np.max(capacity, initial=0)) if shared else 0
        self.pools = [np.empty((rows, rb), np.uint8) for _ in range(2 if shared else 0)]
        self.layers: list[_Layer] = []
        for i, L in enumerate(store.layers):
            first = 0 if gpu is None else int(gpu.n_gpu[i])
            n_res, cap = int(resident[i]), int(capacity[i])
            n_flash = self.n_ff - first - n_res
            buf = np.empty((n_res + (0 if shared else cap), L.record_bytes), np.uint8)
            if n_res:  # straight into place through the reader: no page cache, no second copy at start-up
                rows = np.arange(n_res, dtype=np.int64)
                reader.read_into(L.offset + first * L.record_bytes, L.record_bytes, rows, buf, rows)
                store.verify(i, first + rows, buf)
            slots = self.pools[i % 2][:cap, : L.record_bytes] if shared else buf[n_res:]
            self.layers.append(_Layer(buf, store.views(buf), slots, store.views(slots) if shared else None,
                                      WindowCache(n_flash, cap, window, slots), n_res,
                                      L.offset + (first + n_res) * L.record_bytes, n_flash, L.position, first))
        spans = {i: Span(s.flash_base, s.n_flash, s.buf.shape[1]) for i, s in enumerate(self.layers) if s.n_flash}
        self.stream = SpanStream(reader, spans, 2, stream_pool_bytes) if stream_pool_bytes else None
        if self.stream is not None:
            reader.release_staging()  # the RAM tier's start-up reads were the last staged ones
        self.reset_stats()  # the RAM tier's reads above are start-up, not any token's

    # -- bytes, for memory accounting and /health ------------------------------------------------

    def resident_bytes(self) -> int:
        """RAM this FFN holds: resident records, cache slots and the scratch buffer."""
        return (sum(s.buf.nbytes for s in self.layers) + sum(p.nbytes for p in self.pools) + self.scratch.nbytes
                + (self.stream.nbytes if self.stream else 0))

    def placement_summary(self) -> dict:
        """Bytes per tier and the share of this run's FFN activations each served (the server's /health);
        `dense_bytes` names the parts that stay in RAM besides the FFN (attention, embeddings, KV cache)."""
        st, dense = self.stats, self.dense_bytes
        rb = [s.buf.shape[1] for s in self.layers]
        ram = {"ffn_resident": sum(s.n_resident * r for s, r in zip(self.layers, rb)),
               "window_cache": sum((s.buf.shape[0] - s.n_resident) * r for s, r in zip(self.layers, rb))
               + sum(p.nbytes for p in self.pools) + (self.stream.nbytes if self.stream else 0),
               "scratch": self.scratch.nbytes, **dense}
        flash = {"ffn_flash": sum(s.n_flash * r for s, r in zip(self.layers, rb))}
        active = max(st.selected, 1)
        on_gpu = 0 if self.gpu is None else self.gpu.stats.neurons
        gpu = {} if self.gpu is None else {"ffn_gpu": self.gpu.nbytes, "dense_gpu": self.gpu.dense_nbytes}
        tiers = {"gpu": {"bytes": sum(gpu.values()), "activation_share": on_gpu / active, "components": gpu},
                 "ram": {"bytes": sum(ram.values()), "activation_share": (st.selected - st.misses - on_gpu) / active,
                         "components": ram},
                 "flash": {"bytes": sum(flash.values()), "activation_share": st.misses / active, "components": flash}}
        return {"engine": "offloaded", "tiers": tiers, "cache_hit_rate": st.hits / max(st.flash_active, 1),
                **self.report()}

    # -- the hook --------------------------------------------------------------------------------

    def __call__(self, layer: int, h: np.ndarray) -> np.ndarray:
        """The layer's FFN output for h [T, d], on h's device. Where the layer's attention ran on a device
        (the plan's GPU layers, `model.place_layers`), the CPU side computes from one host copy of h, the GPU
        side reads h where it is (and with `device_select` the set is chosen there: `_choose_on_device`), and
        the sum is taken there (`GPUExecutor.join`)."""
        decode = h.shape[0] == 1
        if decode and layer == 0:
            self.token += 1
            self.stats.tokens += 1
        if type(h) is np.ndarray:
            return self._decode(layer, h, h) if decode else self._prompt(layer, h, h)
        t0 = time.perf_counter()
        if decode and self.device_select is not None and self.layers[layer].first:
            host, chosen = self._choose_on_device(layer, h)
        else:
            chosen, host = None, kernels.to_device(h, kernels.HOST)  # the CPU side's copy (synchronous: timed here)
            if decode:
                self.gpu.count_copy(False, host.nbytes, time.perf_counter() - t0)
        y = self._prompt(layer, host, h) if not decode else self._decode(layer, host, h, chosen, t0)
        if type(y) is np.ndarray:  # no GPU part in this layer: the CPU side's y goes back to the device
            t0 = time.perf_counter()
            y = kernels.to_device(y, h.device)
            if decode:
                self.gpu.count_copy(True, y.nbytes, time.perf_counter() - t0)
        return y

    def _choose_on_device(self, layer: int, h) -> tuple[np.ndarray, tuple]:
        """For h [1, d] on the GPU: the layer's set chosen there (`device_select`), split at the GPU tier; h and
        the CPU side's positions come to the host in one copy, the GPU part's stay. Returns (h on the host,
        (GPU positions on the device, CPU-side positions on the host, relative to the GPU tier's end))."""
        torch = sys.modules["torch"]  # h is a tensor
        s = self.layers[layer]
        if layer not in self._device_positions:
            self._device_positions[layer] = torch.from_numpy(s.position).to(h.device)
        pos = self._device_positions[layer][self.device_select(layer, h)].sort().values
        g = pos < s.first
        t0 = time.perf_counter()
        out = torch.cat((h.reshape(-1).view(torch.uint8), (pos[~g] - s.first).view(torch.uint8))).cpu().numpy()
        self.gpu.count_copy(False, out.nbytes, time.perf_counter() - t0)
        nh = 4 * h.shape[1]
        return out[:nh].view(np.float32).reshape(1, -1), (pos[g], out[nh:].view(np.int64))

    def _decode(self, layer: int, h: np.ndarray, h_gpu, chosen: tuple | None = None, t0: float | None = None
                ) -> np.ndarray:
        """One token: h [1, d] on the host; h_gpu the same h for the GPU side (h, or where it was computed);
        `chosen` the set `_choose_on_device` chose there, since `t0`."""
        s = self.layers[layer]
        t0 = time.perf_counter() if t0 is None else t0
        ids = self.select(layer, h) if chosen is None else None
        t1 = time.perf_counter()
        if self.lookahead and self.stream is None and layer + 1 < len(self.layers):
            self._prefetch(layer + 1, h)
        t2 = time.perf_counter()
        job = None
        if chosen is not None:  # the GPU part's positions are on the device already
            gpu_pos, pos = chosen
            n_selected = gpu_pos.numel() + len(pos)
            if gpu_pos.numel():
                job = self.gpu.submit(layer, h_gpu, gpu_pos, cpu_work=len(pos) > 0)
        else:
            pos = np.arange(self.n_ff, dtype=np.int64) if ids is None else np.sort(s.position[ids])
            n_selected = len(pos)
            if s.first:  # the GPU tier's part starts first and runs beside the rest
                g = np.searchsorted(pos, s.first)
                job = self.gpu.submit(layer, h_gpu, pos[:g], cpu_work=g < len(pos)) if g else None
                pos = pos[g:] - s.first
        split = np.searchsorted(pos, s.n_resident)
        flash = pos[split:] - s.n_resident  # flash-local ids, sorted
        if s.n_flash == 0:  # every neuron this side computes is resident: no cache to consult
            t3 = time.perf_counter()
            y = kernels.sparse_ffn(*s.views, pos, h, self.act)
            return self._done(layer, job, y, n_selected, 0, 0, t0, t1, t2, t3)
        if self.stream is not None:
            return self._streamed(layer, job, pos[:split], flash, h, n_selected, t0, t1, t2)
        if s.prefetch is not None:  # the look-ahead reads land in slots this step may count as hits
            w0 = time.perf_counter()
            s.prefetch.result()
            self.stats.io_wait_s += time.perf_counter() - w0
            s.prefetch = None
            self.store.verify(layer, s.first + s.n_resident + s.prefetched, s.slots, s.cache.slot_of(s.prefetched))
        # neurons the look-ahead read for this token came from flash too, though the cache now holds them
        fetched = int(np.count_nonzero(np.isin(s.prefetched, flash, assume_unique=True)))
        s.prefetched = s.prefetched[:0]
        step = s.cache.step(flash, self.token)
        fit = step.miss_slots >= 0
        if fit.any():
            self._read(layer, step.miss_ids[fit], s.slots, step.miss_slots[fit])
        slot_rows = np.concatenate((step.hit_slots, step.miss_slots[fit]))
        t3 = time.perf_counter()
        if s.slot_views is None:  # resident records and slots in one buffer: one call
            y = kernels.sparse_ffn(*s.views, np.concatenate((pos[:split], s.n_resident + slot_rows)), h, self.act)
        else:
            y = kernels.sparse_ffn(*s.views, pos[:split], h, self.act)
            if len(slot_rows):
                y += kernels.sparse_ffn(*s.slot_views, slot_rows, h, self.act)
        if not fit.all():  # a token whose flash set exceeds the cache: the rest from scratch, in passes
            y = y + self._from_flash(layer, step.miss_ids[~fit], h)
        return self._done(layer, job, y, n_selected, len(flash), len(step.miss_ids) + fetched, t0, t1, t2, t3)

    def _done(self, layer: int, job, y: np.ndarray, n_selected: int, n_flash: int, missed: int,
              t0: float, t1: float, t2: float, t3: float) -> np.ndarray:
        """y with the GPU tier's part added (if one ran), after counting the step: `n_flash` flash-tier
        neurons computed, `missed` of them read from flash for it; t0..t3 as __call__ took them."""
        if job is not None:
            y = self.gpu.join(job, y)
        t4 = time.perf_counter()
        st = self.stats
        st.layer_calls += 1
        st.selected += n_selected
        st.flash_active += n_flash
        st.misses += missed
        st.hits += n_flash - missed
        st.ideal_flash_bytes += missed * self.layers[layer].buf.shape[1]
        st.predict_s += t2 - t0
        st.compute_s += t4 - t3
        return y

    def _streamed(self, layer: int, job, resident: np.ndarray, flash: np.ndarray, h: np.ndarray,
                  n_selected: int, t0: float, t1: float, t2: float) -> np.ndarray:
        """The step of a streamed layer: resident rows in place, flash ones from the layer's span."""
        s = self.layers[layer]
        w0 = time.perf_counter()
        span = self.stream.get(layer)  # uint8 [n_flash, record_bytes]
        self.stats.io_wait_s += time.perf_counter() - w0
        self.store.verify(layer, s.first + s.n_resident + flash, span, flash)
        t3 = time.perf_counter()
        y = kernels.sparse_ffn(*self.store.views(span), flash, h, self.act)
        if len(resident):
            y += kernels.sparse_ffn(*s.views, resident, h, self.act)
        self.stream.release(layer)
        return self._done(layer, job, y, n_selected, len(flash), len(flash), t0, t1, t2, t3)

    def _prefetch(self, layer: int, h: np.ndarray) -> None:
        """Start reading `layer`'s predicted flash records that its cache lacks (look-ahead)."""
        s = self.layers[layer]
        if s.n_flash == 0 or s.cache.capacity == 0:
            return
        ids = self.select(layer, h)
        if ids is None:
            flash = np.arange(s.n_flash, dtype=np.int64)
        else:
            pos = np.sort(s.position[ids]) - s.first
            flash = pos[np.searchsorted(pos, s.n_resident):] - s.n_resident
        slots = s.cache.admit(flash, self.token)  # present ones are kept for this token; -1: no read needed or no room
        ok = slots >= 0
        if ok.any():
            s.prefetched = flash[ok]
            s.prefetch = self.reader.submit(s.flash_base, s.buf.shape[1], s.prefetched, s.slots, slots[ok])

    def _read(self, layer: int, flash_ids: np.ndarray, dst: np.ndarray, dst_rows: np.ndarray) -> None:
        s = self.layers[layer]
        before = self.reader.stats.wait_s
        self.reader.read_into(s.flash_base, s.buf.shape[1], flash_ids, dst, dst_rows)
        self.stats.io_wait_s += self.reader.stats.wait_s - before
        self.store.verify(layer, s.first + s.n_resident + flash_ids, dst, dst_rows)

    def _from_flash(self, layer: int, flash_ids: np.ndarray, h: np.ndarray) -> np.ndarray:
        """sum over `flash_ids` of their FFN terms, read into the scratch buffer a pass at a time."""
        s, n = self.layers[layer], len(self.scratch)
        rb = s.buf.shape[1]
        y = np.zeros(h.shape[-1], np.float32)
        for lo in range(0, len(flash_ids), n):
            part = flash_ids[lo : lo + n]
            rows = np.arange(len(part), dtype=np.int64)
            buf = self.scratch[: len(part), :rb]
            self._read(layer, part, buf, rows)
            y += kernels.sparse_ffn(*self.store.views(buf), rows, h, self.act).reshape(-1)
        return y[None]

    def _prompt(self, layer: int, h: np.ndarray, h_gpu) -> np.ndarray:
        """Every neuron for T tokens: resident records in place, flash records streamed once, in passes of the
        same size whichever tier holds them (a layer all in RAM and the same layer all on flash sum in the same
        order, so their logits agree exactly). h [T, d] on the host, h_gpu as in `_decode`."""
        s, n = self.layers[layer], self.pass_rows
        rb, st, r = s.buf.shape[1], self.stats, self.reader.stats
        job = self.gpu.submit(layer, h_gpu) if s.first else None  # every GPU-tier neuron, beside the rest
        y = np.zeros(h.shape, np.float32)
        for lo in range(0, s.n_resident, n):  # in passes of the flash part's size
            y += kernels.prompt_ffn(*self.store.views(s.buf[lo : min(lo + n, s.n_resident)]), h, self.act)
        if self.stream is not None and s.n_flash:  # the span the stream reads for decode holds them all
            span = self.stream.get(layer)
            self.stream.tuner.untimed()  # a prompt's pass is not a decode token's
            self.store.verify(layer, s.first + s.n_resident + np.arange(s.n_flash), span)
            for lo in range(0, s.n_flash, n):
                y += kernels.prompt_ffn(*self.store.views(span[lo : lo + n]), h, self.act)
            self.stream.release(layer)
            return y if job is None else self.gpu.join(job, y)
        for lo in range(0, s.n_flash, n):
            part = np.arange(lo, min(lo + n, s.n_flash), dtype=np.int64)
            buf = self.scratch[: len(part), :rb]
            b0, q0 = r.bytes, r.requests
            self.reader.read_into(s.flash_base, rb, part, buf, np.arange(len(part), dtype=np.int64))
            st.prompt_flash_bytes += r.bytes - b0
            st.prompt_flash_reads += r.requests - q0
            self.store.verify(layer, s.first + s.n_resident + part, buf)
            y += kernels.prompt_ffn(*self.store.views(buf), h, self.act)
        return y if job is None else self.gpu.join(job, y)

    def close(self) -> None:
        """Stop the threads this FFN started (the span stream's readers, the GPU tier's, the reader's) and
        close the store's file; idempotent. The FFN cannot compute afterwards."""
        if self.stream is not None:
            self.stream.close()
        if self.gpu is not None:
            self.gpu.close()
        self.reader.close()

    def reset_stats(self) -> None:
        r = self.reader.stats
        self.stats = OffloadStats(reader_bytes0=r.bytes, reader_reads0=r.requests)
        if self.gpu is not None:
            self.gpu.reset_stats()

    def report(self) -> dict:
        """Per-token figures since the last reset (see OffloadStats.per_token and GPUStats.per_token), and how flash
        records are read: `flash_reads`, `spans` (streamed whole, `offload.stream`; `span_pieces`: the requests
        each span is read in now) or `records` (predicted sets), and `flash_io`, how the reader issues record reads
        (`FlashReader.method` and `.io`: "o_direct, uring", ...)."""
        out = {**self.stats.per_token(self.reader.stats, self.n_ff), "flash_reads": "spans" if self.stream else "records",
               "flash_io": f"{self.reader.method}, {self.reader.io}"}
        if self.stream is not None:
            out["span_pieces"] = self.stream.tuner.pieces
        if self.gpu is None:
            return out
        return {**out, **self.gpu.stats.per_token(self.stats.tokens), "gpu_attention_layers": self.gpu.attention_layers}

