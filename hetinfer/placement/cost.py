"""Bytes and expected time per token of a placement.

A neuron is one FFN row of the gate and up matrices plus the matching column of down, in the
formats the engine holds them (down is kept neuron-major, requantized to q8_0 when stored in
a block format, as `kernels.transpose_down` does). Its expected cost per token on a tier is
linear in p, how often the engine computes it (the share of tokens the predictors select it in,
or without predictors the profile's activation frequency):

    gpu    p * bytes / gpu.bytes_per_s
    ram    p * bytes / ram.bytes_per_s
    flash  p * (1-p)^k * c_l + p * bytes / ram.bytes_per_s

where k is the window (LLM in a Flash): a flash neuron active in any of the last k tokens is
still in the RAM window cache, so a token reads it from flash only if it was idle for k tokens
(activations assumed independent across tokens). c_l is what one such miss costs in layer l: the
flash store packs a layer's records back to back and the reader reads the misses of a layer in
runs, joined through gaps cheaper to read than another request, the gap's bytes counted twice
(`miss_reads`), so a miss costs more where misses are rare than where they are dense. The ILP prices
c_l at the layer's expected miss density (`expected_miss_density`); `evaluate` also prices the chosen
plan at its own (`Usage.predicted_seconds`, the plan's predicted speed). The window cache costs RAM: a flash neuron
holds (1 - (1-p)^k) * its record's bytes of it in expectation. A layer whose work runs on both GPU and CPU
(its attention on one, any of its FFN neurons on the other) pays one synchronisation. Dense
parts (attention, norms, embeddings, output head, predictors, KV cache, scratch) are placed
first: every byte of them is read every token, so no neuron byte is worth more fast memory.
Each layer also costs the engine CPU time its bytes do not account for (`hw.ram.layer_seconds`:
norms, rotary, residuals, the cost of each kernel call, slower streaming of small matrices), the
same wherever its weights live, and attention over the KV cache at the mean position of a context
filled from empty (`priced_position`): per position `hw.ram.position_seconds` on the CPU, the cache's
bytes on the GPU.
A layer's predictor (float32 W1 [r, d] and W2 [n_ff, r]) runs where its FFN input is made,
on the device of the layer's attention; it is a matrix-vector product, so it costs its bytes at
that device's rate like the other dense parts (2 FLOPs per 4 bytes: bandwidth-bound).
With a flash tier the offloading engine (`hetinfer.offload`) runs the plan: its flash I/O buffers
(`flash_io_bytes`) are RAM of the dense parts, and each layer costs `hw.ram.offload_layer_seconds`
more (its predictor call, window-cache step, read planning) plus the look-ahead's second
evaluation of the next layer's predictor; an engine that streams whole flash spans (`streams_flash`)
does none of that work, and its reads are priced as the spans; it costs `hw.ram.stream_layer_seconds` per
layer with flash neurons instead (a second kernel call, the pool's hand-back, the reads' system calls), so
its flash neurons are worth gathering into few layers.
The engine reads ahead while it computes, so a token with C seconds of compute and R of flash reads takes
C + R - overlap * min(C, R) (`overlapped`; `hw.flash.overlap`, measured by running the engine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hetinfer.config import DEFAULT_KV, ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.placement.hardware import FLASH_BLOCK, STREAM_PIECES, FlashTier, Hardware, format_size
from hetinfer.tensors import BLOCK_FORMATS, FLOAT_FORMATS, GPU_TILE_BYTES
from hetinfer.tiers import FLASH, GPU, RAM, TIERS  # noqa: F401  (re-exported: a neuron's tier code)

# The offloading engine's flash I/O buffers, RAM whenever a plan has a flash tier (`flash_io_bytes`): the
# reader's staging buffers (a token's reads and the look-ahead's) and the FFN's scratch records (prompt passes,
# tokens whose flash set overflows the window cache), which `offload.deploy.tiered_ffn` sizes to add up to
# FLASH_IO_BYTES; without a window cache (k = 0) also the two slot pools the layers share for look-ahead reads,
# FLASH_POOL_BYTES each (`offload.deploy.cache_capacity`).
FLASH_IO_BYTES = 4 << 20
FLASH_POOL_BYTES = 2 << 20
FLASH_MAX_READ = 128 << 10  # the reader's longest request; longer spans are split into pieces read in parallel


class PlacementError(HetinferError):
    """The model cannot be placed on this hardware; the message says what is missing."""


def row_bytes(n: int, qtype: str) -> int:
    """Stored bytes of n consecutive weights in `qtype`."""
    if qtype in BLOCK_FORMATS:
        block, nbytes = BLOCK_FORMATS[qtype]
        if n % block:
            raise PlacementError(f"{qtype} rows need a multiple of {block} weights, got {n}")
        return n // block * nbytes
    if qtype in FLOAT_FORMATS:
        return n * np.dtype(FLOAT_FORMATS[qtype]).itemsize
    raise PlacementError(f"unknown weight format {qtype!r}; known: {', '.join((*FLOAT_FORMATS, *BLOCK_FORMATS))}")


def neuron_down_format(stored: str) -> str:
    """Format of the engine's neuron-major down copy: float formats as stored, block formats q8_0
    (the default of hetinfer.kernels.transpose_down)."""
    return stored if stored in FLOAT_FORMATS else "q8_0"


@dataclass
class WeightFormats:
    """Stored format of each weight kind (norms and biases are always f32)."""

    ffn_gate: str
    ffn_up: str
    ffn_down: str
    attn: str
    embed: str
    head: str

    @classmethod
    def uniform(cls, qtype: str) -> "WeightFormats":
        return cls(qtype, qtype, qtype, qtype, qtype, qtype)


@dataclass
class ModelSizes:
    """Bytes of everything placement puts somewhere."""

    neuron_bytes: np.ndarray  # int64 [n_layers]: gate row + up row + down column of one neuron
    layer_bytes: np.ndarray  # int64 [n_layers]: attention, norms, biases, predictor; read every token
    predictor_bytes: np.ndarray  # int64 [n_layers]: the predictor's share of layer_bytes
    kv_bytes: int  # KV cache of one layer for the planned context, in `kv_dtype`
    embed_bytes: int
    embed_row_bytes: int  # one token's embedding lookup
    head_bytes: int  # output head + final norm (on the GPU a copy of the embeddings when tied)
    record_bytes: np.ndarray  # int64 [n_layers]: one neuron's record in the flash store (and its window-cache slot)
    scratch_bytes: int  # activations, logits and attention scores on each device that runs layers
    gpu_decode_bytes: int  # the GPU kernels' temporaries: rows decoded from the stored format, per call
    tied: bool
    n_ctx: int
    kv_dtype: str  # KV-cache element type: "f32" or "f16" (`config.KV_DTYPES`)


def model_sizes(config: ModelConfig, formats: WeightFormats, n_ctx: int,
                predictor_bytes: int | list[int] = 0, kv_dtype: str = DEFAULT_KV) -> ModelSizes:
    """Byte sizes of `config` stored in `formats`, with a KV cache of `kv_dtype` for `n_ctx` tokens.

    predictor_bytes: the activation predictor of each layer (dense, always resident), one
    number for all layers or one per layer."""
    c, f = config, formats
    d, q_dim, kv_dim = c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    neuron = row_bytes(d, f.ffn_gate) + row_bytes(d, f.ffn_up) + row_bytes(d, neuron_down_format(f.ffn_down))
    record = store_record_bytes((f.ffn_gate, f.ffn_up, neuron_down_format(f.ffn_down)), d)
    attn = (q_dim + 2 * kv_dim) * row_bytes(d, f.attn) + d * row_bytes(q_dim, f.attn)
    norms_biases = 2 * d * 4 + ((q_dim + 2 * kv_dim) * 4 if c.attn_bias else 0)
    head_format = f.embed if c.tied_embeddings else f.head
    return _sizes(c, n_ctx, predictor_bytes, np.full(c.n_layers, neuron), np.full(c.n_layers, attn + norms_biases),
                  c.vocab_size * row_bytes(d, f.embed), row_bytes(d, f.embed),
                  c.vocab_size * row_bytes(d, head_format) + d * 4, np.full(c.n_layers, record), kv_dtype)


def weight_sizes(config: ModelConfig, weights, n_ctx: int, predictor_bytes: int | list[int] = 0,
                 kv_dtype: str = DEFAULT_KV) -> ModelSizes:
    """Byte sizes of a loaded model (`hetinfer.model.Weights`), tensor by tensor as stored."""
    d = config.d_model
    neuron = [L.gate.row_bytes + L.up.row_bytes + row_bytes(d, neuron_down_format(L.down.qtype))
              for L in weights.layers]
    record = [store_record_bytes((L.gate.qtype, L.up.qtype, neuron_down_format(L.down.qtype)), d)
              for L in weights.layers]
    layer = [L.wq.nbytes + L.wk.nbytes + L.wv.nbytes + L.wo.nbytes + L.attn_norm.nbytes + L.ffn_norm.nbytes
             + sum(b.nbytes for b in (L.bq, L.bk, L.bv) if b is not None) for L in weights.layers]
    return _sizes(config, n_ctx, predictor_bytes, np.array(neuron), np.array(layer), weights.embed.nbytes,
                  weights.embed.row_bytes, weights.output.nbytes + weights.output_norm.nbytes, np.array(record),
                  kv_dtype)


def store_record_bytes(qtypes: tuple[str, str, str], d_model: int) -> int:
    """Bytes of one neuron's record in the flash store: gate row | up row | neuron-major down column, in
    `qtypes`, padded to 8 bytes (`offload.store.record_layout`, imported here because the store imports
    this module)."""
    from hetinfer.offload.store import record_layout

    return record_layout(qtypes, d_model)[1]


def _sizes(c: ModelConfig, n_ctx: int, predictor_bytes, neuron, layer, embed: int, embed_row: int,
           head: int, record, kv_dtype: str) -> ModelSizes:
    pred = np.broadcast_to(np.asarray(predictor_bytes, dtype=np.int64), (c.n_layers,)).copy()
    return ModelSizes(
        neuron_bytes=np.asarray(neuron, dtype=np.int64),
        layer_bytes=np.asarray(layer, dtype=np.int64) + pred,
        predictor_bytes=pred,
        kv_bytes=c.kv_cache_bytes(n_ctx, kv_dtype) // c.n_layers,
        embed_bytes=int(embed),
        embed_row_bytes=int(embed_row),
        head_bytes=int(head),
        record_bytes=np.asarray(record, dtype=np.int64),
        scratch_bytes=4 * (c.vocab_size + 3 * c.n_ff + 8 * c.d_model + c.n_heads * n_ctx),
        gpu_decode_bytes=gpu_decode_bytes(c),
        tied=c.tied_embeddings,
        n_ctx=n_ctx,
        kv_dtype=kv_dtype,
    )


def gpu_decode_bytes(c: ModelConfig) -> int:
    """Bound on the GPU kernels' per-call temporaries: they decode a matrix's rows in float16 tiles of at
    most `GPU_TILE_BYTES` (via float32), under five tiles' worth at once."""
    largest = c.d_model * max(c.vocab_size, c.n_ff, c.n_heads * c.head_dim)
    return 5 * min(GPU_TILE_BYTES, 2 * largest)


def predictor_sizes(predictors) -> list[int]:
    """Bytes of each layer's predictor as the engine holds it (`hetinfer.profiler.predictors.Predictors`:
    W1 and W2 at the layer's rank; the artefact's zero padding is sliced off at load)."""
    return [w1.nbytes + w2.nbytes for w1, w2 in zip(predictors.w1, predictors.w2, strict=True)]


@dataclass
class DensePlacement:
    head_on_gpu: bool
    attn_on_gpu: np.ndarray  # bool [n_layers]: attention, norms, predictor and KV cache of the layer
    gpu_bytes: int  # dense bytes on the GPU, scratch included
    ram_bytes: int
    seconds: float  # expected time per token spent on dense parts
    predictor_seconds: float  # the predictors' share of `seconds`
    fixed_seconds: float  # its share of the engine's fixed per-layer work (hw.ram.layer_seconds per layer)
    attention_seconds: float  # its share of attention over the KV cache, at `priced_position`
    io_bytes: int  # the offloading engine's flash I/O buffers (`flash_io_bytes` with a flash tier), in ram_bytes
    offload_seconds: float  # its share of the offloading engine's own per-layer work (0 without a flash tier)


def flash_io_bytes(window_tokens: int, streamed: bool = False) -> int:
    """RAM of the offloading engine's flash I/O buffers for a window cache of `window_tokens` (see FLASH_IO_BYTES);
    an engine that streams whole spans (`streams_flash`) needs only its two pools."""
    if streamed:
        return 2 * FLASH_POOL_BYTES
    return FLASH_IO_BYTES + (2 * FLASH_POOL_BYTES if window_tokens == 0 else 0)


def span_seconds(nbytes: int, flash: FlashTier) -> float:
    """Seconds to read `nbytes` contiguous bytes as the streaming engine does (`offload.stream`): in
    STREAM_PIECES equal requests at once."""
    return STREAM_PIECES * float(flash.read_seconds(int(nbytes) / STREAM_PIECES))


def spans_fit_pools(n_flash: np.ndarray, record_bytes: np.ndarray) -> bool:
    """Whether every layer's `n_flash` records of `record_bytes` fit one look-ahead pool (FLASH_POOL_BYTES),
    with a block of alignment at either end, as the streaming engine reads them."""
    span = np.asarray(n_flash, np.int64) * np.asarray(record_bytes, np.int64)
    return bool(span.max(initial=0) + 2 * FLASH_BLOCK <= FLASH_POOL_BYTES)


def streams_flash(window_tokens: int, q: float, n_flash: np.ndarray, record_bytes: np.ndarray,
                  flash: FlashTier) -> bool:
    """Whether the offloading engine reads whole flash spans ahead (`offload.stream`) instead of each token's
    predicted records: only without a window cache (k = 0), when every layer's flash records fit one of its
    look-ahead pools (FLASH_POOL_BYTES, alignment included), and when reading the spans costs no more than
    reading the expected misses (`q` per flash record and token) as `miss_reads` prices them. On an
    IOPS-bound disk the reader merges a dense set's gaps anyway, and the span needs no prediction to start."""
    n_flash, record_bytes = np.asarray(n_flash, np.int64), np.asarray(record_bytes, np.int64)
    span = n_flash * record_bytes
    if window_tokens != 0 or not span.any() or not spans_fit_pools(n_flash, record_bytes):
        return False
    on = n_flash > 0
    spans = sum(span_seconds(b, flash) for b in span[on])
    records = sum(n * q * miss_reads(q, r, flash)[0] for n, r in zip(n_flash[on], record_bytes[on]))
    return bool(spans <= records)


def _dense_ram_bytes(sizes: ModelSizes, attn_on_gpu: np.ndarray, head_in_ram: bool, io_bytes: int) -> int:
    """RAM of the dense parts: embeddings, scratch, the head unless elsewhere, the layers whose attention
    is not on the GPU (with their predictor and KV cache), and the flash I/O buffers."""
    per_layer = sizes.layer_bytes + sizes.kv_bytes
    return (sizes.embed_bytes + sizes.scratch_bytes + (sizes.head_bytes if head_in_ram else 0)
            + int(per_layer[~attn_on_gpu].sum()) + io_bytes)


def cpu_dense_ram_bytes(sizes: ModelSizes, flash: bool, window_tokens: int) -> int:
    """RAM the dense parts need without a GPU (with a flash tier: its I/O buffers for `window_tokens`)."""
    return _dense_ram_bytes(sizes, np.zeros(len(sizes.layer_bytes), bool), not sizes.tied,
                            flash_io_bytes(window_tokens) if flash else 0)


def check_dense_ram(sizes: ModelSizes, budget: int, need: int, flash: bool, gpu_bytes: int = 0,
                    gpu: bool = False) -> None:
    """PlacementError naming the minimum --ram when the dense parts (`need` bytes of RAM) exceed `budget`."""
    if need <= budget:
        return
    on_gpu = f" besides the {format_size(gpu_bytes)} the GPU holds" if gpu_bytes else ""
    io = ", flash I/O buffers" if flash else ""
    raise PlacementError(
        f"the RAM budget {format_size(budget)} is too small for the dense parts (attention, norms, "
        f"embeddings, output head, predictors, KV cache for {sizes.n_ctx} tokens, scratch{io}): they need at least "
        f"{format_size(need)} of RAM{on_gpu}; raise --ram to {format_size(need)} or more"
        + (", give the GPU more memory" if gpu else "") + " or plan a shorter --ctx")


def place_dense(sizes: ModelSizes, hw: Hardware, window_tokens: int = 5, streamed: bool = False) -> DensePlacement:
    """Output head, then layers in order, onto the GPU while they fit; everything else in RAM. With a
    flash tier, the offloading engine's I/O buffers in RAM (for a window cache of `window_tokens`, or for
    streaming whole spans) and its per-layer work (`offload_seconds`; none when `streamed`).

    Raises PlacementError naming the minimum RAM when the dense parts do not fit."""
    n = len(sizes.layer_bytes)
    per_layer = sizes.layer_bytes + sizes.kv_bytes
    attn_on_gpu = np.zeros(n, dtype=bool)
    head_on_gpu, gpu_bytes = False, 0
    reserved = sizes.scratch_bytes + sizes.gpu_decode_bytes
    if hw.gpu is not None and hw.gpu.capacity_bytes > reserved:
        free = hw.gpu.capacity_bytes - reserved
        if sizes.head_bytes <= free:
            head_on_gpu, free = True, free - sizes.head_bytes
        attn_on_gpu = np.cumsum(per_layer) <= free  # a prefix of the layers
        gpu_bytes = hw.gpu.capacity_bytes - free + int(per_layer[attn_on_gpu].sum())
    head_in_ram = not head_on_gpu and not sizes.tied  # a tied head on the CPU reads the embeddings
    io_bytes = flash_io_bytes(window_tokens, streamed) if hw.flash is not None else 0
    ram_bytes = _dense_ram_bytes(sizes, attn_on_gpu, head_in_ram, io_bytes)
    check_dense_ram(sizes, hw.ram.capacity_bytes, ram_bytes, io_bytes > 0, gpu_bytes, hw.gpu is not None)
    gpu_bw = hw.gpu.bytes_per_s if hw.gpu is not None else 1.0
    ram_bw = hw.ram.bytes_per_s
    rate = np.where(attn_on_gpu, gpu_bw, ram_bw)
    fixed = n * hw.ram.layer_seconds
    # attention over the KV cache at the mean position of a context filled from empty (`priced_position`): on the
    # CPU its measured time per position, on the GPU the cache's bytes read at the device's rate
    position = priced_position(sizes.n_ctx)
    attention = float(np.where(attn_on_gpu, sizes.kv_bytes * position / sizes.n_ctx / gpu_bw,
                               position * hw.ram.position_seconds).sum())
    # the offloading engine (CPU): per layer its own work, and layer l's input predicts layer l+1's set (look-ahead)
    offload = 0.0  # streaming does none of it: no window-cache step, read planning or look-ahead predictor
    if io_bytes and not streamed:
        offload = n * hw.ram.offload_layer_seconds + sizes.predictor_bytes[1:].sum() / ram_bw
    seconds = (sizes.head_bytes / (gpu_bw if head_on_gpu else ram_bw) + sizes.embed_row_bytes / ram_bw
               + (sizes.layer_bytes / rate).sum() + fixed + attention + offload)
    return DensePlacement(head_on_gpu, attn_on_gpu, gpu_bytes, ram_bytes, float(seconds),
                          float((sizes.predictor_bytes / rate).sum()), float(fixed), attention, io_bytes,
                          float(offload))


def priced_position(n_ctx: int) -> float:
    """The context position a token's attention is priced at: the mean over a context filled from empty to
    `n_ctx` tokens (a decode at position p attends over p cached keys and values)."""
    return n_ctx / 2


@dataclass
class Problem:
    """One placement problem: per-neuron costs on every tier and the bytes left for neurons."""

    freq: np.ndarray  # float64 [n_layers, n_ff]: probability the engine computes the neuron in a token
    sizes: ModelSizes
    hw: Hardware
    dense: DensePlacement
    window_tokens: int
    tiers: tuple[int, ...]  # tier codes present, fastest first
    seconds: np.ndarray  # float64 [3, n_layers, n_ff]: expected seconds per token per tier (inf: absent)
    window: np.ndarray  # float64 [n_layers, n_ff]: expected RAM window-cache bytes if on flash
    misses: np.ndarray  # float64 [n_layers, n_ff]: probability a token reads the neuron if on flash, p (1-p)^k (streamed: 1)
    miss_seconds: np.ndarray  # float64 [n_layers]: the ILP's price of one miss (at the expected miss density;
    # streamed: a record's share of its layer's whole span read)
    free: np.ndarray  # int64 [3]: bytes each tier has for neurons after the dense parts
    sync_s: float  # one GPU/CPU synchronisation
    min_gpu: np.ndarray  # int64 [n_layers]: GPU neurons a CPU-attention layer needs to use the GPU at all (0: any)
    streamed: bool = False  # the engine streams whole flash spans (`streams_flash`, decided before the solve)

    @property
    def read_seconds(self) -> np.ndarray:
        """float64 [n_layers, n_ff]: the flash reads' part of seconds[FLASH], as the ILP prices them."""
        return self.misses * self.miss_seconds[:, None]


def build_problem(freq: np.ndarray, config: ModelConfig, sizes: ModelSizes, hw: Hardware,
                  window_tokens: int = 5) -> Problem:
    """Place the dense parts, then price every neuron on every tier present (`freq`: probability
    [n_layers, n_ff] the engine computes each neuron in a token; `window_tokens`: k of the flash
    window cache)."""
    freq = np.asarray(freq, dtype=np.float64)
    if freq.shape != (config.n_layers, config.n_ff):
        raise PlacementError(f"profile has shape {freq.shape}, the model needs ({config.n_layers}, {config.n_ff})")
    if not np.isfinite(freq).all() or freq.min() < 0 or freq.max() > 1:
        raise PlacementError("activation frequencies must lie in [0, 1]; the profile is corrupt, re-run the profiler")
    dense = place_dense(sizes, hw, window_tokens)
    b = sizes.neuron_bytes[:, None].astype(np.float64)
    seconds = np.full((3,) + freq.shape, np.inf)
    seconds[RAM] = freq * b / hw.ram.bytes_per_s
    idle = (1.0 - freq) ** window_tokens  # not used in the last k tokens: not in the window cache
    window = (1.0 - idle) * sizes.record_bytes[:, None]
    misses = freq * idle
    miss_seconds = np.zeros(config.n_layers)
    free = np.zeros(3, dtype=np.int64)
    free[RAM] = hw.ram.capacity_bytes - dense.ram_bytes
    tiers = [RAM]
    if hw.gpu is not None and dense.gpu_bytes:  # 0: not even the scratch buffers fit, the GPU is unused
        seconds[GPU] = freq * b / hw.gpu.bytes_per_s
        free[GPU] = hw.gpu.capacity_bytes - dense.gpu_bytes
        tiers.insert(0, GPU)
    streamed = False
    if hw.flash is not None:
        density = expected_miss_density(freq, misses, sizes.neuron_bytes, free[RAM] + free[GPU])
        miss_seconds = np.array([miss_reads(q, r, hw.flash)[0] for q, r in zip(density, sizes.record_bytes)])
        # Streaming is decided before the solve, for whole layers (any plan's flash part then fits a pool), at
        # the expected miss density; it frees the records engine's buffers for neurons.
        streamed = streams_flash(window_tokens, float(density.mean()), np.full(config.n_layers, config.n_ff),
                                 sizes.record_bytes, hw.flash)
        if streamed:
            dense = place_dense(sizes, hw, window_tokens, streamed=True)
            free[RAM] = hw.ram.capacity_bytes - dense.ram_bytes
            misses = np.ones_like(freq)  # every flash record is read every token
            miss_seconds = np.array([span_seconds(config.n_ff * r, hw.flash) / config.n_ff for r in sizes.record_bytes])
        seconds[FLASH] = misses * miss_seconds[:, None] + seconds[RAM]  # read, then computed as in RAM
        free[FLASH] = hw.flash.capacity_bytes
        tiers.append(FLASH)
    sync_s = hw.sync_seconds(config.d_model) if GPU in tiers else 0.0
    # A CPU-attention layer using the GPU pays a sync; with fewer GPU neurons than min_gpu the GPU
    # saves less than that, so moving them to RAM is better -- provided RAM has room for them, which
    # is certain only when RAM could hold the whole FFN. Only then is the minimum imposed.
    min_gpu = np.zeros(config.n_layers, dtype=np.int64)
    if GPU in tiers and free[RAM] >= (sizes.neuron_bytes * config.n_ff).sum():
        gain = np.sort(seconds[RAM] - seconds[GPU], axis=1)[:, ::-1].cumsum(axis=1)
        for layer in np.flatnonzero(~dense.attn_on_gpu):
            min_gpu[layer] = np.searchsorted(gain[layer], sync_s) + 1  # n_ff + 1: never worth it
    return Problem(freq, sizes, hw, dense, window_tokens, tuple(tiers), seconds, window, misses, miss_seconds, free,
                   sync_s, min_gpu, streamed)


def expected_miss_density(freq: np.ndarray, misses: np.ndarray, neuron_bytes: np.ndarray,
                          fast_bytes: int) -> np.ndarray:
    """float64 [n_layers]: each layer's expected misses per flash record and token if the neurons that do not
    fit in `fast_bytes` were, in equal numbers per layer, each layer's coldest (at least its coldest one).
    The ILP prices a miss at this density, fixed before it knows the plan."""
    n_layers, n_ff = freq.shape
    fit = int(max(fast_bytes, 0) // max(float(neuron_bytes.mean()), 1.0))
    n_flash = int(np.clip(-(-(n_layers * n_ff - fit) // n_layers), 1, n_ff))
    coldest = np.argsort(freq, axis=1, kind="stable")[:, :n_flash]
    return np.take_along_axis(misses, coldest, axis=1).mean(axis=1)


def miss_reads(q: float, record_bytes: int, flash: FlashTier,
               max_read: int = FLASH_MAX_READ) -> tuple[float, float, float]:
    """(seconds, bytes, requests) of flash reads per missed record, for a layer whose records (`record_bytes`
    R each, packed back to back) each miss a token with probability q, independently, read as
    `offload.reader.plan_reads` plans it.

    Between two misses lie g records with probability q (1-q)^g. The reader joins two misses into one
    request when the gap is under an aligned block B (`flash.align`: their aligned spans touch) or when
    reading it pays (`FlashTier.join_pays(R + w, g R - w, R + w)`: one read of (g+2) R + w bytes, the
    g R - w it reads beyond the two counted again at the disk's best rate, costs no more than two of
    R + w), with
    w = B - gcd(R, B) the expected alignment padding of a request. So a miss opens a request with probability
    s = (1-q)^(g*+1), g* the longest joined gap; per miss the reader reads R (1 + (1-s) E[g | g <= g*]) + s w
    bytes, in requests of that over s bytes, split into pieces of at most `max_read`, each costing
    `flash.read_seconds` of its size. q -> 0: one padded record per request; q = 1: the whole span in
    `max_read` pieces."""
    size, block = int(record_bytes), flash.align
    q = min(max(float(q), 1e-12), 1.0)
    pad = block - math.gcd(size, block)
    gap = np.arange(max(1, max_read // size) + 1)  # [G] gaps in records (longer ones would exceed max_read)
    joined = (gap * size < block) | flash.join_pays(size + pad, np.maximum(gap * size - pad, 0), size + pad)
    longest = len(gap) - 1 if joined.all() else int(np.argmin(joined)) - 1  # joined[0]: adjacent records
    gap = gap[: longest + 1]
    weight = (1.0 - q) ** gap  # P(gap = g | g <= longest), unnormalised
    opens = (1.0 - q) ** (longest + 1)
    per_miss = size * (1.0 + (1.0 - opens) * float((gap * weight).sum() / weight.sum())) + opens * pad
    request = min(per_miss / opens, max_read) if opens > 0 else max_read
    return per_miss * float(flash.read_seconds(request)) / request, per_miss, per_miss / request


@dataclass
class Usage:
    seconds: float  # expected time per token, as the ILP prices it (its objective)
    predicted_seconds: float  # the same with each layer's flash reads priced at the plan's own miss density
    hidden_seconds: float  # the flash read time `predicted_seconds` counts as hidden behind compute (`overlapped`)
    used: np.ndarray  # int64 [3]: bytes per tier, dense parts and window cache included
    neuron_bytes: np.ndarray  # int64 [3]: bytes of neurons per tier
    window_bytes: int  # RAM reserved for the flash window cache
    layer_window_bytes: np.ndarray  # int64 [n_layers]: its share per layer (sums to window_bytes)
    split: np.ndarray  # bool [n_layers]: layer runs on both GPU and CPU
    misses: np.ndarray  # float64 [n_layers]: expected flash records read per token
    read_seconds: np.ndarray  # float64 [n_layers]: expected flash read time per token (predicted)
    read_bytes: np.ndarray  # float64 [n_layers]: expected bytes read per token, gaps and alignment included
    reads: np.ndarray  # float64 [n_layers]: expected read requests per token
    streamed: bool  # the engine reads whole flash spans ahead (`streams_flash`) rather than predicted records
    stream_seconds: float  # streamed: the engine's fixed work on layers with flash neurons (in `seconds`)


def evaluate(p: Problem, tiers: np.ndarray) -> Usage:
    """Expected time per token and bytes per tier of `tiers` (uint8 [n_layers, n_ff], codes as TIERS)."""
    on = [tiers == t for t in range(3)]
    count = np.stack([o.sum(axis=1) for o in on])  # [3, n_layers]
    neuron_bytes = (count * p.sizes.neuron_bytes).sum(axis=1)
    neuron_bytes[FLASH] = int((count[FLASH] * p.sizes.record_bytes).sum())
    layer_window = np.ceil(np.where(on[FLASH], p.window, 0.0).sum(axis=1)).astype(np.int64)  # each layer's, rounded up
    used = neuron_bytes.copy()
    used[GPU] += p.dense.gpu_bytes
    used[RAM] += p.dense.ram_bytes + int(layer_window.sum())
    has_gpu, has_cpu = count[GPU] > 0, (count[RAM] + count[FLASH]) > 0
    split = np.where(p.dense.attn_on_gpu, has_cpu, has_gpu) if GPU in p.tiers else np.zeros_like(has_gpu)
    seconds = p.dense.seconds + sum(float(p.seconds[t][on[t]].sum()) for t in range(3) if on[t].any())
    seconds += p.sync_s * int(split.sum())
    streamed = p.streamed and bool(count[FLASH].any())
    stream_seconds = p.hw.ram.stream_layer_seconds * int((count[FLASH] > 0).sum()) if streamed else 0.0
    seconds += stream_seconds
    read = float(p.read_seconds[on[FLASH]].sum())  # the ILP's price of the flash reads, in `seconds`
    compute = seconds - read
    misses = np.where(on[FLASH], p.misses, 0.0).sum(axis=1)
    reads = np.zeros((3, len(misses)))  # seconds, bytes, requests per layer
    for layer in np.flatnonzero(count[FLASH]):
        if streamed:
            span = int(count[FLASH, layer] * p.sizes.record_bytes[layer])
            reads[:, layer] = span_seconds(span, p.hw.flash), span, STREAM_PIECES
            continue
        per_miss = miss_reads(misses[layer] / count[FLASH, layer], p.sizes.record_bytes[layer], p.hw.flash)
        reads[:, layer] = misses[layer] * np.array(per_miss)
    overlap = p.hw.flash.overlap if p.hw.flash is not None else 0.0
    predicted = overlapped(compute, float(reads[0].sum()), overlap)
    return Usage(overlapped(compute, read, overlap), predicted, compute + float(reads[0].sum()) - predicted, used,
                 neuron_bytes, int(layer_window.sum()), layer_window, split, misses, *reads, streamed, stream_seconds)


def overlapped(compute: float, read: float, overlap: float) -> float:
    """Seconds per token of `compute` seconds of CPU work and `read` seconds of flash reads of which the engine
    hides `overlap` (`FlashTier.overlap`) of the smaller behind the other, reading ahead while it computes:
    compute + read - overlap * min(compute, read), which is (1 - overlap) (compute + read) + overlap * max(compute,
    read), so the ILP can minimise it linearly (`ilp._solve_ilp`)."""
    return compute + read - overlap * min(compute, read)


def violations(p: Problem, tiers: np.ndarray) -> list[str]:
    """Every way `tiers` breaks the rules: a tier over capacity, a hotter neuron on a slower tier
    than a colder one of its layer, a CPU-attention layer using too few GPU neurons."""
    out = []
    usage = evaluate(p, tiers)
    for t, name in enumerate(TIERS):
        if usage.used[t] and t not in p.tiers:
            out.append(f"neurons on absent tier {name}")
        elif usage.used[t] > p.hw.capacity(name):
            out.append(f"{name} over capacity: {usage.used[t]} > {p.hw.capacity(name)} bytes")
    for layer in range(tiers.shape[0]):
        order = np.lexsort((tiers[layer], -p.freq[layer]))
        if np.any(np.diff(tiers[layer][order].astype(np.int64)) < 0):
            out.append(f"layer {layer}: a hotter neuron sits on a slower tier than a colder one")
        n_gpu = int((tiers[layer] == GPU).sum())
        if 0 < n_gpu < p.min_gpu[layer]:
            out.append(f"layer {layer}: {n_gpu} GPU neurons, fewer than the {p.min_gpu[layer]} that pay for the sync")
    return out
