"""`hetinfer info`: what a model is made of and how much memory each part needs, and with
`--memory`, what a decode of it really holds: the model's bytes beside the runtime's own."""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import numpy as np

from hetinfer.loader import load_model
from hetinfer.tensors import QTensor


def component_bytes(model) -> dict[str, int]:
    """Stored bytes of each part of the model in RAM (the unit placement and offloading work with); parts
    moved to a GPU (`model.place_layers`) count nothing here."""
    w = model.weights
    attn = sum(_ram(L.wq) + _ram(L.wk) + _ram(L.wv) + _ram(L.wo) for L in w.layers)
    ffn = sum(_ram(L.gate) + _ram(L.up) + _ram(L.down) for L in w.layers)
    norms = sum(_ram(L.attn_norm) + _ram(L.ffn_norm) for L in w.layers) + _ram(w.output_norm)  # float32
    out = {"embedding": w.embed.nbytes, "attention": attn, "ffn": ffn, "norms": norms}
    out["output_head"] = 0 if w.output is w.embed else _ram(w.output)
    return out


def _ram(a) -> int:
    """Bytes of a weight or norm in RAM: 0 for one on a torch device (a GPUTensor, a norm tensor)."""
    return a.nbytes if isinstance(a, (np.ndarray, QTensor)) else 0


def describe(path: str | None, as_json: bool = False, n_ctx: int = 4096) -> str:
    m = load_model(path)
    c = m.config
    parts = component_bytes(m)
    L0 = m.weights.layers[0]
    kv = c.kv_cache_bytes(min(n_ctx, c.context_length))
    info = {
        "path": m.path,
        "name": c.name,
        "architecture": c.arch,
        "layers": c.n_layers,
        "d_model": c.d_model,
        "n_ff": c.n_ff,
        "heads": c.n_heads,
        "kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab": c.vocab_size,
        "context_length": c.context_length,
        "activation": c.activation,
        "tied_embeddings": c.tied_embeddings,
        "rope_theta": c.rope_theta,
        "file_tensor_types": m.tensor_types,
        "formats_used": {"embedding": m.weights.embed.qtype, "attention": L0.wq.qtype, "ffn": L0.gate.qtype},
        "bytes": parts,
        "ffn_neuron_bytes": (L0.gate.row_bytes + L0.up.row_bytes + L0.down.nbytes // c.n_ff),
        "kv_cache_bytes": kv,
        "kv_cache_context": min(n_ctx, c.context_length),
        "memory_needed_bytes": sum(parts.values()) + kv,
        "fingerprint": m.fingerprint,
    }
    if as_json:
        return json.dumps(info, indent=2)
    mib = lambda b: f"{b / 2**20:9.1f} MiB"  # noqa: E731
    lines = [
        f"{c.name}  ({m.path})",
        f"  architecture  {c.arch}, {c.n_layers} layers, d_model {c.d_model}, FFN {c.n_ff} ({c.activation}), "
        f"heads {c.n_heads}/{c.n_kv_heads} x {c.head_dim}, vocab {c.vocab_size}, context {c.context_length}",
        f"  tensor types  {', '.join(f'{k} x{v}' for k, v in sorted(m.tensor_types.items()))}",
        f"  formats used  embedding {info['formats_used']['embedding']}, attention {info['formats_used']['attention']}, "
        f"FFN {info['formats_used']['ffn']}",
        "  bytes per component:",
    ]
    lines += [f"    {k:<12} {mib(v)}" for k, v in parts.items()]
    lines += [
        f"    {'kv cache':<12} {mib(kv)}  (float32, {info['kv_cache_context']} tokens)",
        f"  memory needed {mib(info['memory_needed_bytes']).strip()}  (one FFN neuron = {info['ffn_neuron_bytes']} bytes)",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --memory: measured resident memory of a decode
# ---------------------------------------------------------------------------------------------

MEMORY_PROMPT = "The capital of France is"


def mapped_rss(smaps: str = "/proc/self/smaps") -> dict[str, int]:
    """Resident bytes per mapped path of this process ("" for anonymous memory, "[heap]" and the like
    as the kernel names them), from /proc/self/smaps: what the kernel charges the process for."""
    out: dict[str, int] = defaultdict(int)
    path = ""
    header = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")
    with open(smaps) as f:
        for line in f:
            m = header.match(line)
            if m:
                path = m.group(1).strip()
            elif line.startswith("Rss:"):
                out[path] += int(line.split()[1]) * 1024
    return dict(out)


def _library(path: str) -> str:
    """The package a mapped file belongs to: "torch", "numba" (with llvmlite), ... for site-packages,
    "python" for the interpreter's own, "system" for the rest."""
    m = re.search(r"(?:site|dist)-packages/([^/]+)", path)
    if m:
        name = m.group(1).split(".")[0].split("-")[0]
        return "numba" if name == "llvmlite" else name.lstrip("_")
    return "python" if re.search(r"python3|libpython", path) else "system"


def runtime_memory(path: str | None, n_ctx: int | None = None, kv: str | None = None, tokens: int = 16) -> dict:
    """Resident memory of this process after a greedy decode of `tokens` tokens (every weight and kernel
    touched) of a model, or of a deployment from `hetinfer prepare` (its own engine, predictors and RAM
    tier), split into the model's data (the model file's mapped pages, the kernels' packed copies of its Q4
    weights, and a deployment's FFN records, window cache and scratch), the KV cache and the runtime's overhead (libraries by package, heap
    and anonymous memory less the model data held there); plus what a box needs for a full context.
    `n_ctx` and `kv` default to a deployment's own, and to 512 tokens and DEFAULT_KV for a model.
    Run it in a fresh process: whatever the process loaded before counts as overhead. Resident memory
    is what the process maps; a memory cgroup also charges the page cache of files it read without
    mapping them (Python sources at import), so a limit needs a little more."""
    from hetinfer import kernels
    from hetinfer.config import DEFAULT_KV
    from hetinfer.generate import Session
    from hetinfer.offload.deploy import is_deployment, load_deployment, open_session
    from hetinfer.sampling import SamplingParams

    engine_bytes, budget, deployment = 0, None, is_deployment(path)
    # the kernels `run` loads (a dense model's only; compiled in a child if the cache is cold, as run does:
    # compiling here would hold the compiler's memory)
    kernels.warmup(dense_only=not deployment)
    if deployment:
        dep = load_deployment(path)
        session = open_session(dep, n_ctx=n_ctx, kv=kv)
        model, engine_bytes, budget = dep.model, session.ffn.resident_bytes(), dep.manifest["ram_budget_bytes"]
        data_files = {os.path.realpath(p) for p in _files_under(dep.predictors.path)} if dep.predictors else set()
    else:
        model = load_model(path)
        session = Session(model, n_ctx=n_ctx or 512, kv=kv or DEFAULT_KV)
        data_files = set()
    for _ in session.complete(MEMORY_PROMPT, SamplingParams(temperature=0, max_tokens=tokens)):
        pass
    rss = mapped_rss()
    model_files = {os.path.realpath(p) for p in _files_under(model.path)}
    cache = session.cache
    kv_written = model.config.kv_cache_bytes(cache.pos, cache.dtype)
    libraries: dict[str, int] = defaultdict(int)
    model_bytes = anonymous = 0
    for p, b in rss.items():
        real = os.path.realpath(p) if p.startswith("/") else p
        if real in model_files or real in data_files:
            model_bytes += b
        elif p.startswith("/"):
            libraries[_library(p)] += b
        else:
            anonymous += b
    # the kernels' packed copies of weights (`kernels.packed_nbytes`): the model's data, in anonymous memory
    w = model.weights
    packed = sum(kernels.packed_nbytes(W) for L in w.layers for W in vars(L).values()) + \
        sum(kernels.packed_nbytes(W) for W in {id(w.embed): w.embed, id(w.output): w.output}.values())
    held = min(anonymous, kv_written + engine_bytes + packed)  # model data in anonymous memory
    heap = anonymous - held
    overhead = sum(libraries.values()) + heap
    small = [k for k, v in libraries.items() if v < 1 << 20]  # one line for the packages under 1 MiB
    if small:
        libraries["other"] = sum(libraries.pop(k) for k in small) + libraries.get("other", 0)
    full_kv = model.config.kv_cache_bytes(session.n_ctx, cache.dtype)
    return {
        "model": model.path,
        "deployment": path if budget is not None else None,
        "ram_budget_bytes": budget,
        "tokens": tokens,
        "context": session.n_ctx,
        "kv": cache.dtype,
        "resident_bytes": sum(rss.values()),
        "model_file_bytes": model_bytes,
        "model_packed_bytes": packed,
        "engine_buffers_bytes": engine_bytes,
        "kv_cache_written_bytes": kv_written,
        "overhead_bytes": overhead,
        "overhead_components": {"heap_and_anonymous": heap,
                                **{f"files_{k}": v for k, v in sorted(libraries.items(), key=lambda kv_: -kv_[1])}},
        "kv_cache_full_bytes": full_kv,
        "box_needs_bytes": model_bytes + packed + engine_bytes + full_kv + overhead,
    }


def _files_under(path: str) -> list[str]:
    """`path` itself, or every file below it if it is a directory (a checkpoint, a predictor set)."""
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def describe_memory(path: str | None, as_json: bool = False, n_ctx: int | None = None, kv: str | None = None,
                    tokens: int = 16) -> str:
    """`hetinfer info --memory`: `runtime_memory` as a table (or JSON)."""
    r = runtime_memory(path, n_ctx, kv, tokens)
    if as_json:
        return json.dumps(r, indent=2)
    mib = lambda b: f"{b / 2**20:8.1f} MiB"  # noqa: E731
    what = f"deployment {r['deployment']}" if r["deployment"] else r["model"]
    lines = [f"resident memory after a greedy decode of {r['tokens']} tokens ({what}, context {r['context']}, "
             f"KV {r['kv']}):",
             f"  model files (mapped)    {mib(r['model_file_bytes'])}",
             f"  weights packed          {mib(r['model_packed_bytes'])}  (Q4 rows regrouped for the kernels)"]
    if r["deployment"]:
        lines.append(f"  FFN records and caches  {mib(r['engine_buffers_bytes'])}  (RAM tier, window cache, scratch)")
    lines += [f"  KV cache (written)      {mib(r['kv_cache_written_bytes'])}",
              f"  runtime overhead        {mib(r['overhead_bytes'])}"]
    lines += [f"    {k.replace('files_', 'files of ').replace('_', ' '):<21} {mib(v)}"
              for k, v in r["overhead_components"].items() if v >= 1 << 20]
    budget = (f"; the deployment was planned for --ram {r['ram_budget_bytes'] / 2**20:.1f} MiB"
              if r["deployment"] else "; an offloaded deployment: its --ram plus the overhead")
    lines += [f"  total resident          {mib(r['resident_bytes'])}",
              f"  a box needs about       {mib(r['box_needs_bytes'])}  (model data + KV cache at {r['context']} "
              f"tokens {r['kv_cache_full_bytes'] / 2**20:.1f} MiB + overhead{budget})"]
    return "\n".join(lines)
