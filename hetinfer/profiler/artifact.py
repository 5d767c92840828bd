"""On-disk artefacts of the offline tools: the activation profile (and the shared directory format).

An artefact is a directory: `manifest.json` (format name, version, model fingerprint, what made
it, sha256 of every tensor file) plus safetensors files whose tensors are stacked per layer with
an explicit `layer_ids` tensor. It is written into a temporary directory next to the target and
renamed into place (`hetinfer.atomic.atomic_dir`), so readers never see half of one. See docs/formats/profile.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from hetinfer.atomic import atomic_dir
from hetinfer.config import config_from_manifest
from hetinfer.errors import ArtifactError
from hetinfer.schema import NUMBER, MapOf, Omittable, validate

PROFILE_FORMAT = "hetinfer-profile"
PROFILE_VERSION = 1
LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # target sparsities with stored thresholds
HIST_EDGES = np.logspace(-7, 5, 12 * 60 + 1).astype(np.float32)  # |act| histogram bin edges, 60 per decade

# What every artefact directory's manifest holds (docs/formats/profile.md, predictors.md); `model.config` is
# checked as a ModelConfig.
COMMON_SCHEMA = {
    "format": str, "version": int, "hetinfer_version": str, "created": str, "seconds": Omittable(NUMBER),
    "model": {"path": str, "fingerprint": str, "config": dict},
    "layers": [int],
    "files": MapOf({"bytes": int, "sha256": str}),
}
PROFILE_SCHEMA = COMMON_SCHEMA | {
    "tokens": int, "sequences": int,
    "sources": [{"path": str, "slice": [NUMBER], "kind": str, "sha256": str, "sequences": int, "tokens": int}],
    "options": {"samples": int, "coact_tokens": int, "coact_neighbors": int, "coact_level": NUMBER, "dtype": str,
                "chunk": int, "seed": int},
    "summary": {"achieved_sparsity": MapOf(NUMBER), "top20_share": MapOf(NUMBER), "natural_sparsity": NUMBER},
}

STATS_TENSORS = ("layer_ids", "levels", "thresholds", "active_count", "nonzero_count", "abs_sum", "hist_edges",
                 "hist", "coact_neighbors", "coact_jaccard", "neuron_order")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_artifact(path: str, kind: str, manifest: dict, files: dict[str, dict[str, np.ndarray]]) -> None:
    """Write `files` (name -> tensors) and `manifest.json` as directory `path`, atomically.

    An existing `path` is replaced only if it is an artefact of the same kind."""
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path):
        try:
            old_kind = read_manifest(path)["format"]
        except ArtifactError:
            old_kind = None
        if old_kind != kind:
            raise ArtifactError(f"refusing to overwrite {path}: it is not a {kind} artefact; choose another output path")
    manifest = dict(manifest, format=kind, files={})
    with atomic_dir(path) as tmp:
        for name, tensors in files.items():
            fpath = os.path.join(tmp, name)
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, fpath)
            manifest["files"][name] = {"bytes": os.path.getsize(fpath), "sha256": _sha256(fpath)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_manifest(path: str, kind: str | None = None, version: int | None = None, what: str = "artefact",
                  made_by: str = "hetinfer", schema: dict | None = None) -> dict:
    """The parsed manifest of artefact directory `path`, checked for format and version and, with `schema`,
    every field (`model.config` as a ModelConfig)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path) or not os.path.isfile(mpath):
        raise ArtifactError(f"{what} not found at {path} (no manifest.json); create it with `{made_by}`")
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{mpath} is unreadable ({e}); re-run `{made_by}`") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise ArtifactError(f"{mpath} has no format field; it is not a hetinfer artefact, re-run `{made_by}`")
    if kind is not None and manifest["format"] != kind:
        raise ArtifactError(f"{path} is a {manifest['format']} artefact, not a {kind}; pass a {what} made by `{made_by}`")
    if version is not None and manifest.get("version") != version:
        raise ArtifactError(f"{what} {path} has format version {manifest.get('version')} but this hetinfer reads "
                            f"version {version}; re-run `{made_by}`")
    if schema is not None:
        fix = f"the manifest was edited or damaged, re-run `{made_by}`"
        validate(manifest, schema, mpath, fix)
        config_from_manifest(manifest["model"]["config"], mpath, fix)
    return manifest


def read_tensors(path: str, manifest: dict, name: str, required: tuple[str, ...], made_by: str) -> dict[str, np.ndarray]:
    """Tensors of file `name` in artefact `path`, after checking its recorded size and sha256."""
    from safetensors.numpy import load_file

    fpath = os.path.join(path, name)
    rec = manifest.get("files", {}).get(name)
    if rec is None or not os.path.isfile(fpath):
        raise ArtifactError(f"{path} is missing {name}; the artefact is incomplete, re-run `{made_by}`")
    if os.path.getsize(fpath) != rec["bytes"] or _sha256(fpath) != rec["sha256"]:
        raise ArtifactError(f"{fpath} does not match the checksum in its manifest (corrupt or modified); re-run `{made_by}`")
    try:
        tensors = load_file(fpath)
    except Exception as e:  # safetensors raises several types for damaged headers
        raise ArtifactError(f"{fpath} is not a readable safetensors file ({e}); re-run `{made_by}`") from None
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ArtifactError(f"{fpath} lacks tensors {', '.join(missing)}; re-run `{made_by}`")
    return tensors


def check_fingerprint(manifest: dict, model, what: str, made_by: str) -> None:
    want = manifest["model"]["fingerprint"]
    if want != model.fingerprint:
        raise ArtifactError(f"{what} was made for model fingerprint {want} but this model ({model.path}) is "
                            f"{model.fingerprint}; re-run `{made_by}` for this model")


def check_layer_ids(tensors: dict[str, np.ndarray], n_layers: int, where: str, made_by: str) -> None:
    ids = tensors["layer_ids"]
    if ids.shape != (n_layers,) or not np.array_equal(ids, np.arange(n_layers)):
        raise ArtifactError(f"{where} holds layers {ids.tolist()} but the model has {n_layers} (0..{n_layers - 1}); "
                            f"re-run `{made_by}`")


@dataclass
class Profile:
    """Activation statistics of one model on calibration text (see docs/formats/profile.md)."""

    manifest: dict
    stats: dict[str, np.ndarray]
    path: str | None = None
    _samples: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        return self.manifest["model"]["config"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def n_layers(self) -> int:
        return int(self.config["n_layers"])

    @property
    def n_ff(self) -> int:
        return int(self.config["n_ff"])

    @property
    def levels(self) -> np.ndarray:
        return self.stats["levels"]

    def level_index(self, sparsity: float) -> int:
        hits = np.flatnonzero(np.abs(self.levels - sparsity) < 1e-6)
        if not len(hits):
            raise ValueError(f"sparsity {sparsity:g} is not a profiled level; levels: {', '.join(f'{s:g}' for s in self.levels)}")
        return int(hits[0])

    def thresholds(self, sparsity: float) -> np.ndarray:
        """Per-layer |activation| threshold [n_layers] below which a fraction `sparsity` of activations fall.

        Profiled levels (0.1 .. 0.9) return the stored quantiles; other values interpolate the histogram."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity:g}")
        if np.any(np.abs(self.levels - sparsity) < 1e-6):
            return self.stats["thresholds"][:, self.level_index(sparsity)].copy()
        return np.array([hist_quantile(self.stats["hist"][i], self.stats["hist_edges"], sparsity)
                         for i in range(self.n_layers)], dtype=np.float32)

    def activation_frequency(self, sparsity: float = 0.5) -> np.ndarray:
        """float32 [n_layers, n_ff]: the fraction of calibration tokens in which each neuron's |activation|
        exceeds its layer's threshold for `sparsity` (a profiled level). For ReLU-family models the
        threshold is never below 0, so at sparsities under the natural one, active means > 0."""
        counts = self.stats["active_count"][:, self.level_index(sparsity)]
        return (counts / self.tokens).astype(np.float32)

    def mean_abs_activation(self) -> np.ndarray:
        """float32 [n_layers, n_ff]: mean |activation| of each neuron over the calibration tokens."""
        return (self.stats["abs_sum"] / self.tokens).astype(np.float32)

    def neuron_order(self, layer: int) -> np.ndarray:
        """int64 [n_ff]: all neurons of `layer` ordered so co-active ones are adjacent (hottest first)."""
        return self.stats["neuron_order"][layer].astype(np.int64)

    def coactivation(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(neighbors int64 [n_ff, m], jaccard float32 [n_ff, m]): each neuron's m most co-active neurons."""
        return self.stats["coact_neighbors"][layer].astype(np.int64), self.stats["coact_jaccard"][layer]

    def check_model(self, model) -> None:
        """Raise ArtifactError unless this profile was made for `model` (same fingerprint)."""
        check_fingerprint(self.manifest, model, f"profile {self.path or ''}".strip(), "hetinfer profile")

    @property
    def has_samples(self) -> bool:
        """Whether the profile kept FFN inputs (`samples`): profiles made with --samples 0 did not."""
        return self._samples is not None or "samples.safetensors" in self.manifest.get("files", {})

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs float32 [n_layers, S, d] post-norm FFN inputs, sequence int64 [S] calibration sequence ids)."""
        if self._samples is None:
            if self.path is None:
                raise ArtifactError("this profile has no samples; profile with samples > 0")
            t = read_tensors(self.path, self.manifest, "samples.safetensors",
                             ("layer_ids", "inputs", "input_scale", "sequence"), "hetinfer profile")
            check_layer_ids(t, self.n_layers, f"{self.path}/samples.safetensors", "hetinfer profile")
            self._samples = t
        t = self._samples
        inputs = t["inputs"].astype(np.float32) * t["input_scale"][:, None, None]
        return inputs, t["sequence"].astype(np.int64)

    def save(self, path: str, samples: dict[str, np.ndarray] | None = None) -> None:
        files = {"stats.safetensors": self.stats}
        samples = samples if samples is not None else self._samples
        if samples is not None:
            files["samples.safetensors"] = samples
        write_artifact(path, PROFILE_FORMAT, dict(self.manifest, version=PROFILE_VERSION), files)
        self.path = os.path.abspath(path)
        self._samples = samples


def hist_quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The q-quantile of |activation| from a histogram with an underflow bin first and an overflow bin last
    (log-linear interpolation inside a bin; values in the underflow bin count as 0)."""
    cum = np.cumsum(hist) / max(1, hist.sum())
    b = int(np.searchsorted(cum, q, side="right"))
    if b == 0:
        return 0.0
    if b >= len(hist) - 1:
        return float(edges[-1])
    lo, hi = np.log(edges[b - 1]), np.log(edges[b])
    before = cum[b - 1]
    frac = (q - before) / max(cum[b] - before, 1e-12)
    return float(np.exp(lo + frac * (hi - lo)))


def load_profile(path: str, model=None) -> Profile:
    """Read and validate a profile directory; with `model`, also check it was made for that model."""
    manifest = read_manifest(path, PROFILE_FORMAT, PROFILE_VERSION, "profile", "hetinfer profile", PROFILE_SCHEMA)
    stats = read_tensors(path, manifest, "stats.safetensors", STATS_TENSORS, "hetinfer profile")
    cfg = manifest["model"]["config"]
    L, n_ff = cfg["n_layers"], cfg["n_ff"]
    check_layer_ids(stats, L, f"{path}/stats.safetensors", "hetinfer profile")
    S, m = len(stats["levels"]), stats["coact_neighbors"].shape[-1]
    want = {"thresholds": (L, S), "active_count": (L, S, n_ff), "nonzero_count": (L, n_ff), "abs_sum": (L, n_ff),
            "hist": (L, len(stats["hist_edges"]) + 1), "coact_neighbors": (L, n_ff, m),
            "coact_jaccard": (L, n_ff, m), "neuron_order": (L, n_ff)}
    for k, shape in want.items():
        if stats[k].shape != shape:
            raise ArtifactError(f"{path}: {k} has shape {stats[k].shape}, expected {shape} for the model in the "
                                "manifest; the profile is inconsistent, re-run `hetinfer profile`")
    profile = Profile(manifest, stats, os.path.abspath(path))
    if model is not None:
        profile.check_model(model)
    return profile
