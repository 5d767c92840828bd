"""The GPU tier: a plan's GPU-tier neurons held on a device and computed there while the CPU
computes the rest of the layer (PowerInfer's hybrid execution, issue #16).

Layer l's GPU-tier neurons are its store positions [0, n_gpu[l]) (the store orders tiers gpu, ram,
flash). They are copied to the device once, in their stored format (`kernels.to_cuda` of the
records' views: the bytes the plan counted). Per token and layer `TieredFFN` splits the active
positions at n_gpu: `submit` hands the GPU part to this executor and returns at once, the calling
thread computes the RAM and flash part, and `join` adds the two partial outputs.

How both sides run at once in Python: the GPU side runs on this executor's one worker thread, the
CPU side on the calling thread. The CPU kernels are numba functions compiled with `nogil=True` and
torch releases the GIL inside its operators, so neither side waits for the interpreter while the
other computes. On CUDA the worker issues its copies and kernels on its own stream from pinned host
buffers (asynchronous copies), so nothing queues behind the default stream. Where the layer's
attention runs on the host, each layer moves data once each way: the input h and the GPU part's
positions packed into one host-to-device copy, the partial output y in one device-to-host copy, the
sum taken on the host. Where the plan puts the layer's attention on the GPU (`open_executor` moves it
there with its KV cache, `model.place_layers`), h is already on the device and so is the layer's
predictor: the set is chosen there, h and the CPU side's positions come out in one copy, the GPU part's
positions stay, and the CPU side's y goes in to be summed on the device, where the next layer runs.

Without a GPU the same executor runs on a second torch CPU "device" (`device="cpu"`, the
stand-in): the same thread, the same torch code (`kernels/cuda.py`), the same packing and
counting of transfers (copies between separate host buffers), so CI tests the split, the merge and
the bookkeeping on every commit.

Overlap is measured per layer: the CPU side's time (from `submit` returning to `join`), the GPU
side's (its worker, copies and synchronisation included) and the layer's wall time; the time
hidden is cpu + gpu - wall (`GPUStats.per_token`).
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from hetinfer import kernels
from hetinfer.errors import HetinferError
from hetinfer.kernels import cuda
from hetinfer.model import place_layers
from hetinfer.placement.hardware import format_size

GPU_ONLY_FIX = "re-plan without a GPU (`hetinfer prepare ... --gpu-mem 0`)"


class GPUMemoryError(HetinferError):
    """The GPU tier does not fit on the device; the message says by how much to lower --gpu-mem."""


@dataclass
class GPUStats:
    """Decode-step counters since the last reset (prompts counted apart); per-layer arrays [n_layers]."""

    gpu_s: np.ndarray  # GPU side: the worker's busy time, from picking the job up to the result on the host
    wait_s: np.ndarray  # from submit to the worker picking the job up (thread hand-off, the GIL)
    cpu_s: np.ndarray  # CPU side: the calling thread's time from submit returning to join
    wall_s: np.ndarray  # the layer's wall time from submit to the sum
    calls: int = 0  # layer calls with GPU work
    split: int = 0  # of those, with CPU work too
    neurons: int = 0  # GPU-tier neurons computed
    h2d: int = 0  # host-to-device copies and their bytes
    h2d_bytes: int = 0
    d2h: int = 0
    d2h_bytes: int = 0
    transfer_s: float = 0.0  # time the copies took (CUDA events; host copy time on the stand-in)
    prompt_s: float = 0.0  # GPU side time while prefilling

    @classmethod
    def empty(cls, n_layers: int) -> "GPUStats":
        return cls(*(np.zeros(n_layers) for _ in range(4)))

    def per_token(self, tokens: int) -> dict:
        """The GPU figures of `--verbose` and `--stats-json` for `tokens` decoded tokens."""
        t = max(tokens, 1)
        gpu, wait, cpu, wall = (float(a.sum()) for a in (self.gpu_s, self.wait_s, self.cpu_s, self.wall_s))
        hidden = min(max(0.0, gpu + cpu - wall), gpu, cpu)
        return {
            "gpu_neurons_per_token": self.neurons / t,
            "gpu_s_per_token": gpu / t,
            "gpu_wait_s_per_token": wait / t,
            "gpu_cpu_side_s_per_token": cpu / t,
            "gpu_wall_s_per_token": wall / t,
            "gpu_overlap": hidden / min(gpu, cpu) if min(gpu, cpu) > 0 else 0.0,
            "gpu_split_layers_per_token": self.split / t,
            "transfers_per_token": (self.h2d + self.d2h) / t,
            "transfer_bytes_per_token": (self.h2d_bytes + self.d2h_bytes) / t,
            "transfer_s_per_token": self.transfer_s / t,
            "gpu_layer_ms": {k: [round(1e3 * float(v) / t, 4) for v in a]
                             for k, a in (("gpu", self.gpu_s), ("cpu", self.cpu_s), ("wall", self.wall_s))},
        }


@dataclass
class GPUJob:
    """One layer's GPU part in flight (`GPUExecutor.submit`)."""

    layer: int
    future: Future
    t0: float  # when submit began
    decode: bool
    out: object  # where the sum goes: h's device (kernels.HOST for a numpy h), where the residual add that follows runs
    cpu_work: bool = True  # the CPU side has neurons of this layer too
    every: bool = False  # every GPU-tier neuron of the layer (no positions sent)
    start: float = 0.0  # set by the worker: when it picked the job up
    gpu_s: float = 0.0  # and its busy time


class GPUExecutor:
    """Layer l's store positions [0, n_gpu[l]) on `device` ("cuda", "cuda:N", or "cpu" for the
    stand-in), computed on a worker thread by `submit`/`join`."""

    def __init__(self, store, n_gpu: np.ndarray, device: str | torch.device, activation: str, dense_nbytes: int = 0,
                 attention_layers: int = 0):
        """`dense_nbytes`: device bytes of the attention, KV cache, predictors and head that will run beside the
        neurons (`attention_layers` layers' worth, moved by `open_executor`), checked with them before loading."""
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.act, self.d = activation, store.d_model
        self.n_gpu = np.asarray(n_gpu, np.int64)
        self.neuron_bytes = sum(_part_bytes(store))
        self.dense_nbytes, self.attention_layers = dense_nbytes, attention_layers
        self.stats = GPUStats.empty(len(self.n_gpu))
        check_fits(self.nbytes + dense_nbytes, self.device,
                   "the GPU tier (neurons, attention, KV cache and head)" if dense_nbytes else "the GPU tier's neurons")
        self.weights = _load(store, self.n_gpu, self.device, self.neuron_bytes)
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.is_cuda else None
        self._in = self._dev_in = self._out = None  # staging buffers, grown on demand (`_staging`)
        self._rows_at = -(-4 * self.d // 8) * 8  # byte offset of the positions after h in the packed input
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetinfer-gpu")

    @property
    def nbytes(self) -> int:
        """Device bytes of the GPU tier's neurons (what the plan counted)."""
        return int(self.n_gpu.sum()) * self.neuron_bytes

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def reset_stats(self) -> None:
        self.stats = GPUStats.empty(len(self.n_gpu))

    # -- the two calls TieredFFN makes -----------------------------------------------------------

    def submit(self, layer: int, h, positions: np.ndarray | torch.Tensor | None = None, cpu_work: bool = True) -> GPUJob:
        """Start layer `layer`'s GPU part for h [T, d]: the given positions (sorted int64, below n_gpu[layer])
        for one token, or every GPU-tier neuron (positions None, any T). h on the host is packed with the
        positions into one staging buffer, copied to the device in one transfer; h already on this device
        (the layer's attention ran there) is read in place, and only the positions are copied, unless they
        are on the device too (chosen there by the layer's predictor) or name every GPU-tier neuron."""
        t0 = time.perf_counter()
        on_device = type(h) is not np.ndarray and h.device == self.device
        out = self.device if on_device else kernels.HOST if type(h) is np.ndarray else h.device
        if not on_device:  # a copy only where the layer's attention ran on another device
            h = np.ascontiguousarray(kernels.to_device(h, kernels.HOST), np.float32)
        decode = positions is not None
        rows = positions if isinstance(positions, torch.Tensor) else None  # already on the device
        n = (len(positions) if rows is None else rows.numel()) if decode else 0
        every = n == self.n_gpu[layer]  # (sorted, distinct) positions naming every GPU-tier neuron: none sent
        send = decode and not every and rows is None
        nbytes = 4 * h.shape[0] * h.shape[1]
        lo = self._rows_at if on_device else 0  # the staged bytes: [lo, nin), h first unless on the device
        if decode:  # h padded to _rows_at, then the positions sent
            nin = self._rows_at + (8 * n if send else 0)
        else:
            nin = lo if on_device else nbytes
        self._staging(nin, nbytes)
        packed = self._in[:nin].numpy()
        if not on_device:
            packed[:nbytes] = h.reshape(-1).view(np.uint8)
        if send:
            packed[self._rows_at : nin] = np.asarray(positions, np.int64).view(np.uint8)
        job = GPUJob(layer, None, t0, decode, out, bool(cpu_work), every)
        job.future = self.pool.submit(self._run, job, lo, nin, tuple(h.shape), n, h if on_device else None,
                                      None if every else rows)
        return job

    def join(self, job: GPUJob, y_cpu: np.ndarray) -> np.ndarray:
        """y_cpu + the GPU part's output once both are done, returned on h's device: summed on this device
        where h was there (y_cpu copied in: the layer's one host-to-device copy of a result), else on the
        host; records the layer's times."""
        t1 = time.perf_counter()
        y_gpu = job.future.result()
        if job.out == self.device:
            y = y_gpu.reshape(y_cpu.shape)
            if job.cpu_work:
                c0 = time.perf_counter()
                y = y + kernels.to_device(y_cpu, self.device)
                if job.decode:  # a synchronous copy: timed here
                    self.count_copy(True, y_cpu.nbytes, time.perf_counter() - c0)
        else:
            y = kernels.to_device(kernels.to_device(y_cpu, kernels.HOST) + y_gpu.numpy().reshape(y_cpu.shape), job.out)
        t2 = time.perf_counter()
        st = self.stats
        if job.decode:
            st.gpu_s[job.layer] += job.gpu_s
            st.wait_s[job.layer] += job.start - job.t0
            st.cpu_s[job.layer] += t1 - job.t0
            st.wall_s[job.layer] += t2 - job.t0
            st.calls += 1
            st.split += job.cpu_work
        else:
            st.prompt_s += job.gpu_s
        return y

    # -- the worker ------------------------------------------------------------------------------

    def _run(self, job: GPUJob, lo: int, nin: int, shape: tuple[int, int], n: int, x, rows) -> torch.Tensor:
        """On the worker thread: copy the staged input in, compute, copy y out (unless it stays here), wait for
        the device."""
        job.start = time.perf_counter()
        if self.is_cuda:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                if x is not None:  # h (and positions chosen there) came from the default stream: wait for them
                    self.stream.wait_stream(torch.cuda.default_stream(self.device))
                y = self._compute(job, lo, nin, shape, n, x, rows)
                self.stream.synchronize()
            e = self.events
            if job.decode:
                self.stats.transfer_s += (e[0].elapsed_time(e[1]) + (e[2].elapsed_time(e[3]) if x is None else 0)) / 1e3
        else:
            y = self._compute(job, lo, nin, shape, n, x, rows)
        job.gpu_s = time.perf_counter() - job.start
        return y

    def _compute(self, job: GPUJob, lo: int, nin: int, shape: tuple[int, int], n: int, x, rows) -> torch.Tensor:
        """The GPU part; x: h on this device, or None to take it from the staged bytes (then y goes back to
        the host); rows: a decode step's positions on this device, or None to take them from the staged bytes."""
        st, e = self.stats, self.events
        T, d = shape
        c0 = self._mark(0)
        dev = self._dev_in[:nin]
        dev[lo:].copy_(self._in[lo:nin], non_blocking=True)  # the one host-to-device copy
        c1 = self._mark(1)
        if x is None:
            x = dev[: T * d * 4].view(torch.float32).view(T, d)
        Wg, Wu, Wd_t = self.weights[job.layer]
        if job.decode and not job.every:
            rows = dev[self._rows_at : nin].view(torch.int64) if rows is None else rows
            y = kernels.sparse_ffn(Wg, Wu, Wd_t, rows, x, self.act)
        else:
            y = _all_rows(Wg, Wu, Wd_t, x, self.act)
        if job.decode:
            st.neurons += n
        if job.out == self.device:  # the sum is taken here (`join`)
            if job.decode and nin > lo:
                self.count_copy(True, nin - lo, None if e else c1 - c0)
            return y
        c2 = self._mark(2)
        out = self._out[: T * d]
        out.copy_(y.reshape(-1), non_blocking=True)  # the one device-to-host copy
        c3 = self._mark(3)
        if job.decode:  # per-token figures; a prompt's transfers are its own
            self.count_copy(True, nin, None if e else c1 - c0)
            self.count_copy(False, 4 * d, None if e else c3 - c2)
        return out

    def count_copy(self, to_device: bool, nbytes: int, seconds: float | None) -> None:
        """Count one of a decode step's copies between host and device, and its time (None: CUDA events time
        it, `_run`)."""
        st = self.stats
        if to_device:
            st.h2d, st.h2d_bytes = st.h2d + 1, st.h2d_bytes + nbytes
        else:
            st.d2h, st.d2h_bytes = st.d2h + 1, st.d2h_bytes + nbytes
        st.transfer_s += seconds or 0.0

    def _mark(self, i: int) -> float:
        if self.events is not None:
            self.events[i].record(self.stream)
            return 0.0
        return time.perf_counter()

    def _staging(self, nin: int, nout: int) -> None:
        """Grow the staging buffers (host input bytes, device input bytes, host output float32) to hold
        nin / nout bytes; host buffers are pinned on CUDA so the copies are asynchronous."""
        if self._in is None or self._in.numel() < nin:
            nin = max(nin, 2 * (self._in.numel() if self._in is not None else 0), self._rows_at + 8 * int(self.n_gpu.max()))
            self._in = torch.empty(nin, dtype=torch.uint8, pin_memory=self.is_cuda)
            self._dev_in = torch.empty(nin, dtype=torch.uint8, device=self.device)
        if self._out is None or self._out.numel() * 4 < nout:
            self._out = torch.empty(max(nout // 4, 2 * (self._out.numel() if self._out is not None else 0)),
                                    dtype=torch.float32, pin_memory=self.is_cuda)


def _all_rows(Wg, Wu, Wd_t, x: torch.Tensor, act: str) -> torch.Tensor:
    """y [T, d]: every neuron's FFN term for T tokens (prompts), down rows decoded to float32 a tile at a
    time, as the CPU's prompt path multiplies them."""
    a = kernels.gate_up(Wg, Wu, x, act)  # [T, n]
    y = torch.zeros(x.shape, device=x.device)
    n, d = Wd_t.shape
    step = max(1, cuda.TILE_BYTES // (4 * d))
    for lo in range(0, n, step):
        rows = torch.arange(lo, min(lo + step, n), device=x.device)
        y += a[:, lo : lo + len(rows)] @ cuda.decode_rows(Wd_t, rows, torch.float32)
    return y


def _part_bytes(store) -> list[int]:
    """Bytes of a neuron's gate, up and down_t rows as the device holds them (the record without pad)."""
    from hetinfer.placement.cost import row_bytes

    return [row_bytes(store.d_model, q) for q in store.qtypes]


def device_free_bytes(device: torch.device) -> int:
    """Memory free on `device` now: the GPU's, or the host's for the CPU stand-in."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check_fits(nbytes: int, device: torch.device, what: str = "the GPU tier's neurons") -> None:
    """GPUMemoryError before loading when `what` (nbytes) cannot fit in what the device has free."""
    free = device_free_bytes(device)
    if nbytes > free:
        raise GPUMemoryError(f"{what} need {format_size(nbytes)} but {_name(device)} has "
                             f"{format_size(free)} free; lower --gpu-mem by at least {format_size(nbytes - free)} "
                             f"(`hetinfer prepare ... --gpu-mem SIZE`) or free the GPU's memory")


def _load(store, n_gpu: np.ndarray, device: torch.device, neuron_bytes: int) -> list:
    """Per layer (gate, up, down_t) GPUTensors of positions [0, n_gpu[l]), or None for a layer with none. The
    records are read as the RAM tier's are (`FlashReader`, O_DIRECT where the filesystem allows it), so the
    GPU tier's bytes pass through no page cache on their way: within a memory limit they would crowd out
    what RAM is for."""
    from hetinfer.offload.reader import FlashReader

    out = []
    with FlashReader(store.data_path, None) as reader:
        for layer, n in enumerate(int(n) for n in n_gpu):
            if not n:
                out.append(None)
                continue
            lay = store.layers[layer]
            records = reader.read_span(lay.offset, n * lay.record_bytes).reshape(n, lay.record_bytes)
            store.verify(layer, np.arange(n), records)
            try:
                out.append(tuple(kernels.to_cuda(W, device) for W in store.views(records)))
            except torch.cuda.OutOfMemoryError:
                left = int(n_gpu[layer:].sum()) * neuron_bytes
                raise GPUMemoryError(f"out of memory on {_name(device)} loading the GPU tier (layer {layer}'s "
                                     f"neurons, {format_size(left)} still to load); lower --gpu-mem by at least "
                                     f"{format_size(left)} (`hetinfer prepare ... --gpu-mem SIZE`)") from None
    return out


def _name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU stand-in"


# ---------------------------------------------------------------------------------------------
# choosing the device, and what a deployment records of it
# ---------------------------------------------------------------------------------------------


def resolve_device(requested: str | None, gpu_neurons: int, where: str, gpu_parts: int = 0) -> torch.device | None:
    """The device a deployment's GPU tier runs on, None when the plan puts nothing there (no GPU-tier neurons,
    and `gpu_parts`, the layers' attention and the head it puts there, 0).

    requested: --device (None: CUDA when present; "cpu": the CPU stand-in; "cuda[:N]": CUDA or an
    error). A plan with a GPU tier and no CUDA device is refused unless the stand-in is asked for."""
    if requested is not None and requested != "cpu" and not requested.startswith("cuda"):
        raise HetinferError(f"--device {requested}: use cuda, cuda:N or cpu (the CPU stand-in)")
    if requested is not None and requested.startswith("cuda") and not torch.cuda.is_available():
        raise HetinferError(f"--device {requested}: no CUDA device is visible (torch {torch.__version__}, built for "
                            f"CUDA {torch.version.cuda or 'none'}); install a CUDA build of torch on a machine with "
                            "an NVIDIA GPU, or use --device cpu")
    if not gpu_neurons and not gpu_parts:
        return None
    if requested is None:
        if not torch.cuda.is_available():
            raise HetinferError(f"{where} was planned with {gpu_neurons:,} GPU-tier neurons"
                                f"{' and attention on the GPU' if gpu_parts else ''} but this machine has no "
                                f"CUDA device; {GPU_ONLY_FIX}, or pass --device cpu to run them on the CPU stand-in")
        return torch.device("cuda")
    return torch.device(requested)


def open_executor(dep, n_gpu: np.ndarray, device: str | None) -> GPUExecutor | None:
    """The GPU side of deployment `dep` (n_gpu: GPU-tier neurons per layer) on the device --device names,
    after the checks `resolve_device` and `check_same_gpu` make; None when the plan puts nothing on a GPU.
    The layers whose attention the plan puts on the GPU move there with their norms and KV cache, and so
    does the output head where the plan says (`model.place_layers`), and their predictors run there
    (`Predictors.device_rows`, through `TieredFFN`)."""
    plan = dep.plan
    attn = plan.gpu_attention_layers
    dev = resolve_device(device, int(np.sum(n_gpu)), str(dep.path), len(attn) + plan.head_on_gpu)
    if dev is None:
        return None
    assumed = plan.manifest["hardware"].get("sources", {}).get("gpu.bytes_per_s") == "assumed"
    check_same_gpu(dep.manifest.get("gpu"), assumed, dev, str(dep.path))
    tr = dep.model.transformer
    dense = sum(getattr(tr.w.layers[i], n).nbytes for i in attn for n in ("wq", "wk", "wv", "wo"))
    dense += len(attn) * plan.manifest["model"]["kv_bytes_per_layer"] + (tr.w.output.nbytes if plan.head_on_gpu else 0)
    if dep.predictors is not None:  # copied at their first call (`Predictors.device_rows`)
        dense += sum(dep.predictors.layer_bytes(i) for i in attn)
    executor = GPUExecutor(dep.store, n_gpu, dev, dep.model.config.activation, dense, len(attn))
    try:
        place_layers(tr, dev, attn, head=plan.head_on_gpu)
    except torch.cuda.OutOfMemoryError:
        executor.close()
        raise GPUMemoryError(f"out of memory on {_name(dev)} moving {len(attn)} layers' attention and KV cache "
                             f"({format_size(dense)}) there; lower --gpu-mem by at least {format_size(dense)} "
                             "(`hetinfer prepare ... --gpu-mem SIZE`)") from None
    return executor


def gpu_identity() -> dict | None:
    """What a deployment records of the GPU it was planned on: name and total memory (None: no CUDA)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "total_bytes": int(props.total_memory)}


def check_same_gpu(planned: dict | None, assumed: bool, device: torch.device, where: str) -> None:
    """Warn (stderr) when a deployment runs on another GPU than the one it was planned on (`planned`:
    its `gpu_identity`), or was planned for a what-if GPU with assumed speeds: its split may not fit
    or be the fast one here."""
    if device.type != "cuda":
        return
    props = torch.cuda.get_device_properties(device)
    here = f"{props.name} ({format_size(props.total_memory)})"
    fix = "re-plan on this machine with `hetinfer prepare ... --gpu-mem SIZE`"
    if assumed or planned is None:
        print(f"warning: {where} was planned without a CUDA device (a what-if GPU with assumed speeds); it runs on "
              f"{here}: {fix} to place neurons by measured speeds", file=sys.stderr)
    elif planned.get("name") != props.name or planned.get("total_bytes") != props.total_memory:
        print(f"warning: {where} was planned on {planned.get('name')} ({format_size(planned.get('total_bytes', 0))}) "
              f"and runs on {here}; its GPU/CPU split may not fit or be the fast one here: {fix}", file=sys.stderr)
