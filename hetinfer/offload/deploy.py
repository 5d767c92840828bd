"""Deployments: `hetinfer prepare` runs profile -> predictors -> place -> store and writes a
directory whose manifest names them all; `open_deployment` turns one into a Session.

A deployment directory (docs/formats/deployment.md):

    DEPLOY/
      deployment.json   manifest: the model (path + fingerprint) and each artefact's path
      profile/          `hetinfer profile` output          (unless --profile named another)
      predictors/       `hetinfer train-predictors` output (unless --predictors named another)
      plan/             `hetinfer place` output
    FLASH_DIR/NAME.store/   the flash store (`hetinfer.offload.store`), on the disk that serves it

Each step is the same code as its own command, run only when its artefact is missing, invalid or
made from other inputs, and each writes atomically; so an interrupted `prepare` (Ctrl-C, kill -9)
continues where it stopped on the next run, and nothing half-written is ever used. Paths inside
DEPLOY are stored relative to it, so a deployment directory can be moved.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetinfer.atomic import atomic_write_json
from hetinfer.errors import ArtifactError, HetinferError

DEPLOY_FORMAT = "hetinfer.deployment"
DEPLOY_VERSION = 1
MANIFEST = "deployment.json"
REDO = "re-run `hetinfer prepare`"
AUTO_WINDOWS = (0, 1, 2, 5)  # window-cache lengths prepare tries when --window is not given
# CBC's relative gap for prepare's place trials (`hetinfer place` alone: 1%). Trials are compared by predicted
# speed, and CBC spends most of its time proving the bound of a plan it already has: on SmolLM2 at 1%, two
# of five trials ran to the 60 s limit; at 2% the plans chosen were the same and the place step 2-3x shorter.
PREPARE_MIP_GAP = 0.02


class DeploymentError(ArtifactError):
    """A deployment that cannot be used; the message names the problem and the fix."""


@dataclass
class PrepareOptions:
    output: str
    flash_dir: str
    model: str | None = None
    ram: int | None = None  # bytes for model data: dense parts, RAM-tier neurons, window cache, KV cache
    gpu_mem: int | None = None
    ctx: int = 4096
    kv: str = "f32"
    data: list[str] = field(default_factory=list)  # calibration files; empty: the set shipped with hetinfer
    tokens: int = 100_000  # calibration tokens for the profile
    profile: str | None = None  # an existing profile to use instead of profiling
    predictors: str | None = None  # existing predictors to use instead of training
    window: int | None = None  # tokens a flash neuron stays in the RAM window cache; None: the best of AUTO_WINDOWS
    weights: str = "native"  # format the store keeps gate/up in (native: as in the model file; f32: exact mode)
    threads: int | None = None
    every_neuron: bool | None = None  # True: no predictors, every neuron computed; False: predictors; None: weigh both


def prepare(opts: PrepareOptions) -> Path:
    """Run every missing step and write DEPLOY/deployment.json; returns the manifest's path."""
    from hetinfer.loader import load_model, resolve_model_path

    out = Path(opts.output)
    if opts.every_neuron and opts.predictors:
        raise DeploymentError("--neurons every plans without predictors: drop --predictors, or ask for "
                              "--neurons predicted or auto")
    if opts.every_neuron and opts.window:
        raise DeploymentError(f"--neurons every computes every neuron each token, so a window cache of {opts.window} "
                              "tokens would hold them all: drop --window (or give 0)")
    _check_outputs(out, Path(opts.flash_dir))
    model_path = os.path.abspath(resolve_model_path(opts.model))
    model = load_model(model_path, weights=opts.weights)
    common = ["-m", model_path] + (["-t", str(opts.threads)] if opts.threads else [])
    _check_ram(opts, model)

    profile = Path(opts.profile) if opts.profile else out / "profile"
    if opts.profile is None and not _valid(lambda: _load_profile(profile, model), "profile", profile):
        data = ["--data", *opts.data] if opts.data else []  # none: the calibration set shipped with hetinfer
        _step("1/4 profile", ["profile", *common, *data, "--tokens", str(opts.tokens), "-o", str(profile)])
    _load_profile(profile, model)

    predictors = None if opts.every_neuron else Path(opts.predictors) if opts.predictors else out / "predictors"
    if predictors is not None:
        if opts.predictors is None and not _valid(lambda: _load_predictors(predictors, model), "predictors", predictors):
            _step("2/4 predictors", ["train-predictors", *common, "--profile", str(profile), "-o", str(predictors)])
        _load_predictors(predictors, model)

    plan_dir = out / "plan"
    place = ["place", "-m", model_path, "--profile", str(profile), "--flash-dir", opts.flash_dir, "--ctx",
             str(opts.ctx), "--kv", opts.kv, "--mip-gap", str(PREPARE_MIP_GAP)]
    place += [f for flag, v in (("--ram", opts.ram), ("--gpu-mem", opts.gpu_mem)) if v is not None for f in (flag, str(v))]
    # with predictors, also weigh a plan that computes every neuron (None: prepare picks; True: that plan only)
    trials = [] if predictors is None else [(f"window {k}", ["--predictors", str(predictors), "--window", str(k)])
                                            for k in ([opts.window] if opts.window is not None else AUTO_WINDOWS)]
    if opts.every_neuron is not False and opts.window in (None, 0):
        trials.append(("every neuron, window 0", ["--every-neuron", "--window", "0"]))
    wanted = {"ram": opts.ram, "gpu_mem": opts.gpu_mem, "ctx": min(opts.ctx, model.config.context_length),
              "kv": opts.kv, "window": opts.window, "predictors": predictors and os.path.abspath(predictors),
              "flash_dir": os.path.abspath(opts.flash_dir)}
    if not _valid(lambda: _check_plan(plan_dir, wanted), "plan", plan_dir):
        _place(place, plan_dir, trials)
    plan = _check_plan(plan_dir, wanted)
    if plan.manifest["predictors"]["source"] is None:
        predictors = None  # the plan computes every neuron: run/chat/serve load no predictors

    from hetinfer.offload.gpu import gpu_identity
    from hetinfer.offload.store import build_store, open_store
    from hetinfer.profiler.artifact import load_profile

    tiers_sha = hashlib.sha256(plan.tiers.tobytes()).hexdigest()[:16]
    store_path = Path(opts.flash_dir) / f"{Path(model_path).stem}.{tiers_sha}.{opts.weights}.store"
    if not _valid(lambda: open_store(store_path, model), "store", store_path):
        print(f"[4/4 store] writing {store_path}", file=sys.stderr)
        prof = load_profile(str(profile), model)
        build_store(model, store_path, plan.tiers, [prof.neuron_order(i) for i in range(model.config.n_layers)],
                    weights=opts.weights)
    open_store(store_path, model)

    manifest = {
        "format": DEPLOY_FORMAT,
        "version": DEPLOY_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": _rel(model_path, out), "fingerprint": model.fingerprint},
        "profile": _rel(profile, out),
        "predictors": predictors and _rel(predictors, out),
        "plan": _rel(plan_dir, out),
        "store": _rel(store_path, out),
        "weights": opts.weights,
        "ctx": wanted["ctx"],
        "kv": opts.kv,
        "window": plan.manifest["window_tokens"],
        "ram_budget_bytes": plan.manifest["tiers"]["ram"]["capacity_bytes"],
        "gpu": gpu_identity() if plan.manifest["hardware"].get("gpu") else None,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return out / MANIFEST


def _check_ram(opts: PrepareOptions, model) -> None:
    """Refuse a --ram below what the dense parts need before minutes of profiling (the place step checks
    again, with the predictors trained here); no check when a GPU may hold dense parts."""
    if opts.ram is None or opts.gpu_mem:
        return
    from hetinfer.placement.cost import check_dense_ram, cpu_dense_ram_bytes, predictor_sizes, weight_sizes

    pred = predictor_sizes(_load_predictors(Path(opts.predictors), model)) if opts.predictors else 0
    sizes = weight_sizes(model.config, model.weights, min(opts.ctx, model.config.context_length), pred, opts.kv)
    windows = [opts.window] if opts.window is not None else AUTO_WINDOWS
    check_dense_ram(sizes, opts.ram, min(cpu_dense_ram_bytes(sizes, True, k) for k in windows), True)


def _place(argv: list[str], plan_dir: Path, trials: list[tuple[str, list[str]]]) -> None:
    """`hetinfer place` once per trial (a name and its flags: a window-cache length with the predictors, or every
    neuron without them), keeping the plan predicted fastest. A window costs RAM that could hold neurons
    instead, worth it when neurons are active in few tokens (ReLU models), not when most are active in most
    tokens (SmolLM2's predictors keep ~80%: the window would hold them all); predictors cost RAM too, worth it
    unless the flash tier is read in whole spans anyway (an IOPS-bound disk at high density)."""
    from hetinfer.placement import load_plan
    from hetinfer.placement.cost import PlacementError

    best, error = None, None
    dirs = [plan_dir.parent / f".{plan_dir.name}.trial{i}" for i in range(len(trials))]
    for (name, flags), trial in zip(trials, dirs):
        try:
            _step(f"3/4 place, {name}", [*argv, *flags, "-o", str(trial)])
        except PlacementError as e:
            error = e
            continue
        manifest = load_plan(trial).manifest
        tok_s = manifest["predicted"]["tok_s"]
        if best is None or tok_s > best[0]:
            best = (tok_s, trial, name, manifest["model"]["n_ctx"] // 2)
    if best is None:
        raise error
    if len(trials) > 1:
        print(f"[3/4 place] {best[2]} predicted fastest ({best[0]:.1f} tok/s with attention over {best[3]} cached "
              "positions, half the planned --ctx)", file=sys.stderr)
    if plan_dir.exists():
        shutil.rmtree(plan_dir)
    best[1].rename(plan_dir)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _check_outputs(out: Path, flash_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise HetinferError(f"-o {out} exists and is not a directory; a deployment is a directory, pick another path")
    if not flash_dir.is_dir():
        raise HetinferError(f"--flash-dir {flash_dir} is not a directory; create it on the disk that should serve "
                            "the flash neurons (e.g. mkdir -p {flash_dir})".replace("{flash_dir}", str(flash_dir)))
    if not os.access(flash_dir, os.W_OK | os.X_OK):
        raise HetinferError(f"--flash-dir {flash_dir} is not writable; pick a directory you can write to")
    out.mkdir(parents=True, exist_ok=True)


def _valid(load, what: str, path: Path) -> bool:
    """Whether the artefact at `path` loads; a present but unusable one is reported and redone."""
    if not path.exists():
        return False
    try:
        load()
        print(f"[{what}] reusing {path}", file=sys.stderr)
        return True
    except ArtifactError as e:
        print(f"[{what}] remaking it: {e}", file=sys.stderr)
        return False


def _step(title: str, argv: list[str]) -> None:
    """Run one step exactly as its own command would (`hetinfer ARGV`)."""
    from hetinfer.cli import build_parser

    print(f"[{title}] hetinfer {' '.join(argv)}", file=sys.stderr)
    args = build_parser().parse_args(argv)
    args.run(args)


def _load_profile(path: Path, model):
    from hetinfer.profiler.artifact import load_profile

    return load_profile(str(path), model)


def _load_predictors(path: Path, model):
    from hetinfer.profiler.predictors import load_predictors

    return load_predictors(str(path), model)


def _check_plan(path: Path, wanted: dict):
    """The plan at `path` if it was made from these inputs (budget, context, window, predictors, flash dir)."""
    from hetinfer.placement import load_plan

    plan = load_plan(path)
    m = plan.manifest
    hw = m["hardware"]
    have = {"ram": hw["ram"]["capacity_bytes"] if wanted["ram"] is not None else None,
            "gpu_mem": (hw["gpu"] or {}).get("capacity_bytes") if wanted["gpu_mem"] is not None and hw.get("gpu")
            else (0 if wanted["gpu_mem"] == 0 else None),
            "ctx": m["model"]["n_ctx"], "kv": plan.kv_dtype, "window": m["window_tokens"],
            "predictors": m["predictors"]["source"],
            "flash_dir": os.path.abspath((hw.get("flash") or {}).get("dir", ""))}
    # a plan that computes every neuron was weighed against these predictors (or asked for without any)
    diff = [k for k in wanted if have[k] != wanted[k] and not (k == "window" and wanted[k] is None)
            and not (k == "predictors" and have[k] is None and m["window_tokens"] == 0)]
    if diff:
        raise ArtifactError(f"{path}: made for another {', '.join(diff)}")
    return plan


def _rel(path, base: Path) -> str:
    """`path` relative to `base` when it lies inside it (so the deployment can move), else absolute."""
    p, b = Path(path).resolve(), base.resolve()
    return str(p.relative_to(b)) if p.is_relative_to(b) else str(p)


# ---------------------------------------------------------------------------------------------
# opening a deployment
# ---------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    path: Path
    manifest: dict
    model: object  # hetinfer.loader.Model
    plan: object  # hetinfer.placement.Plan
    store: object  # hetinfer.offload.store.Store
    predictors: object  # hetinfer.profiler.predictors.Predictors


def load_deployment(path: str | Path, weights: str | None = None) -> Deployment:
    """Read and validate DEPLOY/deployment.json and everything it names."""
    from hetinfer.loader import load_model
    from hetinfer.offload.store import open_store
    from hetinfer.placement import load_plan

    d = Path(path)
    try:
        m = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise DeploymentError(f"{d}: no {MANIFEST}; not a deployment (make one with `hetinfer prepare -o {d} ...`)") from None
    except (OSError, ValueError) as e:
        raise DeploymentError(f"{d / MANIFEST}: unreadable ({e}); {REDO}") from None
    if not isinstance(m, dict) or m.get("format") != DEPLOY_FORMAT:
        raise DeploymentError(f"{d / MANIFEST}: not a hetinfer deployment (format is not {DEPLOY_FORMAT!r})")
    if m.get("version") != DEPLOY_VERSION:
        raise DeploymentError(f"{d / MANIFEST}: deployment version {m.get('version')!r}, this hetinfer reads "
                              f"{DEPLOY_VERSION}; {REDO}")
    try:
        model_path = _resolve(d, m["model"]["path"])
        fp = m["model"]["fingerprint"]
        parts = {k: _resolve(d, m[k]) for k in ("profile", "plan", "store")}
        parts["predictors"] = m["predictors"] and _resolve(d, m["predictors"])  # None: every neuron is computed
        stored_weights = m["weights"]
    except (KeyError, TypeError) as e:
        raise DeploymentError(f"{d / MANIFEST}: missing or bad field {e}; {REDO}") from None
    if not os.path.exists(model_path):
        raise DeploymentError(f"the model file of deployment {d} is gone ({model_path}); put it back there, or "
                              f"{REDO} with -m pointing at it")
    model = load_model(model_path, weights=weights or stored_weights)
    if model.fingerprint != fp:
        raise DeploymentError(f"{model_path} is not the model deployment {d} was prepared for (fingerprint "
                              f"{model.fingerprint}, expected {fp}); {REDO}")
    plan = load_plan(parts["plan"])
    if plan.config.to_dict() != model.config.to_dict():
        raise DeploymentError(f"{parts['plan']}: the plan is for another model; {REDO}")
    store = open_store(parts["store"], model)
    predictors = parts["predictors"] and _load_predictors(Path(parts["predictors"]), model)
    return Deployment(d, m, model, plan, store, predictors)


def _resolve(base: Path, p: str) -> str:
    return str(p) if os.path.isabs(p) else str(base / p)


def is_deployment(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def tier_counts(plan) -> np.ndarray:
    """int64 [n_layers, 3]: neurons per layer on the gpu, ram and flash tiers."""
    return np.stack([(plan.tiers == t).sum(axis=1) for t in range(3)], axis=1).astype(np.int64)


def cache_capacity(plan, record_bytes: list[int]) -> np.ndarray:
    """int64 [n_layers]: window-cache slots per layer, the bytes the plan reserved for the layer's window
    cache (`Plan.layer_window_cache_bytes`) in records of `record_bytes` [n_layers]; never more slots than
    the layer has flash neurons. A plan without a window (k = 0) keeps nothing across tokens: its layers
    share two look-ahead pools of `placement.cost.FLASH_POOL_BYTES` (TieredFFN), which hold the next
    layer's look-ahead reads while this one computes."""
    from hetinfer.placement.cost import FLASH_POOL_BYTES

    record_bytes = np.asarray(record_bytes, dtype=np.int64)
    pool = FLASH_POOL_BYTES if plan.manifest["window_tokens"] == 0 else plan.layer_window_cache_bytes
    return np.minimum(pool // record_bytes, tier_counts(plan)[:, 2])


def plan_streams(plan, window: int, n_flash: np.ndarray, record_bytes: list[int]) -> bool:
    """Whether the engine streams whole flash spans (`placement.cost.streams_flash`) for `n_flash` [n_layers]
    flash records per layer and a window cache of `window` tokens: as the plan decided (`tiers.flash.streamed`,
    which sized its I/O buffers for it), or for a plan written before that field, as the cost model decides at
    the plan's own expected miss density (misses per token over flash neurons)."""
    from hetinfer.placement.cost import spans_fit_pools, streams_flash
    from hetinfer.placement.hardware import Hardware

    flash = plan.manifest["tiers"].get("flash")
    if not flash or "misses_per_token" not in flash or not np.any(n_flash) or window:
        return False
    if "streamed" in flash:  # decided for whole layers, so any split of them fits the pools
        return bool(flash["streamed"]) and spans_fit_pools(n_flash, record_bytes)
    q = flash["misses_per_token"] / max(flash["neurons"], 1)
    hw = Hardware.from_dict(plan.manifest["hardware"], "plan hardware")
    return streams_flash(window, q, n_flash, np.asarray(record_bytes), hw.flash)


def tiered_ffn(store, curve, select, resident: np.ndarray, capacity: np.ndarray, window: int, activation: str,
               threads: int | None = None, direct: bool | None = None, lookahead: bool = True, gpu=None,
               stream_pool_bytes: int = 0, device_select=None):
    """The engine's TieredFFN over `store` (and `gpu`, the GPU tier's executor, if any), reading its records file through a FlashReader (`curve`: the
    plan's FlashTier, or None), with the flash I/O buffers the plan counted: the reader's staging
    (STAGING_KEPT buffers) and the FFN's scratch add up to `placement.cost.FLASH_IO_BYTES`, and reads
    are split at FLASH_MAX_READ, as the cost model prices them. `stream_pool_bytes` > 0 streams whole flash
    spans through two pools of that size (`TieredFFN`), the look-ahead pools a plan without a window counts."""
    from hetinfer.offload.ffn import TieredFFN
    from hetinfer.offload.reader import STAGING_KEPT, FlashReader
    from hetinfer.placement.cost import FLASH_IO_BYTES, FLASH_MAX_READ

    staging = FLASH_IO_BYTES // (2 * STAGING_KEPT)  # half the buffers for staging, half for scratch
    reader = FlashReader(store.data_path, curve, threads=threads, direct=direct, max_read=FLASH_MAX_READ,
                         staging_bytes=staging)
    return TieredFFN(store, reader, select, resident, capacity, window, activation,
                     scratch_bytes=FLASH_IO_BYTES - STAGING_KEPT * staging, lookahead=lookahead, gpu=gpu,
                     stream_pool_bytes=stream_pool_bytes, device_select=device_select)


def open_session(dep: Deployment, n_ctx: int | None = None, every_neuron: bool = False, direct: bool | None = None,
                 lookahead: bool = True, threads: int | None = None, kv: str | None = None,
                 device: str | None = None, resident: np.ndarray | None = None, capacity: np.ndarray | None = None,
                 select=None, window: int | None = None, stream: bool | None = None):
    """A Session whose FFN executes the deployment's plan (`every_neuron`: the exact mode, --sparsity 0), with
    a KV cache of element type `kv` (default: the one the plan counted); `device`: where GPU-tier neurons
    run (see `gpu.resolve_device`).

    The overrides make the baselines of benchmarks/offload.py configurations of this same engine:
    `resident` (int [n_layers]) records per layer held in RAM instead of the plan's RAM tier (zeros:
    all flash; n_ff: all RAM), `capacity` (int [n_layers]) window-cache slots instead of the plan's
    (zeros: no window cache), `select(layer, h) -> ids | None` the active sets instead of the
    predictors (a synthetic trace; needed when `dep.predictors` is None), `window` tokens a flash neuron
    stays in the window cache instead of the plan's, `direct=False` reads through the page cache, `stream`
    whether to stream whole flash spans (default: as the plan priced it, `plan_streams`)."""
    from hetinfer.generate import Session
    from hetinfer.placement.cost import FLASH_POOL_BYTES
    from hetinfer.placement.hardware import Hardware

    counts = tier_counts(dep.plan)
    gpu = None
    on_gpu = counts[:, 0].any() or dep.plan.head_on_gpu or dep.plan.gpu_attention_layers
    if device is not None or on_gpu:  # the GPU tier loads torch: a plan without one never does
        from hetinfer.offload.gpu import open_executor

        gpu = open_executor(dep, counts[:, 0], device)
    hw = Hardware.from_dict(dep.plan.manifest["hardware"], f"{dep.path}: plan hardware")
    device_select = None
    if select is None and (every_neuron or dep.predictors is None):  # a deployment without predictors computes every neuron
        select = lambda layer, h: None  # noqa: E731
    elif select is None:
        select = dep.predictors.rows
        if gpu is not None:  # a layer whose attention runs on the GPU runs its predictor there
            device_select = dep.predictors.device_rows
    if resident is None:
        resident = counts[:, 1]
    if capacity is None:
        capacity = cache_capacity(dep.plan, [L.record_bytes for L in dep.store.layers])
    capacity = np.minimum(capacity, dep.model.config.n_ff - counts[:, 0] - np.asarray(resident))  # no slots for resident neurons
    window = dep.manifest["window"] if window is None else window
    if stream is None:
        record_bytes = [L.record_bytes for L in dep.store.layers]
        stream = plan_streams(dep.plan, window, dep.model.config.n_ff - counts[:, 0] - np.asarray(resident), record_bytes)
    ffn = tiered_ffn(dep.store, hw.flash, select, resident, capacity, window, dep.model.config.activation,
                     threads=threads, direct=direct, lookahead=lookahead, gpu=gpu,
                     stream_pool_bytes=FLASH_POOL_BYTES if stream else 0, device_select=device_select)
    session = Session(dep.model, n_ctx=n_ctx or dep.manifest["ctx"], ffn=ffn, kv=kv or dep.plan.kv_dtype)
    from hetinfer.info import component_bytes

    parts = component_bytes(dep.model)
    del parts["ffn"]
    cfg = dep.model.config
    on_host = sum(type(k) is np.ndarray for k in session.cache.k_layers)  # layers whose KV cache is in RAM
    ffn.dense_bytes = {**parts, "kv_cache": cfg.kv_cache_bytes(session.n_ctx, session.cache.dtype) * on_host // cfg.n_layers}
    return session
