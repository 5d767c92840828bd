"""`hetinfer place`: decide where every FFN neuron lives and write the plan.

    hetinfer place [-m MODEL | --model-shape CONFIG_JSON] (--profile PROFILE | --power-law EXP)
                   [--predictors DIR | --predictor-bytes SIZE] -o PLAN [--gpu-mem SIZE] [--ram SIZE]
                   [--ctx N] [--kv f32|f16] [--flash-dir DIR] [--hardware FILE] [--dry-run] [--json]

Without -m the weights are not on disk: their formats are assumed (--qtype) and the plan is
labelled a prediction, as it is when the profile is synthesised, the predictors' size assumed
(--predictor-bytes) or a tier's speed assumed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hetinfer.argtypes import SIZE, float_in, int_in, output_dir
from hetinfer.config import DEFAULT_KV, KV_DTYPES, ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.hf_checkpoint import hf_config
from hetinfer.placement import synth
from hetinfer.placement.cost import (PlacementError, WeightFormats, build_problem, model_sizes, predictor_sizes,
                                     weight_sizes)
from hetinfer.placement.hardware import Hardware, format_size, load_hardware
from hetinfer.placement.plan import save_plan
from hetinfer.profiler.artifact import load_profile
from hetinfer.tensors import FORMATS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "place", help="decide which FFN neurons live on the GPU, in RAM and on flash",
        description="Place every FFN neuron on GPU memory, CPU RAM or flash so the expected time per token is "
                    "lowest without exceeding any tier; writes a plan directory (docs/formats/plan.md).")
    m = p.add_argument_group("model and profile")
    m.add_argument("-m", "--model", help="GGUF file or Hugging Face checkpoint directory to place")
    m.add_argument("--model-shape", metavar="CONFIG_JSON",
                   help="what-if: HF config.json (or hetinfer ModelConfig JSON) of a model that is not on disk")
    m.add_argument("--qtype", choices=FORMATS, default="q4_0",
                   help="weight format assumed when the weights are not loaded with -m (default q4_0)")
    m.add_argument("--ctx", type=int_in(1), default=4096,
                   help="context to reserve the KV cache for (default 4096, capped at the model's)")
    m.add_argument("--kv", choices=tuple(KV_DTYPES), default=DEFAULT_KV,
                   help=f"KV-cache element type to reserve it in, as the engine's --kv (f16: half the bytes; "
                        f"default {DEFAULT_KV})")
    m.add_argument("--profile", metavar="PROFILE",
                   help="activation profile; rescaled per layer when its shape differs from the model's")
    m.add_argument("--power-law", type=float_in(0.0), metavar="EXPONENT",
                   help="what-if: synthesise the profile as frequency ~ rank^-EXPONENT instead of --profile")
    m.add_argument("--sparsity", type=float_in(0.0, 1.0, hi_open=True), default=0.5,
                   help="profiled level (0.1 .. 0.9) whose threshold defines an active neuron; with --power-law, "
                        "the mean fraction of inactive neurons (default 0.5)")
    m.add_argument("--predictors", metavar="DIR",
                   help="predictors from `hetinfer train-predictors`: each layer's is placed, byte for byte, with "
                        "the layer's attention (checked against -m MODEL)")
    m.add_argument("--every-neuron", action="store_true",
                   help="plan for computing every FFN neuron, without predictors (exact output): each neuron is "
                        "priced as used every token, and no predictor takes RAM")
    m.add_argument("--predictor-bytes", type=SIZE, metavar="SIZE",
                   help="what-if without a predictor artefact (e.g. --model-shape): bytes of each layer's predictor")
    h = p.add_argument_group("machine")
    h.add_argument("--hardware", metavar="FILE", help="JSON description of the machine instead of detecting this one")
    h.add_argument("--gpu-mem", type=SIZE, metavar="SIZE",
                   help="GPU memory to use (0 = no GPU; without a CUDA device: a what-if GPU with assumed speeds)")
    h.add_argument("--ram", type=SIZE, metavar="SIZE", help="CPU RAM to use (default: what is available now)")
    h.add_argument("--flash-dir", metavar="DIR", help="directory on the disk that serves flash neurons")
    h.add_argument("--dry-run", action="store_true", help="print the detected machine and exit")
    s = p.add_argument_group("solver")
    s.add_argument("--time-limit", type=float_in(0.0, 86400.0, lo_open=True), default=60.0,
                   help="seconds for the ILP, building the model included (default 60)")
    s.add_argument("--mip-gap", type=float_in(0.0, 1.0), default=0.01,
                   help="relative MIP gap to stop at (default 0.01)")
    s.add_argument("--max-binaries", type=int_in(1), default=20000,
                   help="size groups to keep at most this many binaries")
    s.add_argument("--group-size", type=int_in(1), help="neurons per group (overrides --max-binaries)")
    s.add_argument("--window", type=int_in(0), default=5,
                   help="tokens a flash neuron stays in the RAM window cache (default 5)")
    p.add_argument("-o", "--output", type=output_dir, metavar="PLAN", help="plan directory to write")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # the solver (PuLP), the probes and the predictors (torch) load with the command, not with the CLI's parser
    from hetinfer.placement.ilp import solve
    from hetinfer.placement.manifest import build_manifest
    from hetinfer.profiler.predictors import load_predictors

    if not args.dry_run:
        _check_args(args)
    model = None
    if args.model:
        from hetinfer.loader import load_model

        model = load_model(args.model)
    if args.dry_run:
        config = model.config if model else read_shape(args.model_shape) if args.model_shape else None
        hw = _machine(args, model.weights.layers[0].gate.qtype if model else args.qtype,
                      config.d_model if config else 4096, config, model.weights.layers[0].wq.qtype if model else None,
                      model)
        print(json.dumps(hw.to_dict(), indent=2) if args.json else hardware_table(hw))
        return 0
    profile = load_profile(args.profile, model) if args.profile else None  # with -m: checks the fingerprint
    predictors = load_predictors(args.predictors, model) if args.predictors else None  # likewise

    config, sizes, formats, inputs, assumptions, predictor_info = _model(args, model, profile, predictors)
    freq, profile_info = _frequencies(args, config, profile, predictors, inputs, assumptions)
    hw = _machine(args, formats["ffn_gate"], config.d_model, config, formats["attn"], model)
    if "file" in hw.sources.values():
        assumptions.append(f"machine described by {args.hardware}, not measured here")
    assumed = sorted(k for k, v in hw.sources.items() if v == "assumed")
    if assumed:
        assumptions.append(f"assumed, not measured: {', '.join(assumed)}")
    inputs.update(hw.sources, window_hits="assumed (activations independent across tokens)")

    problem = build_problem(freq, config, sizes, hw, args.window)
    sol = solve(problem, max_binaries=args.max_binaries, group_size=args.group_size, time_limit=args.time_limit,
                mip_gap=args.mip_gap)
    manifest = build_manifest(problem, sol, config, formats, inputs, assumptions, profile_info, predictor_info)
    save_plan(args.output, manifest, sol.tiers)
    print(json.dumps(summary(manifest, args.output)) if args.json else report(manifest, args.output))
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if not args.output:
        raise PlacementError("-o PLAN is required: the directory to write the plan to (or use --dry-run)")
    if (args.profile is None) == (args.power_law is None):
        raise PlacementError("give exactly one of --profile PROFILE or --power-law EXPONENT")
    if args.model and args.model_shape:
        raise PlacementError("give -m MODEL or --model-shape CONFIG_JSON, not both")
    if args.every_neuron and (args.predictors or args.predictor_bytes is not None):
        raise PlacementError("--every-neuron plans without predictors: drop --predictors/--predictor-bytes, or "
                             "--every-neuron to plan for them")
    if args.predictors and args.predictor_bytes is not None:
        raise PlacementError("give --predictors DIR or --predictor-bytes SIZE, not both: the artefact's size is "
                             "measured")


def _machine(args: argparse.Namespace, qtype: str, d_model: int, config=None, attn_qtype: str | None = None,
             model=None) -> Hardware:
    """The --hardware description or this machine (kernels probed on `qtype` rows of `d_model`, the
    per-layer time on the loaded `model`'s own layers, or else on layers shaped like `config`'s when given),
    with the flags."""
    from hetinfer.placement.probe import detect

    base = load_hardware(args.hardware) if args.hardware else None
    return detect(gpu_mem=args.gpu_mem, ram=args.ram, flash_dir=args.flash_dir, base=base, qtype=qtype,
                  d_model=d_model, config=config, attn_qtype=attn_qtype, model=model)


def _model(args: argparse.Namespace, model, profile, predictors):
    """Config, byte sizes and formats from the loaded model, or else from a shape with assumed formats;
    plus the `inputs`, `assumptions` and predictor description this choice makes."""
    if model is not None:
        config = model.config
        inputs, assumptions = {"model": "loaded", "weight_formats": "loaded"}, []
    elif args.model_shape:
        config = read_shape(args.model_shape)
        inputs, assumptions = {"model": "shape"}, [f"model not on disk: shape from {args.model_shape}"]
    elif profile is not None:
        config = ModelConfig.from_dict(profile.config)
        inputs, assumptions = {"model": "profile"}, ["model not loaded: shape from the profile"]
    else:
        raise PlacementError("--power-law needs the model: -m MODEL or --model-shape CONFIG_JSON")
    n_ctx = min(args.ctx, config.context_length)
    pred_bytes, pred_info = _predictor_bytes(args, config, predictors, inputs, assumptions)
    if model is not None:
        sizes = weight_sizes(config, model.weights, n_ctx, pred_bytes, args.kv)
        L0, w = model.weights.layers[0], model.weights
        formats = {"ffn_gate": L0.gate.qtype, "ffn_up": L0.up.qtype, "ffn_down": L0.down.qtype,
                   "attn": L0.wq.qtype, "embed": w.embed.qtype, "head": w.output.qtype}
        return config, sizes, formats, inputs, assumptions, pred_info
    wf = WeightFormats.uniform(args.qtype)
    sizes = model_sizes(config, wf, n_ctx, pred_bytes, args.kv)
    inputs["weight_formats"] = "assumed"
    assumptions.append(f"weight formats assumed: {args.qtype} (pass -m MODEL to read them)")
    return config, sizes, dict(vars(wf)), inputs, assumptions, pred_info


def _predictor_bytes(args: argparse.Namespace, config: ModelConfig, predictors, inputs: dict,
                     assumptions: list[str]) -> tuple[list[int] | int, dict]:
    """Per-layer predictor bytes: measured from the artefact, assumed from --predictor-bytes, or 0."""
    if predictors is not None:
        got = ModelConfig.from_dict(predictors.manifest["model"]["config"])
        shape, want = (got.n_layers, got.d_model, got.n_ff), (config.n_layers, config.d_model, config.n_ff)
        if shape != want:
            raise PlacementError(f"--predictors {args.predictors} were trained for {got.name or got.arch} "
                                 f"({shape[0]} layers, d {shape[1]}, n_ff {shape[2]}), but the plan is for "
                                 f"{want[0]} layers, d {want[1]}, n_ff {want[2]}: train predictors for this model")
        inputs["predictors"] = "measured"
        return predictor_sizes(predictors), {"source": predictors.path, "bytes": "measured"}
    if args.predictor_bytes is not None:
        inputs["predictors"] = "assumed"
        assumptions.append(f"predictors assumed: {format_size(args.predictor_bytes)} per layer (--predictor-bytes)")
        return args.predictor_bytes, {"source": None, "bytes": "assumed"}
    inputs["predictors"] = "none"
    return 0, {"source": None, "bytes": None}


def _frequencies(args: argparse.Namespace, config: ModelConfig, profile, predictors, inputs: dict,
                 assumptions: list[str]) -> tuple[np.ndarray, dict]:
    """How often the engine computes each neuron [n_layers, n_ff], and the manifest's description of the
    profile: with --every-neuron, always; with predictors and a measured profile of this model, the share of
    the profile's stored FFN inputs the predictors select each neuron for (what the engine computes); otherwise the profile's
    activation frequency at --sparsity (rescaled if its shape differs) or a power law."""
    freq, info = _profile_frequencies(args, config, profile, inputs, assumptions)
    if args.every_neuron:
        inputs["frequencies"] = "every neuron"
        return np.ones_like(freq, dtype=np.float64), info
    inputs["frequencies"] = "profile"
    if predictors is None or inputs["profile"] != "measured":
        return freq, info
    if not profile.has_samples:
        assumptions.append(f"the profile keeps no FFN inputs to run the predictors on: neurons priced by its "
                           f"activation frequency at sparsity {args.sparsity}, not by how often the predictors "
                           f"select them")
        return freq, info
    inputs["frequencies"] = "predictors"
    return predictors.selection_frequency(profile.samples()[0]), info


def _profile_frequencies(args: argparse.Namespace, config: ModelConfig, profile, inputs: dict,
                         assumptions: list[str]) -> tuple[np.ndarray, dict]:
    """Activation probability [n_layers, n_ff] from the profile (rescaled if its shape differs) or
    a power law, and the manifest's description of where it came from."""
    if profile is None:
        inputs["profile"] = "synthetic"
        assumptions.append(f"profile synthesised: power law, exponent {args.power_law}, sparsity {args.sparsity}")
        freq = synth.power_law(config.n_layers, config.n_ff, args.power_law, args.sparsity)
        return freq, {"source": None, "model": None, "tokens": 0, "sparsity": args.sparsity,
                      "synthesis": {"kind": "power_law", "exponent": args.power_law}}
    try:
        freq = np.asarray(profile.activation_frequency(args.sparsity), dtype=np.float64)
    except ValueError as e:
        raise PlacementError(f"--sparsity {args.sparsity}: {e}") from None
    src = ModelConfig.from_dict(profile.config)
    info = {"source": str(args.profile), "model": src.name, "tokens": int(profile.tokens),
            "sparsity": args.sparsity, "synthesis": None}
    inputs["profile"] = "measured"
    if freq.shape != (config.n_layers, config.n_ff):
        inputs["profile"] = "synthetic"
        info["synthesis"] = {"kind": "rescaled", "from_shape": list(freq.shape)}
        assumptions.append(f"profile rescaled per layer from a {freq.shape[0]} x {freq.shape[1]} model ({src.name})")
        freq = synth.rescale(freq, config.n_layers, config.n_ff)
    return freq, info


def read_shape(path: str) -> ModelConfig:
    """A ModelConfig from an HF config.json, or from a hetinfer ModelConfig JSON (has "n_ff")."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementError(f"cannot read model shape {path}: {e}") from None
    try:
        if "n_ff" in d:
            return ModelConfig.from_dict(d)
        return hf_config(d, d.get("_name_or_path") or Path(path).parent.name, where=path)
    except HetinferError as e:
        raise PlacementError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise PlacementError(f"{path}: not a usable model config ({type(e).__name__}: {e})") from None


def summary(manifest: dict, path: str) -> dict:
    s = manifest["solver"]
    return {
        "plan": str(path), "prediction": manifest["prediction"], "assumptions": manifest["assumptions"],
        "solve_seconds": s["solve_seconds"], "mip_gap": s["mip_gap"], "status": s["status"], "chosen": s["chosen"],
        "objective": s["objective"], "greedy_objective": s["greedy_objective"], "ilp_objective": s["ilp_objective"],
        "predicted_tok_s": manifest["predicted"]["tok_s"], "ffn_density": manifest["predicted"]["ffn_density"],
        "frequencies": manifest["inputs"]["frequencies"],
        "predictors": {k: manifest["predictors"][k] for k in ("source", "bytes", "seconds_per_token")}
        | {"total_bytes": sum(manifest["predictors"]["layer_bytes"])},
        "tiers": {k: {f: v[f] for f in ("capacity_bytes", "used_bytes", "neuron_share", "activation_share")}
                  for k, v in manifest["tiers"].items()},
    }


# The solver statuses that need more than their name (`ilp.Solution.status`)
STATUS_TEXT = {"killed": "killed, still running past its time limit (its warm start stands in)"}


def report(manifest: dict, path: str) -> str:
    """Tier table, time breakdown, solver line and per-layer table of a plan manifest."""
    c, t, s = manifest["model"]["config"], manifest["tiers"], manifest["solver"]
    lines = [f"plan for {c['name'] or c['arch']} ({c['n_layers']} layers x {c['n_ff']} neurons) written to {path}"]
    if manifest["prediction"]:
        lines.append("PREDICTION, not a measurement of this model on this machine:")
        lines += [f"  - {a}" for a in manifest["assumptions"]]
    lines.append(f"{'tier':<6} {'capacity':>11} {'used':>11} {'dense':>11} {'neurons':>11} {'of neurons':>11} "
                 f"{'of activations':>15}")
    for name, v in t.items():
        lines.append(f"{name:<6} {format_size(v['capacity_bytes']):>11} {format_size(v['used_bytes']):>11} "
                     f"{format_size(v['dense_bytes']):>11} {v['neurons']:>11,} {v['neuron_share']:>11.1%} "
                     f"{v['activation_share']:>15.1%}")
    if "flash" in t:
        f = t["flash"]
        lines.append(f"flash window cache {format_size(t['ram']['window_cache_bytes'])} and I/O buffers "
                     f"{format_size(manifest['dense']['flash_io_bytes'])} of RAM; per token expected "
                     f"{f['misses_per_token']:.1f} records missing from the window, read in {f['reads_per_token']:.1f} "
                     f"requests of {format_size(f['read_bytes_per_token'])} in all"
                     + (" (whole flash spans streamed ahead: cheaper than the records on this disk)"
                        if f.get("streamed") else ""))
    lines.append(f"neurons computed per token: {manifest['predicted']['ffn_density']:.1%} "
                 + ("(every neuron: no predictors)" if manifest["inputs"]["frequencies"] == "every neuron"
                    else f"(frequencies from the {manifest['inputs']['frequencies']})"))
    pred = manifest["predictors"]
    if pred["bytes"]:
        source = f", {pred['source']}" if pred["source"] else ""
        lines.append(f"predictors ({pred['bytes']}{source}): {format_size(sum(pred['layer_bytes']))} with each "
                     f"layer's attention, {pred['flops_per_token'] / 1e6:.1f} MFLOP per token")
    ms = 1e3 * manifest["predicted"]["seconds_per_token"]
    dense_ms, pred_ms = 1e3 * manifest["dense"]["seconds_per_token"], 1e3 * pred["seconds_per_token"]
    fixed_ms = 1e3 * manifest["dense"]["fixed_seconds_per_token"]
    attention_ms = 1e3 * manifest["dense"].get("attention_seconds_per_token", 0.0)
    offload_ms = 1e3 * manifest["dense"]["offload_seconds_per_token"]
    offload = f", offloading engine {offload_ms:.2f}" if "flash" in t else ""
    parts = [f"dense {dense_ms:.2f} (predictors {pred_ms:.2f}, per-layer overhead {fixed_ms:.2f}, attention over "
             f"{manifest['model']['n_ctx'] // 2} positions {attention_ms:.2f}{offload})"]
    parts += [f"{name} {1e3 * v['seconds_per_token']:.2f}" for name, v in t.items()]
    if t.get("flash", {}).get("hidden_seconds_per_token"):
        parts.append(f"less flash reads hidden behind compute {1e3 * t['flash']['hidden_seconds_per_token']:.2f}")
    sync = manifest["sync"]
    parts.append(f"sync {1e3 * sync['seconds_per_token']:.2f} ({sync['split_layers']} split layers)")
    lines.append(f"predicted {manifest['predicted']['tok_s']:.2f} tok/s = {ms:.2f} ms/token: {', '.join(parts)}")
    gap = "n/a" if s["mip_gap"] is None else f"{s['mip_gap']:.2%}"
    greedy = "none fits" if s["greedy_objective"] is None else f"{1e3 * s['greedy_objective']:.3f} ms/token"
    lines.append(f"solver: chose {s['chosen']} ({1e3 * s['objective']:.3f} ms/token with the ILP's flash read prices); "
                 f"ILP {STATUS_TEXT.get(s['status'], s['status'])}, gap {gap}, {s['solve_seconds']:.1f} s, "
                 f"{s['groups_per_layer']} groups/layer of {s['group_size']} neurons ({s['binaries']} binaries); "
                 f"greedy {greedy}")
    names = list(t)
    lines.append(f"{'layer':>5} {'attn':>5} " + " ".join(f"{n:>7}" for n in names)
                 + " " + " ".join(f"{n + ' MiB':>10}" for n in names)
                 + " " + " ".join(f"{'act ' + n:>9}" for n in names) + "  split")
    for i, row in enumerate(manifest["layers"]):
        lines.append(f"{i:>5} {row['attention']:>5} " + " ".join(f"{row[n]:>7}" for n in names) + " "
                     + " ".join(f"{row[n + '_bytes'] / 2**20:>10.1f}" for n in names) + " "
                     + " ".join(f"{row[n + '_activation_share']:>9.1%}" for n in names)
                     + ("  yes" if row["split"] else ""))
    return "\n".join(lines)


def hardware_table(hw: Hardware) -> str:
    src = hw.sources
    lines = [f"{'tier':<6} {'capacity':>11}  speed"]
    if hw.gpu is None:
        lines.append("gpu    (none: no CUDA device; --gpu-mem SIZE adds a what-if GPU)")
    else:
        g = hw.gpu
        lines.append(f"gpu    {format_size(g.capacity_bytes):>11}  {g.bytes_per_s / 1e9:.1f} GB/s kernels "
                     f"[{src.get('gpu.bytes_per_s', '?')}], host->device {g.h2d_bytes_per_s / 1e9:.1f} GB/s, "
                     f"round trip {g.sync_latency_s * 1e6:.0f} us [{src.get('gpu.sync_latency_s', '?')}]"
                     f"  capacity [{src.get('gpu.capacity_bytes', '?')}]")
    lines.append(f"ram    {format_size(hw.ram.capacity_bytes):>11}  {hw.ram.bytes_per_s / 1e9:.1f} GB/s kernels "
                 f"[{src.get('ram.bytes_per_s', '?')}], {hw.ram.layer_seconds * 1e6:.1f} us a layer "
                 f"[{src.get('ram.layer_seconds', '?')}], {hw.ram.position_seconds * 1e9:.0f} ns a layer and cached "
                 f"position [{src.get('ram.position_seconds', '?')}]  capacity [{src.get('ram.capacity_bytes', '?')}]")
    if hw.flash is None:
        lines.append("flash  (none: --flash-dir DIR adds one)")
    else:
        f = hw.flash
        curve = ", ".join(f"{format_size(sz)}: {max(row) / 1e9:.2f}"
                          for sz, row in zip(f.read_sizes, f.bytes_per_s, strict=True))
        lines.append(f"flash  {format_size(f.capacity_bytes):>11}  {f.dir}, {f.method}, GB/s by read size at best "
                     f"of {f.concurrency} in flight: {curve} [{src.get('flash.bytes_per_s', '?')}]")
    return "\n".join(lines)
