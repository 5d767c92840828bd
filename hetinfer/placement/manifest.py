"""The plan manifest `hetinfer place` writes: the solver's result, the hardware and model it was
planned for, and the predicted speed per tier (docs/formats/plan.md). Kept apart from `plan.py`
so reading a plan never imports the solver.
"""
from __future__ import annotations

import datetime

from hetinfer.config import ModelConfig
from hetinfer.placement.cost import FLASH, TIERS, Problem, evaluate
from hetinfer.placement.ilp import Solution
from hetinfer.placement.plan import PLAN_FORMAT, PLAN_VERSION


def build_manifest(p: Problem, sol: Solution, config: ModelConfig, formats: dict, inputs: dict[str, str],
                   assumptions: list[str], profile: dict, predictors: dict | None = None) -> dict:
    """Everything a reader needs to trust or question the plan; `assumptions` non-empty marks a prediction.

    predictors: `source` (artefact path or None) and `bytes` ("measured" from the artefact, "assumed"
    from --predictor-bytes, None without predictors)."""
    usage = evaluate(p, sol.tiers)
    on = [sol.tiers == t for t in range(3)]
    freq = p.freq
    total_act = max(float(freq.sum()), 1e-30)
    sec = [float(p.seconds[t][on[t]].sum()) if on[t].any() else 0.0 for t in range(3)]
    if on[FLASH].any():  # reads at the plan's own density, and the streamed layers' fixed work
        sec[FLASH] += float(usage.read_seconds.sum() - p.read_seconds[on[FLASH]].sum()) + usage.stream_seconds
    dense_bytes = [p.dense.gpu_bytes, p.dense.ram_bytes, 0]
    tiers = {}
    for t in p.tiers:
        name = TIERS[t]
        tiers[name] = {
            "capacity_bytes": p.hw.capacity(name),
            "used_bytes": int(usage.used[t]),
            "dense_bytes": dense_bytes[t],
            "neuron_bytes": int(usage.neuron_bytes[t]),
            "neurons": int(on[t].sum()),
            "neuron_share": float(on[t].mean()),
            "activation_share": float(freq[on[t]].sum() / total_act),
            "seconds_per_token": sec[t],
        }
    tiers["ram"]["window_cache_bytes"] = usage.window_bytes
    if FLASH in p.tiers:
        tiers["flash"].update(
            misses_per_token=float(usage.misses.sum()), reads_per_token=float(usage.reads.sum()),
            read_bytes_per_token=float(usage.read_bytes.sum()), read_seconds_per_token=float(usage.read_seconds.sum()),
            streamed=bool(usage.streamed), streamed_layers=int(on[FLASH].any(axis=1).sum()) if usage.streamed else 0,
            stream_seconds_per_token=usage.stream_seconds, hidden_seconds_per_token=usage.hidden_seconds,
            priced_miss_seconds=p.miss_seconds.tolist())
    layers = []
    for layer in range(freq.shape[0]):
        row = {"attention": "gpu" if p.dense.attn_on_gpu[layer] else "ram", "split": bool(usage.split[layer]),
               "window_cache_bytes": int(usage.layer_window_bytes[layer])}
        for t in p.tiers:
            m = on[t][layer]
            per_neuron = p.sizes.record_bytes[layer] if t == FLASH else p.sizes.neuron_bytes[layer]
            row[TIERS[t]] = int(m.sum())
            row[f"{TIERS[t]}_bytes"] = int(m.sum() * per_neuron)
            row[f"{TIERS[t]}_activation_share"] = float(freq[layer][m].sum() / max(freq[layer].sum(), 1e-30))
        layers.append(row)
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prediction": bool(assumptions),
        "assumptions": assumptions,
        "inputs": inputs,
        "model": {"config": config.to_dict(), "formats": formats, "n_ctx": p.sizes.n_ctx,
                  "neuron_bytes": p.sizes.neuron_bytes.tolist(), "record_bytes": p.sizes.record_bytes.tolist(),
                  "layer_dense_bytes": p.sizes.layer_bytes.tolist(), "kv_bytes_per_layer": p.sizes.kv_bytes,
                  "kv_dtype": p.sizes.kv_dtype},
        "profile": {"source": None, "model": None, "tokens": 0, "sparsity": None, "synthesis": None} | profile,
        "predictors": {**(predictors or {"source": None, "bytes": None}),
                       "layer_bytes": p.sizes.predictor_bytes.tolist(),
                       "flops_per_token": int(p.sizes.predictor_bytes.sum()) // 2,  # float32: 2 FLOPs per 4 bytes
                       "seconds_per_token": p.dense.predictor_seconds},
        "hardware": p.hw.to_dict(),
        "window_tokens": p.window_tokens,
        "dense": {"head": "gpu" if p.dense.head_on_gpu else "ram", "embeddings": "ram",
                  "seconds_per_token": p.dense.seconds, "fixed_seconds_per_token": p.dense.fixed_seconds,
                  "attention_seconds_per_token": p.dense.attention_seconds,
                  "flash_io_bytes": p.dense.io_bytes, "offload_seconds_per_token": p.dense.offload_seconds},
        "tiers": tiers,
        "layers": layers,
        "sync": {"seconds": p.sync_s, "split_layers": int(usage.split.sum()),
                 "seconds_per_token": p.sync_s * int(usage.split.sum())},
        "solver": {"chosen": sol.chosen, "status": sol.status, "objective": sol.seconds,
                   "ilp_objective": sol.ilp_seconds, "greedy_objective": sol.greedy_seconds,
                   "mip_gap": sol.mip_gap, "solve_seconds": sol.solve_seconds, "group_size": sol.group_size,
                   "groups_per_layer": sol.groups, "binaries": sol.binaries},
        "predicted": {"seconds_per_token": usage.predicted_seconds, "tok_s": 1.0 / usage.predicted_seconds,
                      "ffn_density": float(freq.mean())},
    }
