"""Measure this machine: `detect` builds a `Hardware` from probes of the kernels and the disk.

The CPU and GPU probes time `hetinfer.kernels.sparse_ffn` on random weights (and, for the
per-layer costs, random layers of the planned model's shape, through the engine and through the
offloading engine); the FFN probe (`measure_ffn_costs`) times the dense, sparse and threshold FFN
kernels and a predictor's call on layers of a model's shape, which decides where the sparse modes
step aside to the dense kernel; the flash probe reads a scratch file with O_DIRECT at several read
sizes and depths. Each result is cached as JSON under ~/.cache/hetinfer/, keyed by what it depends
on (host, format, width, threads, the kernels' source), so planning again on the same machine
costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil

from hetinfer import heap
from hetinfer.atomic import atomic_write_json, remove_stale, temp_path
from hetinfer.placement.hardware import (ASSUMED_GPU, FLASH_BLOCK, FlashTier, GpuTier, Hardware, HardwareError,
                                         RamTier, format_size, source_keys)
from hetinfer.tensors import FORMATS, QTensor, quantize

PROBE_VERSION = 1
PROBE_FILE = "hetinfer-probe"  # the flash probe's scratch file, beside the flash tier's data
PROBE_DENSITIES = (0.1, 0.3, 1.0)  # shares of neurons the compute probes run sparse_ffn over


def _torch():
    """torch, imported for the GPU probes only: a CPU probe runs the engine's numpy path."""
    import torch

    return torch


def _randn(*shape: int) -> np.ndarray:
    """A probe's input activations: float32 normal samples, as the engine passes them."""
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def detect(gpu_mem: int | None = None, ram: int | None = None, flash_dir: str | None = None,
           base: Hardware | None = None, qtype: str = "q4_0", d_model: int = 4096, config=None,
           attn_qtype: str | None = None, model=None) -> Hardware:
    """This machine (or `base`, a loaded description) with the budget flags applied.

    gpu_mem: bytes of GPU memory to use (0 disables the GPU; given without a CUDA device it adds
    a GPU with assumed speeds, for what-if planning). ram: bytes of RAM to use. flash_dir: a
    directory on the disk to serve flash neurons from; its free space is the capacity and its
    read speed is probed once per device and cached, and measured here (not with `base`), the
    offloading engine's per-layer work (`measure_offload_layer_seconds`, `measure_stream_layer_seconds`) and,
    with `config`, how much of its reads it hides behind compute (`measure_flash_overlap`).
    qtype, d_model: the FFN weight format and width the kernel probes run (cached per format and width);
    config, attn_qtype: the model whose layer shape the per-layer probes run (`measure_cpu_layer_seconds`,
    `measure_flash_overlap`), when known; model: the loaded model itself, on whose own layers and head the
    CPU's per-layer and per-position times are measured instead (`_real_layer_probe`), when given.
    """
    if base is None:
        rate = measure_cpu_bytes_per_s(qtype, d_model)
        layer = _cpu_layer_costs(config, attn_qtype or qtype, qtype, rate, None, model)
        if layer["layer_seconds"] == 0:  # its layers ran faster than their bytes at the cached rate: the machine
            rate = measure_cpu_bytes_per_s(qtype, d_model, fresh=True)  # has sped up since; probe both again
            layer = _cpu_layer_costs(config, attn_qtype or qtype, qtype, rate, None, model)
        hw = Hardware(ram=RamTier(psutil.virtual_memory().available, rate, layer["layer_seconds"],
                                  position_seconds=layer["position_seconds"]))
        hw.sources.update({"ram.capacity_bytes": "measured", "ram.bytes_per_s": "measured",
                           "ram.layer_seconds": "measured", "ram.position_seconds": "measured"})
        if _torch().cuda.is_available():
            hw.gpu = measure_gpu(qtype, d_model)
            hw.sources.update({k: "measured" for k in source_keys(hw) if k.startswith("gpu.")})
    else:
        hw = Hardware(ram=base.ram, gpu=base.gpu, flash=base.flash, sources=dict(base.sources))
    if ram is not None:
        hw.ram = replace(hw.ram, capacity_bytes=ram)
        hw.sources["ram.capacity_bytes"] = "flag"
    if gpu_mem is not None:
        if gpu_mem == 0:
            hw.gpu = None
            hw.sources = {k: v for k, v in hw.sources.items() if not k.startswith("gpu.")}
        elif hw.gpu is None:
            hw.gpu = GpuTier(gpu_mem, **ASSUMED_GPU)
            hw.sources.update({k: "assumed" for k in source_keys(hw) if k.startswith("gpu.")})
            hw.sources["gpu.capacity_bytes"] = "flag"
        else:
            if base is None and gpu_mem > hw.gpu.capacity_bytes:  # measured here: capacity is what is free now
                raise HardwareError(f"--gpu-mem {format_size(gpu_mem)} is more than the {format_size(hw.gpu.capacity_bytes)}"
                                    f" free on {_torch().cuda.get_device_name()}; lower --gpu-mem to at most "
                                    f"{format_size(hw.gpu.capacity_bytes)}, or free the GPU's memory")
            hw.gpu = GpuTier(gpu_mem, hw.gpu.bytes_per_s, hw.gpu.h2d_bytes_per_s, hw.gpu.sync_latency_s)
            hw.sources["gpu.capacity_bytes"] = "flag"
    if flash_dir is not None:
        hw.flash = flash_tier(flash_dir)
        hw.sources.update({"flash.capacity_bytes": "measured", "flash.bytes_per_s": "measured"})
        if base is None:
            n_ff = config.n_ff if config else 1536
            hw.ram.offload_layer_seconds = measure_offload_layer_seconds(n_ff)
            hw.ram.stream_layer_seconds = measure_stream_layer_seconds(n_ff)
            hw.sources.update({"ram.offload_layer_seconds": "measured", "ram.stream_layer_seconds": "measured"})
        if base is None and config is not None:
            hw.flash.overlap = measure_flash_overlap(hw.flash, config, attn_qtype or qtype, qtype)
            hw.sources["flash.overlap"] = "measured"
        elif base is not None and base.flash is not None:  # the described machine's
            hw.flash.overlap = base.flash.overlap
        else:  # no model shape to run, or a described machine without flash: reads add to compute
            hw.sources["flash.overlap"] = "assumed"
    return hw


def measure_cpu_bytes_per_s(qtype: str = "q4_0", d_model: int = 4096, cache_dir: Path | None = None,
                            fresh: bool = False) -> float:
    """Neuron bytes per second `hetinfer.kernels.sparse_ffn` streams on the CPU for weights in `qtype`
    with rows of `d_model`; probed once per (format, width, threads, host) and cached (`fresh`: probed
    again, and the cache replaced)."""
    from hetinfer import kernels

    key = {"device": "cpu", "host": platform.node(), "qtype": qtype, "d_model": d_model,
           "threads": kernels.max_threads(), "kernels": _source_hash(kernels.cpu, kernels.simd)}

    def probe() -> dict:
        kernels.warmup()
        weights = _probe_weights(qtype, d_model, 64 << 20)
        return _sparse_ffn_rates(*weights, _randn(1, d_model), lambda: None, sum(W.row_bytes for W in weights))

    return _cached_probe(f"cpu-probe-{qtype}-{d_model}", key, probe, cache_dir, fresh)["bytes_per_s"]


# A probe of a model's own layer shape streams about this many weight bytes per token, so that each token
# finds the layers as a real model does, mostly evicted from the caches since the last token (measured on
# SmolLM2's shape here: 64 MiB gave 50 us per layer, 256 MiB 86 us, the real model 104 us at the same
# positions); a model whose one layer is larger than this is probed on the tiny model instead.
LAYER_PROBE_BYTES = 256 << 20
LAYER_PROBE_POSITIONS = 512  # the per-layer probe's long context: decode steps after a prompt this long
LAYER_PROBE_STEPS, LAYER_PROBE_RUNS = 32, 5  # its runs of decode steps at each context, timed by their median
LAYER_PROBE_CONTEXT = LAYER_PROBE_POSITIONS + LAYER_PROBE_RUNS * LAYER_PROBE_STEPS + 2  # its KV caches


def measure_cpu_layer_seconds(config=None, attn_qtype: str = "q8_0", ffn_qtype: str = "q8_0",
                              bytes_per_s: float | None = None, cache_dir: Path | None = None) -> float:
    """The engine's CPU time per layer and token that reading the layer's bytes at `bytes_per_s` does
    not account for, at an empty context: norms, rotary, residuals, each kernel call, and the slower
    streaming of small matrices. Timed on one-token decode steps through `Transformer.forward`, the FFN
    one `sparse_ffn` call per layer over half the neurons as in the sparse engines. With `config` (and
    the weight formats) the layers are random ones of that model's shape, enough of them to stream
    LAYER_PROBE_BYTES per token, and their bytes at `bytes_per_s` are subtracted; without it, or when
    one such layer alone is larger, a tiny random model (8 layers of width 64, every kernel call on
    all threads), whose bytes take no measurable time. Probed once per (host, threads, kernel and
    model source, shape) and cached; the median of five runs, as the machine usually is rather than
    at its fastest."""
    return _cpu_layer_costs(config, attn_qtype, ffn_qtype, bytes_per_s, cache_dir)["layer_seconds"]


def _cpu_layer_costs(config, attn_qtype: str, ffn_qtype: str, bytes_per_s: float | None,
                     cache_dir: Path | None, model=None) -> dict:
    """The per-layer probe's result: on `model` itself (a loaded `hetinfer.loader.Model`) when given and
    its first layer fits LAYER_PROBE_BYTES, else on random layers of `config`'s shape, else on the tiny model."""
    from hetinfer import kernels
    from hetinfer import model as model_source

    key = {"device": "cpu", "host": platform.node(), "threads": kernels.max_threads(),
           "kernels": _source_hash(kernels.cpu, kernels.simd), "model": _source_hash(model_source),
           "positions": LAYER_PROBE_POSITIONS}
    n_real = _real_layers(model) if model is not None and bytes_per_s else 0
    if n_real:
        key.update(fingerprint=model.fingerprint, layers=n_real, bytes_per_s=float(f"{bytes_per_s:.3g}"))
        return _cached_probe(f"cpu-layer-probe-{model.fingerprint[:12]}", key,
                             lambda: _real_layer_probe(model, n_real, bytes_per_s), cache_dir)
    shape = None
    if config is not None and bytes_per_s and sum(_layer_bytes(config, attn_qtype, ffn_qtype)) <= LAYER_PROBE_BYTES:
        shape = [config.d_model, config.n_ff, config.n_heads, config.n_kv_heads, config.head_dim, attn_qtype, ffn_qtype]
        key.update(shape=shape, bytes_per_s=float(f"{bytes_per_s:.3g}"), streamed=LAYER_PROBE_BYTES)
    name = "cpu-layer-probe" + ("-" + hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:8] if shape else "")
    return _cached_probe(name, key, lambda: _layer_probe(shape, bytes_per_s), cache_dir)


def _real_layers(model) -> int:
    """How many of `model`'s first layers the per-layer probe runs: as many as hold LAYER_PROBE_BYTES."""
    from hetinfer.placement.cost import weight_sizes

    sizes = weight_sizes(model.config, model.weights, n_ctx=1)
    per_layer = sizes.layer_bytes + model.config.n_ff * sizes.neuron_bytes
    return int(np.searchsorted(np.cumsum(per_layer), LAYER_PROBE_BYTES, side="right"))


def _layer_bytes(config, attn_qtype: str, ffn_qtype: str) -> tuple[int, int]:
    """(one layer's bytes read every token: attention, norms; of all its FFN neurons), as the cost model
    (`model_sizes`) counts them."""
    from hetinfer.placement.cost import WeightFormats, model_sizes

    sizes = model_sizes(config, WeightFormats(ffn_qtype, ffn_qtype, ffn_qtype, attn_qtype, "q8_0", "q8_0"), n_ctx=1)
    return int(sizes.layer_bytes[0]), config.n_ff * int(sizes.neuron_bytes[0])


def _layer_probe(shape: list | None, bytes_per_s: float | None) -> dict:
    from hetinfer.config import ModelConfig
    from hetinfer.model import Transformer

    rng = np.random.default_rng(0)
    d, n_ff, H, KV, hd, attn, ffn_q = shape or [64, 128, 2, 1, 32, "q8_0", "q8_0"]
    cfg = ModelConfig(arch="llama", n_layers=1, d_model=d, n_ff=n_ff, n_heads=H, n_kv_heads=KV, head_dim=hd,
                      vocab_size=64, context_length=LAYER_PROBE_CONTEXT, tied_embeddings=True)
    dense_bytes, ffn_bytes = _layer_bytes(cfg, attn, ffn_q)
    cfg.n_layers = 8 if shape is None else int(np.clip(LAYER_PROBE_BYTES // (dense_bytes + ffn_bytes), 2, 256))
    tr = Transformer(cfg, _random_weights(rng, cfg, attn, ffn_q))
    # the tiny model: every kernel call on all threads, as on real weights; its bytes take no measurable time
    per_layer, position = _time_layers(tr, all_threads=shape is None)
    if shape is not None:  # what reading the layer at the probed rate leaves
        per_layer -= (dense_bytes + ffn_bytes / 2) / bytes_per_s
    return {"layer_seconds": max(0.0, per_layer), "position_seconds": position, "layers": cfg.n_layers}


def _real_layer_probe(model, n: int, bytes_per_s: float) -> dict:
    """The per-layer probe on the model's own first `n` layers (`_real_layers`) and its output head, less
    their bytes and the head's at `bytes_per_s`: what the model's decode costs beyond its bytes."""
    from hetinfer.model import Transformer, Weights
    from hetinfer.placement.cost import weight_sizes

    w = model.weights
    cfg = replace(model.config, n_layers=n, context_length=LAYER_PROBE_CONTEXT)
    tr = Transformer(cfg, Weights(w.embed, w.output_norm, w.output, w.layers[:n], w.rope_freqs))
    per_layer, position = _time_layers(tr)
    sizes = weight_sizes(model.config, w, n_ctx=1)
    read = (sizes.layer_bytes[:n] + model.config.n_ff // 2 * sizes.neuron_bytes[:n]).sum() + sizes.head_bytes
    return {"layer_seconds": max(0.0, float(per_layer - read / bytes_per_s / n)), "position_seconds": position,
            "layers": n}


def _time_layers(tr, all_threads: bool = False) -> tuple[float, float]:
    """(seconds per layer and decode step at an empty context, seconds each position of the KV cache adds per
    layer) of `tr`, its FFN one `sparse_ffn` call per layer over every other neuron as in the sparse engines:
    medians of LAYER_PROBE_RUNS runs of LAYER_PROBE_STEPS steps, at an empty context and after a prompt of
    LAYER_PROBE_POSITIONS."""
    from hetinfer import kernels
    from hetinfer.generate import PREFILL_CHUNK

    cfg, layers = tr.cfg, tr.w.layers
    down_t = [kernels.transpose_down(L.down) for L in layers]
    active = np.arange(0, cfg.n_ff, 2)

    def ffn(i: int, h: np.ndarray) -> np.ndarray:
        return kernels.sparse_ffn(layers[i].gate, layers[i].up, down_t[i], active, h, cfg.activation)

    def decode(cache) -> tuple[float, float]:
        """(seconds per step, mean position attended over) of LAYER_PROBE_STEPS decode steps."""
        first, steps = cache.pos, LAYER_PROBE_STEPS
        t = time.perf_counter()
        for s in range(steps):
            tr.forward([s % cfg.vocab_size], cache, ffn)
        return (time.perf_counter() - t) / steps, first + (steps - 1) / 2

    kernels.warmup()
    saved = kernels.MIN_BYTES_PER_THREAD
    if all_threads:
        kernels.MIN_BYTES_PER_THREAD = 1
    try:
        far = LAYER_PROBE_POSITIONS
        prompt = [i % cfg.vocab_size for i in range(far)]
        long = tr.new_cache(LAYER_PROBE_CONTEXT)  # its runs follow one another, each after the one before
        for s in range(0, far, PREFILL_CHUNK):
            tr.forward(prompt[s : s + PREFILL_CHUNK], long)
        near_runs, far_runs = [], []
        for _ in range(LAYER_PROBE_RUNS):
            cache = tr.new_cache(LAYER_PROBE_CONTEXT)
            tr.forward([1], cache, ffn)
            near_runs.append(decode(cache))
            far_runs.append(decode(long))
    finally:
        kernels.MIN_BYTES_PER_THREAD = saved
    (near, near_pos), (far_s, far_pos) = (np.median(np.array(r), axis=0) for r in (near_runs, far_runs))
    position = max(0.0, (far_s - near) / (far_pos - near_pos) / cfg.n_layers)
    return float(near / cfg.n_layers - near_pos * position), float(position)


def _random_weights(rng: np.random.Generator, cfg, attn: str, ffn: str):
    """`hetinfer.model.Weights` of `cfg`'s shape: random attention in `attn`, FFN in `ffn`, unit norms, and a
    q8_0 embedding that is also the (tied) output head."""
    from hetinfer.model import LayerWeights, Weights

    d, H, KV, hd, n_ff = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_ff

    def w(rows: int, cols: int, qtype: str) -> QTensor:
        return _tiled_matrix(rng, rows, cols, qtype)

    one = np.ones(d, np.float32)
    layers = [LayerWeights(one, w(H * hd, d, attn), w(KV * hd, d, attn), w(KV * hd, d, attn),
                           w(d, H * hd, attn), one, w(n_ff, d, ffn), w(n_ff, d, ffn), w(d, n_ff, ffn))
              for _ in range(cfg.n_layers)]
    embed = w(cfg.vocab_size, d, "q8_0")
    return Weights(embed, one, embed, layers)


def _tiled_matrix(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> QTensor:
    """A random [rows, cols] matrix in `qtype`: 64 random rows tiled (real bytes, quick to make), read-only
    as a model file's mapped weights are, so that the dense kernels read it as they read those (packed)."""
    small = quantize(rng.standard_normal((min(rows, 64), cols), dtype=np.float32) * 0.1, qtype)
    data = np.tile(small.data, (-(-rows // 64), 1))[:rows]
    data.flags.writeable = False
    return QTensor(qtype, (rows, cols), data)


def measure_offload_layer_seconds(n_ff: int = 1536, cache_dir: Path | None = None) -> float:
    """CPU time per layer and token the offloading engine (`offload.ffn.TieredFFN`, as `offload.deploy`
    builds it) spends beyond one `sparse_ffn` call over the same rows: its predictor calls (the layer's
    and the look-ahead's), turning ids into store positions, the window-cache step, planning, issuing
    and gathering reads, and the look-ahead. Timed on random layers with `n_ff` neurons (the planned
    model's) of width 64, so the bytes computed and read take no measurable time (the cost model prices
    them apart), half of each layer's records resident and half read through the page cache into a window
    cache that holds them all, active sets from `offload.trace`. Probed once per (host, threads, engine and
    kernel source, n_ff) and cached."""
    return _offload_costs(n_ff, cache_dir)["offload_layer_seconds"]


def measure_stream_layer_seconds(n_ff: int = 1536, cache_dir: Path | None = None) -> float:
    """CPU time per streamed layer and token (a layer with flash neurons, in a plan that streams whole flash
    spans, `offload.stream`) beyond one `sparse_ffn` call over all its rows: the second kernel call over the
    pool, handing the pool back and queueing its reads, the reading threads' wake-ups and system calls.
    Timed as `measure_offload_layer_seconds` is, every neuron computed, half of each layer's records streamed
    through the page cache; probed with it and cached with it."""
    return _offload_costs(n_ff, cache_dir)["stream_layer_seconds"]


def _offload_costs(n_ff: int, cache_dir: Path | None) -> dict:
    from hetinfer import kernels
    from hetinfer.offload import cache, ffn, reader, store, stream

    key = {"device": "cpu", "host": platform.node(), "threads": kernels.max_threads(), "n_ff": n_ff,
           "source": _source_hash(kernels.cpu, kernels.simd, ffn, cache, reader, store, stream)}
    return _cached_probe(f"offload-layer-probe-{n_ff}", key, lambda: _offload_probe(n_ff), cache_dir)


def _offload_probe(n_ff: int, n_layers: int = 8, steps: int = 32, rounds: int = 3) -> dict:
    from hetinfer import kernels
    from hetinfer.config import ModelConfig
    from hetinfer.loader import Model
    from hetinfer.model import LayerWeights, Weights
    from hetinfer.offload.deploy import tiered_ffn
    from hetinfer.offload.store import build_store
    from hetinfer.offload.trace import Trace, TraceConfig
    from hetinfer.placement.cost import FLASH_POOL_BYTES
    from hetinfer.profiler.predictors import Predictors
    from hetinfer.tiers import FLASH, RAM

    rng = np.random.default_rng(0)
    d = 64
    cfg = ModelConfig(arch="llama", n_layers=n_layers, d_model=d, n_ff=n_ff, n_heads=2, n_kv_heads=1, head_dim=32,
                      vocab_size=64, context_length=64)
    attn = _tiled_matrix(rng, d, d, "q8_0")
    one = np.ones(d, np.float32)
    layers = [LayerWeights(one, attn, attn, attn, attn, one, _tiled_matrix(rng, n_ff, d, "q8_0"),
                           _tiled_matrix(rng, n_ff, d, "q8_0"), _tiled_matrix(rng, d, n_ff, "q8_0"))
              for _ in range(n_layers)]
    model = Model("offload-probe", cfg, Weights(attn, one, attn, layers), None, None, {}, "offload-probe")
    down_t = [kernels.transpose_down(L.down) for L in layers]
    predictors = Predictors({}, [rng.standard_normal((1, d), dtype=np.float32)] * n_layers,
                            [rng.standard_normal((n_ff, 1), dtype=np.float32)] * n_layers,
                            np.zeros(n_layers, np.float32))  # rank 1: the calls without their bytes
    trace = Trace(TraceConfig(n_layers, n_ff, density=0.5, hot_share=0.3))
    sets = [[trace.active(layer, t) for layer in range(n_layers)] for t in range((2 + rounds) * steps)]
    h = _randn(1, d)
    resident = np.full(n_layers, n_ff // 2)
    tiers = np.where(np.arange(n_ff) < n_ff // 2, RAM, FLASH).astype(np.uint8)[None].repeat(n_layers, axis=0)

    def plain(layer: int, token: int) -> None:
        kernels.sparse_ffn(layers[layer].gate, layers[layer].up, down_t[layer], sets[token][layer], h, cfg.activation)

    def run(hook, first: int, tokens: int) -> float:
        t = time.perf_counter()
        for token in range(first, first + tokens):
            for layer in range(n_layers):
                hook(layer, token)
        return time.perf_counter() - t

    kernels.warmup()
    saved = kernels.MIN_BYTES_PER_THREAD
    kernels.MIN_BYTES_PER_THREAD = 1  # all threads, as on real weights
    every = np.arange(n_ff)

    def plain_every(layer: int, token: int) -> None:
        kernels.sparse_ffn(layers[layer].gate, layers[layer].up, down_t[layer], every, h, cfg.activation)

    with tempfile.TemporaryDirectory(prefix="hetinfer-offload-probe-") as tmp:
        records = build_store(model, Path(tmp) / "store", tiers, progress=False)
        engine = tiered_ffn(records, None, lambda layer, x: (predictors.rows(layer, x), sets[engine.token][layer])[1],
                            resident, n_ff - resident, 5, cfg.activation, direct=False)  # page cache: no disk time
        streamed = tiered_ffn(records, None, lambda layer, x: None, resident, np.zeros(n_layers, np.int64), 0,
                              cfg.activation, direct=False, stream_pool_bytes=FLASH_POOL_BYTES)
        try:
            run(lambda layer, token: engine(layer, h), 0, 2 * steps)  # warm: records verified, cache filled
            run(lambda layer, token: streamed(layer, h), 0, 2 * steps)  # and the stream's piece count chosen
            run(plain, 0, steps)
            timed = [(run(lambda layer, token: engine(layer, h), first, steps), run(plain, first, steps),
                      run(lambda layer, token: streamed(layer, h), first, steps), run(plain_every, first, steps))
                     for first in range(2 * steps, (2 + rounds) * steps, steps)]
        finally:
            streamed.stream.close()
            for e in (engine, streamed):
                e.reader.close()
            kernels.MIN_BYTES_PER_THREAD = saved
    tiered, base, stream, every_base = (min(t) / (steps * n_layers) for t in zip(*timed))
    return {"offload_layer_seconds": max(0.0, tiered - base), "tiered_seconds": tiered, "plain_seconds": base,
            "stream_layer_seconds": max(0.0, stream - every_base), "streamed_seconds": stream,
            "plain_every_seconds": every_base, "layers": n_layers}


# The overlap probe's layers hold at most about this many bytes of weights in RAM (and half of them on flash).
OVERLAP_PROBE_BYTES = 128 << 20
OVERLAP_PROBE_DIR = "hetinfer-overlap-probe"  # its scratch store, beside the flash tier's data (`atomic.temp_path`)


def measure_flash_overlap(flash: FlashTier, config, attn_qtype: str, ffn_qtype: str,
                          cache_dir: Path | None = None) -> float:
    """`FlashTier.overlap`: the share of the smaller of a token's compute and flash-read time that the offloading
    engine hides by reading ahead, measured by running it. Random layers of the planned model's shape, and its
    output head (a token's last and longest step, while the stream reads the next token's first spans), decode
    tokens through `Transformer.forward`, every other layer's FFN streamed from a store in `flash.dir` with
    O_DIRECT (`offload.stream`), the others computed in RAM: timed together (T), with reads that return at once
    (C: the compute, the stream's own CPU work included, no disk), and the stream's reads alone (R);
    overlap = (C + R - T) / min(C, R), from the medians of interleaved runs, clipped to [0, 1]. What
    the engine cannot hide (the CPU time reads take from compute on a small machine, layers waiting on a read
    the look-ahead started too late) is what it measures. Probed once per (host, device, threads, engine and
    kernel source, shape) and cached."""
    from hetinfer import kernels, model
    from hetinfer.offload import cache, ffn, reader, store, stream

    shape = [config.d_model, config.n_ff, config.n_heads, config.n_kv_heads, config.head_dim, config.n_layers,
             config.vocab_size, attn_qtype, ffn_qtype]
    key = {"device": "cpu", "host": platform.node(), "threads": kernels.max_threads(),
           "disk": os.stat(flash.dir).st_dev, "shape": shape, "bytes": OVERLAP_PROBE_BYTES,
           "source": _source_hash(kernels.cpu, kernels.simd, model, ffn, cache, reader, store, stream)}
    name = "flash-overlap-probe-" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]
    return _cached_probe(name, key, lambda: _overlap_probe(flash, shape), cache_dir)["overlap"]


def _overlap_probe(flash: FlashTier, shape: list, steps: int = 32, rounds: int = 7) -> dict:
    from hetinfer import kernels
    from hetinfer.config import ModelConfig
    from hetinfer.loader import Model
    from hetinfer.model import Transformer
    from hetinfer.offload.deploy import tiered_ffn
    from hetinfer.offload.store import build_store
    from hetinfer.placement.cost import FLASH_POOL_BYTES, store_record_bytes
    from hetinfer.tensors import BLOCK_FORMATS
    from hetinfer.tiers import FLASH, RAM

    d, n_ff, H, KV, hd, n_layers, vocab, attn, ffn_q = shape
    down_q = ffn_q if ffn_q not in BLOCK_FORMATS else "q8_0"
    record = store_record_bytes((ffn_q, ffn_q, down_q), d)
    # a streamed layer's span fits a pool, as in the plans that stream; block formats need whole blocks of neurons
    n_ff = min(n_ff, (FLASH_POOL_BYTES - 2 * FLASH_BLOCK) // record) // 32 * 32
    if n_ff == 0:  # no plan streams records this large
        return {"overlap": 0.0, "layers": 0, "n_ff": 0}
    cfg = ModelConfig(arch="llama", n_layers=2, d_model=d, n_ff=n_ff, n_heads=H, n_kv_heads=KV, head_dim=hd,
                      vocab_size=vocab, context_length=steps + 1, tied_embeddings=True)
    dense_bytes, ffn_bytes = _layer_bytes(cfg, attn, ffn_q)
    cfg.n_layers = int(np.clip(min(n_layers, OVERLAP_PROBE_BYTES // (dense_bytes + ffn_bytes)), 2, None)) // 2 * 2
    weights = _random_weights(np.random.default_rng(0), cfg, attn, ffn_q)
    tr = Transformer(cfg, weights)
    streamed = np.arange(cfg.n_layers) % 2 == 1
    tiers = np.where(streamed[:, None], FLASH, RAM).astype(np.uint8).repeat(n_ff, axis=1)
    resident = np.where(streamed, 0, n_ff)
    kernels.warmup()
    scratch = temp_path(Path(flash.dir) / OVERLAP_PROBE_DIR)  # removed after, or by the next probe if killed
    scratch.mkdir()
    try:
        records = build_store(Model("overlap-probe", cfg, weights, None, None, {}, "overlap-probe"),
                              scratch / "store", tiers, progress=False)
        both, compute, reads = (tiered_ffn(records, flash, lambda layer, x: None, resident,
                                           np.zeros(cfg.n_layers, np.int64), 0, cfg.activation, direct=None,
                                           stream_pool_bytes=FLASH_POOL_BYTES) for _ in range(3))
        compute.reader.read_span_into = lambda *args, **kwargs: None  # its pools are "read" at once: no disk time

        def decode(engine) -> float:
            kv = tr.new_cache()
            tr.forward([1], kv, engine)
            t = time.perf_counter()
            for s in range(steps):
                tr.forward([s % cfg.vocab_size], kv, engine)
            return time.perf_counter() - t

        def read_only(engine) -> float:
            t = time.perf_counter()
            for _ in range(steps):
                for layer in np.flatnonzero(streamed):
                    engine.stream.get(layer)
                    engine.stream.release(layer)
            return time.perf_counter() - t

        try:
            decode(both), decode(compute), read_only(reads)  # warm: records verified, piece counts chosen
            timed = [(decode(both), decode(compute), read_only(reads)) for _ in range(rounds)]
        finally:
            for engine in (both, compute, reads):
                engine.stream.close()
                engine.reader.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    t, c, r = (statistics.median(x) / steps for x in zip(*timed))
    return {"overlap": float(np.clip((c + r - t) / min(c, r), 0.0, 1.0)), "both_seconds": t, "compute_seconds": c,
            "read_seconds": r, "layers": cfg.n_layers, "n_ff": n_ff}


def measure_gpu(qtype: str = "q4_0", d_model: int = 4096, cache_dir: Path | None = None,
                seconds: float = 0.3) -> GpuTier:
    """Free GPU memory, the rate of hetinfer.kernels' CUDA `sparse_ffn` (cached like the CPU probe),
    pinned host-to-device bandwidth and one round trip."""
    from hetinfer import kernels

    torch = _torch()
    free, _ = torch.cuda.mem_get_info()
    # "weights": the GPU kernels' weight layout; probes of the earlier dense f16 copies lack it and re-probe
    key = {"device": torch.cuda.get_device_name(), "host": platform.node(), "qtype": qtype, "d_model": d_model,
           "weights": "stored", "kernels": _source_hash(kernels.cuda)}

    def probe() -> dict:
        weights = _probe_weights(qtype, d_model, 128 << 20)
        Wg, Wu, Wd = (kernels.to_cuda(W) for W in weights)
        return _sparse_ffn_rates(Wg, Wu, Wd, torch.randn(1, d_model, device="cuda"), torch.cuda.synchronize,
                                 sum(W.row_bytes for W in weights))

    gemv = _cached_probe(f"gpu-probe-{qtype}-{d_model}", key, probe, cache_dir)["bytes_per_s"]
    host = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    h2d = host.numel() / _best_seconds(lambda: (dev.copy_(host, non_blocking=True), torch.cuda.synchronize()), seconds)
    small = torch.zeros(4096, pin_memory=True)
    trips = []
    for _ in range(50):
        t = time.perf_counter()
        small.to("cuda", non_blocking=True).cpu()
        trips.append(time.perf_counter() - t)
    return GpuTier(int(free), gemv, h2d, statistics.median(trips))


# The FFN probe times one-token calls on layers of the model's shape, enough of them to stream about this
# many bytes per round, so that each call finds its layer evicted from the caches, as decode does.
FFN_PROBE_BYTES = 64 << 20
FFN_PROBE_DENSITIES = (0.25, 0.5, 0.75, 1.0)  # shares of neurons the sparse FFN probes compute
FFN_PROBE_RANKS = (16, 64)  # predictor ranks the probe times
# Rounds of the FFN probe, best of: with too few, one slow reading of the dense call moved the crossover enough
# that layers slower than dense stopped stepping aside (BENCHMARKS.md). Part of the cache key.
FFN_PROBE_ROUNDS = 15


@dataclass(frozen=True)
class FFNCosts:
    """Seconds of one token's FFN call on a layer of a model's shape on this machine (`measure_ffn_costs`):
    the dense kernel, the sparse ones at each probed share of neurons, a predictor's at each probed rank."""

    dense_s: float  # kernels.dense_ffn
    densities: tuple[float, ...]
    sparse_s: tuple[float, ...]  # kernels.sparse_ffn over that share of the neurons
    threshold_s: tuple[float, ...]  # kernels.threshold_ffn keeping that share
    ranks: tuple[int, ...]
    predict_s: tuple[float, ...]  # kernels.predict_rows at that rank (a call of its own: predictor mode's
    # predicted_ffn runs it inside the sparse FFN's call, so the sum errs a few microseconds towards dense)

    def crossover(self, path: str, extra_s: float = 0.0) -> float:
        """The share of neurons up to which `path` ("sparse" or "threshold"), plus `extra_s` per call, is
        faster than the dense kernel: where the least-squares line through its probed times meets the
        dense time, within [0, 1]."""
        if path not in ("sparse", "threshold"):
            raise ValueError(f"path must be sparse or threshold, got {path!r}")
        slope, at_zero = np.polyfit(self.densities, self.sparse_s if path == "sparse" else self.threshold_s, 1)
        budget = self.dense_s - extra_s - at_zero
        if slope <= 0:
            return 1.0 if budget > 0 else 0.0
        return float(np.clip(budget / slope, 0.0, 1.0))

    def predict_seconds(self, rank: int) -> float:
        """A predictor call's seconds at `rank`, on the line through the probed ranks."""
        slope, at_zero = np.polyfit(self.ranks, self.predict_s, 1)
        return max(0.0, float(at_zero + slope * rank))


def measure_ffn_costs(n_ff: int, d_model: int, qtype: str, down_qtype: str, down_t_qtype: str, act: str,
                      cache_dir: Path | None = None) -> FFNCosts:
    """One-token FFN seconds of the kernels on this machine for a layer of `n_ff` neurons of width `d_model`,
    gate and up stored as `qtype`, the down projection as `down_qtype` and its neuron-major copy as
    `down_t_qtype`: what decides whether a sparse FFN mode beats the dense kernel. Probed once per (host,
    threads, kernel source, shape) and cached."""
    from hetinfer import kernels

    shape = [n_ff, d_model, qtype, down_qtype, down_t_qtype, act]
    key = {"device": "cpu", "host": platform.node(), "threads": kernels.max_threads(),
           "kernels": _source_hash(kernels.cpu, kernels.simd), "shape": shape, "rounds": FFN_PROBE_ROUNDS}
    name = "cpu-ffn-probe-" + hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:8]
    d = _cached_probe(name, key, lambda: _ffn_probe(*shape), cache_dir)
    return FFNCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _ffn_probe(n_ff: int, d: int, qtype: str, down_qtype: str, down_t_qtype: str, act: str,
               rounds: int = FFN_PROBE_ROUNDS) -> dict:
    """Best seconds of each probed call over `rounds` interleaved rounds, each call once on every layer per
    round: a stretch of interference from other processes slows every kind of call alike, and the
    quiet rounds count."""
    from hetinfer import kernels

    rng = np.random.default_rng(0)

    def layer() -> tuple[QTensor, QTensor, QTensor, QTensor]:
        """Gate, up, down and neuron-major down of one random layer."""
        return (_tiled_matrix(rng, n_ff, d, qtype), _tiled_matrix(rng, n_ff, d, qtype),
                _tiled_matrix(rng, d, n_ff, down_qtype), _tiled_matrix(rng, n_ff, d, down_t_qtype))

    first = layer()
    n_layers = int(np.clip(FFN_PROBE_BYTES // sum(W.nbytes for W in first), 2, 64))
    gate, up, down, down_t = zip(first, *(layer() for _ in range(n_layers - 1)))
    x = _randn(1, d)
    kernels.warmup()

    def keeping(i: int, k: int) -> float:
        """A threshold on |act(g) * u| that keeps k of layer i's neurons."""
        h = np.sort(np.abs(kernels.gate_up(gate[i], up[i], x, act)[0]))
        return float(h[n_ff - k - 1]) if k < n_ff else -1.0

    calls = {"dense": lambda i: kernels.dense_ffn(gate[i], up[i], down[i], x, act)}
    for density in FFN_PROBE_DENSITIES:
        k = round(density * n_ff)
        rows = [np.sort(rng.choice(n_ff, k, replace=False)) for _ in range(n_layers)]
        thr = [keeping(i, k) for i in range(n_layers)]
        calls[("sparse", density)] = lambda i, r=rows: kernels.sparse_ffn(gate[i], up[i], down_t[i], r[i], x, act)
        calls[("threshold", density)] = lambda i, t=thr: kernels.threshold_ffn(gate[i], up[i], down_t[i], x, act, t[i])
    for rank in FFN_PROBE_RANKS:
        w1 = [quantize(rng.standard_normal((rank, d), dtype=np.float32), "f32") for _ in range(n_layers)]
        w2_t = [quantize(rng.standard_normal((rank, n_ff), dtype=np.float32), "f32") for _ in range(n_layers)]
        calls[("predict", rank)] = lambda i, a=w1, b=w2_t: kernels.predict_rows(a[i], b[i], x, 0.0)
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(n_layers):  # each call on the layer read least recently
                t = time.perf_counter()
                call(i)
                best[name] = min(best[name], time.perf_counter() - t)
    return {"dense_s": best["dense"], "densities": list(FFN_PROBE_DENSITIES),
            "sparse_s": [best[("sparse", p)] for p in FFN_PROBE_DENSITIES],
            "threshold_s": [best[("threshold", p)] for p in FFN_PROBE_DENSITIES],
            "ranks": list(FFN_PROBE_RANKS), "predict_s": [best[("predict", r)] for r in FFN_PROBE_RANKS]}


def _probe_weights(qtype: str, d_model: int, nbytes: int) -> tuple[QTensor, QTensor, QTensor]:
    """Gate, up and neuron-major down [n, d_model] in the formats the engine holds them (down as
    `kernels.transpose_down` makes it), about `nbytes` in all (past the caches): 64 quantized random
    rows, tiled."""
    from hetinfer.placement.cost import neuron_down_format

    if qtype not in FORMATS:
        raise HardwareError(f"cannot probe weight format {qtype!r}; known: {', '.join(FORMATS)}")
    rng = np.random.default_rng(0)
    small = [quantize(rng.standard_normal((64, d_model)).astype(np.float32), q)
             for q in (qtype, qtype, neuron_down_format(qtype))]
    reps = max(1, nbytes // sum(W.nbytes for W in small))
    return tuple(QTensor(W.qtype, (64 * reps, d_model), np.tile(W.data, (reps, 1))) for W in small)


def _sparse_ffn_rates(Wg, Wu, Wd, x, sync, per_neuron: int, seconds: float = 0.15) -> dict:
    """Stored neuron bytes per second of `kernels.sparse_ffn` over random ascending row sets at each
    of PROBE_DENSITIES (best of repeated calls: brief interference from other processes does not
    count), and over all of them: total bytes / total time."""
    from hetinfer import kernels

    n = Wg.shape[0]
    rng = np.random.default_rng(0)
    rates, total_bytes, total_s = [], 0, 0.0
    for density in PROBE_DENSITIES:
        rows = np.sort(rng.choice(n, max(1, round(density * n)), replace=False))
        if isinstance(Wg, kernels.GPUTensor):  # row ids on the device before timing
            rows = _torch().from_numpy(rows).to(Wg.device)
        best = _best_seconds(lambda r=rows: (kernels.sparse_ffn(Wg, Wu, Wd, r, x, "silu"), sync()), seconds)
        rates.append(len(rows) * per_neuron / best)
        total_bytes, total_s = total_bytes + len(rows) * per_neuron, total_s + best
    return {"bytes_per_s": total_bytes / total_s, "densities": list(PROBE_DENSITIES), "rates": rates}


def _best_seconds(fn, seconds: float) -> float:
    fn()  # warm up
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ----------------------------------------------------------------------------------- flash probe


FLASH_PROBE_PASSES = 3  # passes over the flash probe's grid; each cell is their median


def flash_tier(flash_dir: str, cache_dir: Path | None = None) -> FlashTier:
    """Capacity (free space) of `flash_dir` and its read curve, probed once per device and cached."""
    d = Path(flash_dir)
    if not d.is_dir():
        raise HardwareError(
            f"--flash-dir {flash_dir}: not a directory; create it on the disk that should hold flash neurons")
    remove_stale(d, PROBE_FILE)  # a probe killed mid-way leaves its file, and a cached curve runs no new probe
    curve = _cached_probe(f"flash-probe-{os.stat(d).st_dev:x}", {"fields": "align", "passes": FLASH_PROBE_PASSES},
                          lambda: probe_flash(d), cache_dir)
    return FlashTier(capacity_bytes=shutil.disk_usage(d).free, dir=str(d.resolve()), **curve)


def _source_hash(*modules) -> str:
    """A short hash of the kernel modules' source: a kernel probe cached before the kernels changed is stale."""
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetinfer"


def _cached_probe(name: str, key: dict | None, probe, cache_dir: Path | None, fresh: bool = False) -> dict:
    """`probe()`'s result, cached in `name`.json; re-probed when `fresh`, or when the file is absent,
    unreadable, from another probe version or measured for another `key` (host, format, threads, ...)."""
    path = (cache_dir or _cache_dir()) / f"{name}.json"
    try:
        d = None if fresh else json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        d = None
    if isinstance(d, dict) and d.pop("version", None) == PROBE_VERSION and d.pop("key", None) == key:
        return d
    from hetinfer import kernels

    with kernels.every_thread():
        d = probe()
    heap.trim()  # the probe's arrays are gone; give their pages back before the caller's next step
    atomic_write_json(path, {"version": PROBE_VERSION, "key": key, **d}, indent=None)
    return d


def probe_flash(directory: Path, file_bytes: int = 128 << 20, cell_seconds: float = 0.15,
                read_sizes: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576),
                concurrency: tuple[int, ...] = (1, 4, 16, 32), passes: int = FLASH_PROBE_PASSES) -> dict:
    """Random-read throughput of a temp file in `directory` per read size and reads in flight.

    Reads bypass the page cache with O_DIRECT into page-aligned (mmap) buffers; where O_DIRECT is
    refused (tmpfs, some network filesystems) the cached pages are dropped with
    posix_fadvise(DONTNEED) before every read instead. Each cell is the median of `passes` passes over
    the whole grid (~20 cells x `cell_seconds` each): the curve is cached for the device and every plan
    made on it reads from it, so a few seconds when the disk was busy or throttled must not become it.
    `align` is `read_alignment`'s.
    """
    path = temp_path(Path(directory) / PROBE_FILE)  # found and removed later (flash_tier) if this one is killed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = 1 << 20
        file_bytes = max(file_bytes // chunk, 2) * chunk
        with os.fdopen(fd, "wb") as f:
            for _ in range(file_bytes // chunk):
                f.write(os.urandom(chunk))
            f.flush()
            os.fsync(f.fileno())
        method, rfd = open_uncached(path)
        try:
            runs = [[[_read_rate(rfd, method, file_bytes, size, c, cell_seconds) for c in concurrency]
                     for size in read_sizes] for _ in range(passes)]
            table = np.median(np.array(runs), axis=0).tolist()
            align = read_alignment(rfd, method)
        finally:
            os.close(rfd)
    finally:
        Path(path).unlink(missing_ok=True)
    return {"read_sizes": list(read_sizes), "concurrency": list(concurrency), "bytes_per_s": table, "method": method,
            "align": align}


def read_alignment(fd: int, method: str) -> int:
    """The finest granularity reads of `fd` may have: with O_DIRECT the device's logical block (512 B on
    many disks, 4 KiB on others), found by trying reads of 512, 1024 and 2048 bytes at those offsets;
    a page for buffered reads, which move whole pages. Reads finer than a page move fewer bytes for the
    same I/O operation: a 9 KiB record is one 9 KiB read, not 12 or 16 KiB of pages."""
    if method != "o_direct":
        return FLASH_BLOCK
    buf = mmap.mmap(-1, FLASH_BLOCK)
    view = memoryview(buf)
    try:
        for align in (512, 1024, 2048):
            try:
                os.preadv(fd, [view[:align]], align)
                return align
            except OSError:
                continue
    finally:
        view.release()
        buf.close()
    return FLASH_BLOCK


def open_uncached(path: str) -> tuple[str, int]:
    """("o_direct", fd) when the filesystem serves O_DIRECT reads of `path`, else ("fadvise", fd): a
    buffered fd whose cached pages were dropped (tmpfs before Linux 6.6, some network filesystems)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        fd = None
    if fd is not None:
        buf = mmap.mmap(-1, FLASH_BLOCK)
        try:
            os.preadv(fd, [buf], 0)
            return "o_direct", fd
        except OSError:
            os.close(fd)
        finally:
            buf.close()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return "fadvise", fd


def _read_rate(fd: int, method: str, file_bytes: int, size: int, threads: int, seconds: float) -> float:
    """Aggregate bytes/s of `threads` readers each issuing random aligned reads of `size` bytes."""
    total = [0] * threads
    deadline = time.perf_counter() + seconds

    def reader(k: int) -> None:
        buf = mmap.mmap(-1, size)  # page aligned, as O_DIRECT needs
        rng = np.random.default_rng(k)
        slots = (file_bytes - size) // FLASH_BLOCK + 1
        try:
            while time.perf_counter() < deadline:
                off = int(rng.integers(slots)) * FLASH_BLOCK
                if method == "fadvise":
                    os.posix_fadvise(fd, off, size, os.POSIX_FADV_DONTNEED)
                total[k] += os.preadv(fd, [buf], off)
        finally:
            buf.close()

    start = time.perf_counter()
    workers = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(total) / (time.perf_counter() - start)
