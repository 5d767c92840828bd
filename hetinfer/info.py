"""`hetinfer info`: what a model is made of and how much memory each part needs."""
from __future__ import annotations

import json

from hetinfer.loader import load_model


def component_bytes(model) -> dict[str, int]:
    """Stored bytes of each part of the model: the unit placement and offloading work with."""
    w = model.weights
    attn = sum(L.wq.nbytes + L.wk.nbytes + L.wv.nbytes + L.wo.nbytes for L in w.layers)
    ffn = sum(L.gate.nbytes + L.up.nbytes + L.down.nbytes for L in w.layers)
    norms = sum(L.attn_norm.numel() + L.ffn_norm.numel() for L in w.layers) * 4 + w.output_norm.numel() * 4
    out = {"embedding": w.embed.nbytes, "attention": attn, "ffn": ffn, "norms": norms}
    out["output_head"] = 0 if w.output is w.embed else w.output.nbytes
    return out


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
