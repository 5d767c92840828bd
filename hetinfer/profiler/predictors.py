"""Per-layer low-rank activation predictors (Deja Vu / PowerInfer style): the artefact and its use.

Per layer: logits = W2 relu(W1 h), h the post-norm FFN input, W1 [r, d], W2 [n_ff, r], no bias;
the engine computes the neurons whose logit exceeds the layer's calibrated threshold (one kernel
call per token: `Predictors.rows`). The weights are numpy arrays, so a deployment that runs its
predictors never imports torch; `logits` and `mask`, the batched float32 reference the evaluation
and the training use, take torch views of them. `hetinfer.profiler.train` trains them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hetinfer import kernels
from hetinfer.errors import ArtifactError
from hetinfer.tensors import QTensor
from hetinfer.profiler.artifact import (COMMON_SCHEMA, check_fingerprint, check_layer_ids, read_manifest,
                                        read_tensors, write_artifact)
from hetinfer.schema import NUMBER, MapOf, Nullable, dataclass_schema

if TYPE_CHECKING:
    import torch

PREDICTORS_FORMAT = "hetinfer-predictors"
PREDICTORS_VERSION = 1
MADE_BY = "hetinfer train-predictors"


def predict_logits(w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[T, n_ff] logits of the low-rank predictor for h [T, d] (torch tensors: training's and the references' form)."""
    return (h @ w1.T).relu() @ w2.T


@dataclass
class TrainOptions:
    sparsity: float = 0.5  # profiled level that defines "active" (labels) and the density budget 1 - sparsity
    recall: float = 0.95  # recall of activation mass the threshold is calibrated to
    density: float | None = None  # instead: calibrate each layer's threshold to this predicted density
    ranks: tuple[int, ...] = (16, 32, 64, 128)  # candidates, capped by max_param_ratio
    max_param_ratio: float = 0.15  # predictor parameters / FFN parameters
    max_flops_ratio: float = 0.10  # predictor FLOPs / FFN FLOPs skipped at the density budget
    epochs: int = 10  # one-cycle learning-rate schedule over this many epochs
    patience: int = 3  # stop after this many epochs without a better validation recall
    batch: int = 512
    lr: float = 2e-2  # peak learning rate
    seed: int = 0


@dataclass
class LayerReport:
    layer: int
    rank: int
    recall: float  # of activation mass, validation
    precision: float  # predicted-active neurons that are active
    density: float  # predicted-active fraction of neurons, validation
    label_density: float  # truly active fraction at the target sparsity, validation
    params: int
    ffn_params: int
    flops_vs_saved: float  # predictor FLOPs / FFN FLOPs skipped at this density
    epochs: int
    tried: dict = field(default_factory=dict)  # rank -> density at the recall target (recall at the density)


@dataclass
class Predictors:
    """Per-layer predictors with their thresholds (see docs/formats/predictors.md)."""

    manifest: dict
    w1: list[np.ndarray]  # float32 [r_l, d]
    w2: list[np.ndarray]  # float32 [n_ff, r_l]
    threshold: np.ndarray  # float32 [n_layers]
    path: str | None = None
    _kernel_weights: list | None = field(default=None, repr=False, compare=False)  # see kernel_weights, made at first use
    _device_weights: dict = field(default_factory=dict, repr=False, compare=False)  # see device_rows

    def logits(self, layer: int, h: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 [T, n_ff] for h [T, d], in torch (the batched reference)."""
        import torch

        return predict_logits(torch.as_tensor(self.w1[layer]), torch.as_tensor(self.w2[layer]), torch.as_tensor(h))

    def mask(self, layer: int, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """bool [T, n_ff]: the neurons to compute for h [T, d], of h's kind (numpy: the engine's prompts)."""
        if isinstance(h, np.ndarray):
            return np.maximum(h @ self.w1[layer].T, 0) @ self.w2[layer].T > self.threshold[layer]
        return self.logits(layer, h) > float(self.threshold[layer])

    def rows(self, layer: int, h: np.ndarray) -> np.ndarray:
        """The ids of `mask` for one token h [1, d], ascending, from one kernel call (decode's path;
        float32 sums in another order than torch's, so a logit within ~1e-6 of the threshold may fall
        on the other side)."""
        w1, w2_t, threshold = self.kernel_weights(layer)
        return kernels.predict_rows(w1, w2_t, h, threshold)

    def device_rows(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """`rows` for h [1, d] on a GPU (a layer whose attention runs there), computed there: ascending int64
        ids on h's device, from the layer's predictor copied to that device at its first call."""
        key = (layer, h.device)
        if key not in self._device_weights:
            w1, w2_t, threshold = self.kernel_weights(layer)
            self._device_weights[key] = (kernels.to_cuda(w1, h.device), kernels.to_cuda(w2_t, h.device), threshold)
        w1, w2_t, threshold = self._device_weights[key]
        return kernels.predict_rows(w1, w2_t, h, threshold, on_device=True)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of the layer's predictor (float32 W1 and W2)."""
        return int(self.w1[layer].nbytes + self.w2[layer].nbytes)

    def kernel_weights(self, layer: int) -> tuple[QTensor, QTensor, float]:
        """(W1 [r, d], W2 transposed [r, n_ff], threshold) of `layer` as `kernels.predict_rows` takes them."""
        if self._kernel_weights is None:
            self._kernel_weights = [(QTensor("f32", tuple(a.shape), np.ascontiguousarray(a, np.float32)),
                                     QTensor("f32", (b.shape[1], b.shape[0]), np.ascontiguousarray(b.T, np.float32)),
                                     float(t))
                                    for a, b, t in zip(self.w1, self.w2, self.threshold)]
        return self._kernel_weights[layer]

    def density(self) -> np.ndarray:
        """float64 [n_layers]: the share of neurons each layer's predictor selected on its validation
        samples (the training report); 1 for a layer without one (threshold -inf: every neuron)."""
        d = np.ones(len(self.w1))
        for r in self.manifest.get("report", []):
            d[r["layer"]] = r["density"]
        return d

    def selection_frequency(self, inputs: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """float64 [n_layers, n_ff]: the share of FFN inputs (float32 [n_layers, S, d], e.g.
        `Profile.samples()[0]`) for which `mask` selects each neuron: how often the engine computes it."""
        import torch

        count = np.zeros((len(self.w1), self.w2[0].shape[0]))
        with torch.no_grad():
            for layer in range(len(self.w1)):
                for lo in range(0, inputs.shape[1], chunk):
                    count[layer] += self.mask(layer, torch.from_numpy(inputs[layer, lo:lo + chunk])).sum(0).numpy()
        return count / max(inputs.shape[1], 1)

    def check_model(self, model) -> None:
        check_fingerprint(self.manifest, model, f"predictors {self.path or ''}".strip(), MADE_BY)

    def save(self, path: str) -> None:
        L, rmax = len(self.w1), max(w.shape[0] for w in self.w1)
        d, n_ff = self.w1[0].shape[1], self.w2[0].shape[0]
        w1 = np.zeros((L, rmax, d), np.float32)
        w2 = np.zeros((L, n_ff, rmax), np.float32)
        for i in range(L):  # zero padding: unused hidden units are 0 after the ReLU and add nothing
            r = self.w1[i].shape[0]
            w1[i, :r], w2[i, :, :r] = self.w1[i], self.w2[i]
        tensors = {"layer_ids": np.arange(L, dtype=np.int32), "rank": np.array([w.shape[0] for w in self.w1], np.int32),
                   "w1": w1, "w2": w2, "threshold": np.asarray(self.threshold, np.float32)}
        write_artifact(path, PREDICTORS_FORMAT, dict(self.manifest, version=PREDICTORS_VERSION),
                       {"predictors.safetensors": tensors})
        self.path = os.path.abspath(path)


PREDICTORS_SCHEMA = COMMON_SCHEMA | {
    "profile": {"path": Nullable(str), "created": Nullable(str), "tokens": int},
    "options": dataclass_schema(TrainOptions, defaults_omittable=False),
    "report": [dataclass_schema(LayerReport, defaults_omittable=False) | {"tried": MapOf(NUMBER)}],
    "summary": MapOf(NUMBER),
}


def load_predictors(path: str, model=None) -> Predictors:
    """Read and validate a predictors directory; with `model`, also check it was made for that model."""
    manifest = read_manifest(path, PREDICTORS_FORMAT, PREDICTORS_VERSION, "predictors", MADE_BY, PREDICTORS_SCHEMA)
    t = read_tensors(path, manifest, "predictors.safetensors", ("layer_ids", "rank", "w1", "w2", "threshold"), MADE_BY)
    cfg = manifest["model"]["config"]
    L, d, n_ff = cfg["n_layers"], cfg["d_model"], cfg["n_ff"]
    check_layer_ids(t, L, f"{path}/predictors.safetensors", MADE_BY)
    rmax = t["w1"].shape[1] if t["w1"].ndim == 3 else -1
    if (t["w1"].shape != (L, rmax, d) or t["w2"].shape != (L, n_ff, rmax) or t["threshold"].shape != (L,)
            or t["rank"].shape != (L,) or not ((t["rank"] >= 1) & (t["rank"] <= rmax)).all()):
        raise ArtifactError(f"{path}: predictor tensors do not fit the model in the manifest ({L} layers, d {d}, "
                            f"n_ff {n_ff}); the artefact is inconsistent, re-run `{MADE_BY}`")
    ranks = t["rank"].tolist()
    w1 = [t["w1"][i, :r].copy() for i, r in enumerate(ranks)]
    w2 = [t["w2"][i, :, :r].copy() for i, r in enumerate(ranks)]
    p = Predictors(manifest, w1, w2, t["threshold"].copy(), os.path.abspath(path))
    if model is not None:
        p.check_model(model)
    return p
