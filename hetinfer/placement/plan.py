"""The plan artefact: which tier every FFN neuron lives on, and why (docs/formats/plan.md).

A plan is a directory holding `plan.json` (the versioned manifest) and `tiers.<sha>.npy`
(uint8 [n_layers, n_ff], codes 0 gpu / 1 ram / 2 flash). The array is written first under a
name carrying its hash, then the manifest replaces the old one atomically, so a reader sees
the old plan or the new one, never a mix; `load_plan` checks the hash, shape and counts.
Reading needs no solver: this module imports neither PuLP nor the cost model (`manifest.py`
builds what `hetinfer place` writes).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetinfer.atomic import atomic_write, atomic_write_json, remove_stale
from hetinfer.config import KV_DTYPES, ModelConfig, config_from_manifest
from hetinfer.errors import ArtifactError
from hetinfer.placement.hardware import hardware_schema
from hetinfer.schema import NUMBER, MapOf, Nullable, Omittable, validate
from hetinfer.tiers import FLASH, GPU, RAM, TIERS

PLAN_FORMAT = "hetinfer.plan"
PLAN_VERSION = 2  # 2: per-layer window-cache bytes, flash priced by packed records (docs/formats/plan.md)
MANIFEST = "plan.json"
_ARRAY = re.compile(r"tiers\.[0-9a-f]{16}\.npy")


class PlanError(ArtifactError):
    """A plan that cannot be used; the message names the problem and the fix."""


_TIER = {"capacity_bytes": int, "used_bytes": int, "dense_bytes": int, "neuron_bytes": int, "neurons": int,
         "neuron_share": NUMBER, "activation_share": NUMBER, "seconds_per_token": NUMBER}
_SECONDS = Nullable(NUMBER)


def plan_schema() -> dict:
    """Every field of plan.json and its JSON type (docs/formats/plan.md); `layers` rows are checked against
    the tiers present by `load_plan`."""
    return {
        "format": str, "version": int, "created": str, "prediction": bool, "assumptions": [str],
        "inputs": MapOf(str),
        "model": {"config": dict, "formats": MapOf(str), "n_ctx": int, "neuron_bytes": [int],
                  "record_bytes": [int], "layer_dense_bytes": [int], "kv_bytes_per_layer": int,
                  "kv_dtype": Omittable(str)},
        "profile": {"source": Nullable(str), "model": Nullable(str), "tokens": int, "sparsity": Nullable(NUMBER),
                    "synthesis": Nullable(dict)},
        "predictors": {"source": Nullable(str), "bytes": Nullable(str), "layer_bytes": [int], "flops_per_token": int,
                       "seconds_per_token": NUMBER},
        "hardware": hardware_schema(),
        "window_tokens": int,
        "dense": {"head": str, "embeddings": str, "seconds_per_token": NUMBER,
                  "fixed_seconds_per_token": Omittable(NUMBER),
                  "attention_seconds_per_token": Omittable(NUMBER), "flash_io_bytes": Omittable(int),
                  "offload_seconds_per_token": Omittable(NUMBER)},
        "tiers": {"gpu": Omittable(_TIER), "ram": _TIER | {"window_cache_bytes": int},
                  "flash": Omittable(_TIER | {"reads_per_token": NUMBER, "read_bytes_per_token": NUMBER,
                                                "misses_per_token": Omittable(NUMBER), "streamed": Omittable(bool),
                                                "streamed_layers": Omittable(int),
                                                "stream_seconds_per_token": Omittable(NUMBER),
                                                "hidden_seconds_per_token": Omittable(NUMBER)})},
        "layers": [{"attention": str, "split": bool, "window_cache_bytes": int}],
        "sync": {"seconds": NUMBER, "split_layers": int, "seconds_per_token": NUMBER},
        "solver": {"chosen": str, "status": str, "objective": NUMBER, "ilp_objective": _SECONDS,
                   "greedy_objective": _SECONDS, "mip_gap": _SECONDS, "solve_seconds": NUMBER, "group_size": int,
                   "groups_per_layer": int, "binaries": int},
        "predicted": {"seconds_per_token": NUMBER, "tok_s": NUMBER},
        "arrays": {"tiers": {"file": str, "sha256": str, "dtype": str, "shape": [int]}},
    }


@dataclass
class Plan:
    manifest: dict
    tiers: np.ndarray  # uint8 [n_layers, n_ff]: TIERS index of every neuron

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"]["config"])

    def neurons(self, layer: int, tier: str) -> np.ndarray:
        """int64 ids, ascending, of the FFN neurons of `layer` that live on `tier` (gpu, ram, flash)."""
        return np.flatnonzero(self.tiers[layer] == TIERS.index(tier))

    def attention_on_gpu(self, layer: int) -> bool:
        """Whether the layer's dense parts (attention, norms, predictor, KV cache) are on the GPU."""
        return self.manifest["layers"][layer]["attention"] == "gpu"

    @property
    def gpu_attention_layers(self) -> list[int]:
        """The layers whose dense parts `attention_on_gpu`, ascending."""
        return [i for i, row in enumerate(self.manifest["layers"]) if row["attention"] == "gpu"]

    @property
    def head_on_gpu(self) -> bool:
        return self.manifest["dense"]["head"] == "gpu"

    @property
    def kv_dtype(self) -> str:
        """The KV-cache element type the plan reserved RAM for ("f32" in plans made before it was a choice)."""
        return self.manifest["model"].get("kv_dtype", "f32")

    @property
    def window_cache_bytes(self) -> int:
        """RAM reserved for flash neurons read in the last `window_tokens` tokens; the engine caps its cache here."""
        return self.manifest["tiers"]["ram"]["window_cache_bytes"]

    @property
    def layer_window_cache_bytes(self) -> np.ndarray:
        """int64 [n_layers]: each layer's share of `window_cache_bytes`, as placement sized it."""
        return np.array([row["window_cache_bytes"] for row in self.manifest["layers"]], dtype=np.int64)


def save_plan(path: str | Path, manifest: dict, tiers: np.ndarray) -> None:
    """Write the array under its hash, then swap in the manifest; stale arrays are removed after."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise PlanError(f"{d} exists and is not a directory; a plan is a directory, pick another -o")
    tiers = np.ascontiguousarray(tiers, dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, tiers, allow_pickle=False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"tiers.{sha[:16]}.npy"
    atomic_write(d / name, data)
    spec = {"file": name, "sha256": sha, "dtype": "uint8", "shape": list(tiers.shape)}
    atomic_write_json(d / MANIFEST, {**manifest, "arrays": {"tiers": spec}})
    for old in d.iterdir():
        if _ARRAY.fullmatch(old.name) and old.name != name:
            old.unlink()
    remove_stale(d)  # temporaries of arrays a killed `hetinfer place` was writing


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan directory; PlanError (one line, with the fix) when it is not usable."""
    d = Path(path)
    redo = "re-run `hetinfer place`"
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise PlanError(f"{d}: no {MANIFEST}; not a plan directory ({redo} -o {d})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{d / MANIFEST}: unreadable ({e}); {redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PLAN_FORMAT:
        raise PlanError(f"{d / MANIFEST}: not a hetinfer plan (format is not {PLAN_FORMAT!r})")
    if manifest.get("version") != PLAN_VERSION:
        raise PlanError(
            f"{d / MANIFEST}: plan version {manifest.get('version')!r}, this hetinfer reads {PLAN_VERSION}; {redo}")
    fix = f"the plan was edited or damaged, {redo}"
    validate(manifest, plan_schema(), str(d / MANIFEST), fix, PlanError)
    per_tier = {f"{t}{suffix}": kind for t in manifest["tiers"]
                for suffix, kind in (("", int), ("_bytes", int), ("_activation_share", NUMBER))}
    validate(manifest, {"layers": [per_tier]}, str(d / MANIFEST), fix, PlanError)
    try:
        config = config_from_manifest(manifest["model"]["config"], str(d / MANIFEST), fix)
    except ArtifactError as e:
        raise PlanError(str(e)) from None
    spec, layers = manifest["arrays"]["tiers"], manifest["layers"]
    window = [row.get("window_cache_bytes") for row in layers]
    window_total = manifest["tiers"]["ram"].get("window_cache_bytes")
    if not _ARRAY.fullmatch(spec["file"]):
        raise PlanError(f"{d / MANIFEST}: `arrays.tiers.file` must name a tiers.<hash>.npy file in the plan; {fix}")
    try:
        data = (d / spec["file"]).read_bytes()
    except OSError as e:
        raise PlanError(f"{d}: tier array unreadable ({e}); {redo}") from None
    if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise PlanError(
            f"{d / spec['file']}: contents do not match the manifest's sha256 (modified or corrupt); {redo}")
    tiers = np.load(io.BytesIO(data), allow_pickle=False)
    want = (config.n_layers, config.n_ff)
    if tiers.dtype != np.uint8 or tiers.shape != want or list(tiers.shape) != spec.get("shape"):
        raise PlanError(f"{d}: tier array is {tiers.dtype} {tiers.shape}, the model needs uint8 {want}; {redo}")
    if tiers.size and tiers.max() > FLASH:
        raise PlanError(f"{d}: tier codes must be 0 (gpu), 1 (ram) or 2 (flash); {redo}")
    if manifest["model"].get("kv_dtype", "f32") not in KV_DTYPES:
        raise PlanError(f"{d / MANIFEST}: KV-cache dtype {manifest['model']['kv_dtype']!r} is not one of "
                        f"{', '.join(KV_DTYPES)}; {redo}")
    if len(layers) != config.n_layers:
        raise PlanError(f"{d / MANIFEST}: {len(layers)} layer entries for {config.n_layers} layers; {redo}")
    for i, row in enumerate(layers):
        for t in (GPU, RAM, FLASH):
            if row.get(TIERS[t], 0) != int((tiers[i] == t).sum()):
                raise PlanError(f"{d / MANIFEST}: layer {i} {TIERS[t]} count disagrees with the tier array; {redo}")
    if not all(type(b) is int and b >= 0 for b in window) or sum(window) != window_total:
        raise PlanError(f"{d / MANIFEST}: the layers' window_cache_bytes are not whole bytes adding up to "
                        f"tiers.ram.window_cache_bytes; {redo}")
    return Plan(manifest, tiers)
