"""Sparse FFN modes: compute only the FFN neurons a rule selects, and record how many that was.

Rules (each per token, per layer):
- threshold: neurons whose |act(gate h) * up h| exceeds the layer's profiled threshold for a
  target sparsity (TEAL/CATS). Deciding needs the whole gate/up product, so only the down
  projection is skipped: a quality reference and the mode for models without predictors.
- topk: each token's k largest |activations| (the oracle the predictors are measured against).
- predictor: a per-layer low-rank predictor reads h and picks the rows; only those rows of
  gate, up and down are computed (Deja Vu / PowerInfer).

Backends: "kernels" runs the engine's kernels on the stored weights (one token: `threshold_ffn`,
which picks and computes in one call, or `sparse_ffn` over the predicted rows; prompts: dense
gate/up, masked down); "torch" is the batched float32 reference the evaluation uses (masks applied
to dense products; the same numbers, since an unselected neuron contributes exactly nothing either way).

Stepping aside: skipping neurons only pays below some share of them, which depends on the machine
(the neuron-major down copy is q8_0, and a float axpy per neuron costs more than the dense kernel's
integer dot). `engine_ffn` measures it with the kernels' probe (`placement.probe.measure_ffn_costs`,
cached per host) and a layer whose rule is expected to keep more neurons than that runs the dense
kernel instead: the output of selecting every neuron there. The expectation can be wrong for the text at
hand (a predictor trained on WikiText can keep far more of a layer's neurons on other text than it did
in training), so a sparse layer's kept share is also measured as it runs, and the layer steps aside for
good when it passes the crossover over RECHECK_TOKENS tokens.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

import numpy as np

from hetinfer import kernels
from hetinfer.argtypes import float_in
from hetinfer.errors import HetinferError
from hetinfer.placement.cost import neuron_down_format
from hetinfer.placement.probe import FFNCosts, measure_ffn_costs
from hetinfer.profiler.artifact import load_profile
from hetinfer.profiler.predictors import Predictors, load_predictors

if TYPE_CHECKING:
    import torch

    from hetinfer.tensors import QTensor

# (layer, h, act) -> bool mask [T, n_ff]. Rules are torch references (the evaluation's batched path); the kernels
# backend applies the threshold and predictor rules to its numpy arrays itself (`_mask`), so only the torch
# backend and the top-k oracle load torch.
Rule = Callable[[int, "torch.Tensor", "torch.Tensor | None"], "torch.Tensor"]


class DensityMeter:
    """Counts selected neurons and tokens per layer (in Python numbers: counted on every layer of every
    token, where a numpy scalar update costs ten times as much)."""

    def __init__(self, n_layers: int, n_ff: int):
        self.n_ff = n_ff
        self._selected = [0.0] * n_layers
        self._tokens = [0] * n_layers

    @property
    def selected(self) -> np.ndarray:
        """float64 [n_layers]: neurons selected so far."""
        return np.array(self._selected, np.float64)

    @property
    def tokens(self) -> np.ndarray:
        """int64 [n_layers]: tokens counted so far."""
        return np.array(self._tokens, np.int64)

    def record(self, layer: int, mask: torch.Tensor) -> None:
        self.count(layer, float(mask.sum()), mask.shape[0])

    def count(self, layer: int, n_selected: int, tokens: int = 1) -> None:
        """`tokens` tokens that selected `n_selected` neurons in all."""
        self._selected[layer] += n_selected
        self._tokens[layer] += tokens

    def per_layer(self) -> np.ndarray:
        """Fraction of FFN neurons computed, per layer."""
        return self.selected / np.maximum(self.tokens * self.n_ff, 1)

    def overall(self) -> float:
        return float(sum(self._selected) / max(sum(self._tokens) * self.n_ff, 1))

    def reset(self) -> None:
        self._selected = [0.0] * len(self._selected)
        self._tokens = [0] * len(self._tokens)


# A sparse layer's kept share is checked against its crossover once per this many tokens (`SparseFFN._kept`).
RECHECK_TOKENS = 32


class SparseFFN:
    """An engine FFN `(layer, h) -> out` that computes only the neurons `rule` selects.

    `needs_act`: the rule reads the activations (threshold, topk), so gate/up are computed densely.
    The kernels backend decodes one token in one kernel call per layer where the rule is one of the
    engine's: `thresholds` [n_layers], the rule |act| > thresholds[layer] (`threshold_ffn`), or
    `predictors`, whose choice the rule is (`predicted_ffn`). `dense`: after `step_aside`, the layers
    that run the dense kernel (kernels backend), joined by any that keeps more than its crossover over
    RECHECK_TOKENS tokens."""

    def __init__(self, model, rule: Rule, needs_act: bool, backend: str = "kernels", weights=None, name: str = "",
                 thresholds: np.ndarray | None = None, predictors: Predictors | None = None):
        if backend not in ("kernels", "torch"):
            raise ValueError(f"backend must be kernels or torch, got {backend!r}")
        self.model, self.rule, self.needs_act, self.backend, self.name = model, rule, needs_act, backend, name
        self.predictors = predictors
        cfg = model.config
        self.act_name = cfg.activation
        self.n_ff = cfg.n_ff
        self.meter = DensityMeter(cfg.n_layers, cfg.n_ff)
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.dense = np.zeros(cfg.n_layers, bool)
        self.crossover: list[float] | None = None  # per layer, after step_aside: the density above which it runs dense
        self._window: list[list[int]] = []  # per layer, after step_aside: [tokens, neurons kept] since its last check
        self._costs: dict[tuple[str, str, str], FFNCosts] = {}  # measured_costs by a layer's formats
        if backend == "torch" and weights is None:
            from hetinfer.profiler.runner import FloatWeights

            weights = FloatWeights(model)
        self.weights = weights
        # Per layer (kernels backend) the neuron-major down projection, made at load (a requantization: ~5 ms
        # per SmolLM2 layer), not during the first decoded token, and the threshold rule's bound kernel.
        self._down_t: list[QTensor | None] = []
        self._threshold_steps: list = []
        if backend == "kernels":
            for layer in range(cfg.n_layers):
                self._down_t.append(None)
                self._threshold_steps.append(None)
                self._hold_sparse_parts(layer, True)

    def step_aside(self, density: np.ndarray, path: str, ranks: list[int] | None = None,
                   costs: FFNCosts | None = None) -> None:
        """Run the dense kernel on each layer whose expected share of neurons computed, `density`
        [n_layers], is above the crossover where `path` ("sparse" or "threshold") stops beating it, the
        sparse side also paying for a predictor of the layer's rank in `ranks` if given: by `costs`, or
        by default the kernels' probe for each layer's shape and formats (measured once per host)."""
        if self.backend != "kernels":
            raise ValueError("only the kernels backend steps aside; the torch backend is the rule's reference")
        n = len(self.dense)
        per_layer = [costs or self.measured_costs(layer) for layer in range(n)]
        extra = [0.0 if ranks is None else c.predict_seconds(r) for c, r in zip(per_layer, ranks or [0] * n)]
        self.crossover = [c.crossover(path, e) for c, e in zip(per_layer, extra)]
        self.dense = np.array([d > c for d, c in zip(density, self.crossover)])
        self._window = [[0, 0] for _ in range(n)]
        for layer, dense in enumerate(self.dense):
            self._hold_sparse_parts(layer, not dense)

    def _hold_sparse_parts(self, layer: int, hold: bool) -> None:
        """Make a sparse layer's neuron-major down copy and bound threshold kernel if it lacks them, or let a
        dense layer's go: a layer the rechecks turn dense stays dense (`_kept`), and the copy holds about a
        third of its FFN's bytes again."""
        if not hold:
            self._down_t[layer] = self._threshold_steps[layer] = None
        elif self._down_t[layer] is None:
            L = self.model.weights.layers[layer]
            self._down_t[layer] = kernels.transpose_down(L.down)
            if self.thresholds is not None:
                self._threshold_steps[layer] = kernels.threshold_ffn_step(L.gate, L.up, self._down_t[layer],
                                                                          self.act_name, self.thresholds[layer])

    def _kept(self, layer: int, n_selected: int, tokens: int = 1) -> None:
        """Count what a sparse layer kept; every RECHECK_TOKENS tokens, step it aside if it kept more than its
        crossover over them: a predictor (or a profile) measured on other text can keep more here than it
        did there, and the expected density `step_aside` went by was then too low."""
        self.meter.count(layer, n_selected, tokens)
        if self.crossover is None:
            return
        w = self._window[layer]
        w[0] += tokens
        w[1] += n_selected
        if w[0] >= RECHECK_TOKENS:
            if w[1] > self.crossover[layer] * w[0] * self.n_ff:
                self.dense[layer] = True
                self._hold_sparse_parts(layer, False)
            w[0] = w[1] = 0

    def measured_costs(self, layer: int) -> FFNCosts:
        """The kernels' one-token FFN costs on this machine for `layer`'s shape and formats (probed once per
        host; read from the probe's cache once per distinct formats, not once per layer)."""
        L = self.model.weights.layers[layer]
        key = (L.gate.qtype, L.down.qtype, neuron_down_format(L.down.qtype))
        if key not in self._costs:
            self._costs[key] = measure_ffn_costs(self.n_ff, self.model.config.d_model, *key, self.act_name)
        return self._costs[key]

    @property
    def stepped_aside(self) -> int:
        """How many layers run the dense kernel."""
        return int(self.dense.sum())

    def __call__(self, layer: int, h: np.ndarray) -> np.ndarray:
        if self.backend == "torch":  # h: a torch tensor (the batched runner) or a numpy array (Transformer.forward)
            import torch

            ht = torch.as_tensor(h)
            act = self.weights.gate_up(layer, ht).float()
            mask = self.rule(layer, ht, act)
            self.meter.record(layer, mask)
            y = self.weights.ffn_out(layer, act * mask)
            return y if isinstance(h, torch.Tensor) else y.numpy()
        if self.dense[layer]:
            self.meter.count(layer, self.n_ff * h.shape[0], h.shape[0])
            return self.model.transformer.dense_ffn(layer, h)
        if self.thresholds is not None and h.shape[0] == 1:
            y, kept = self._threshold_steps[layer](h)
            self._kept(layer, kept)
            return y
        L = self.model.weights.layers[layer]
        if h.shape[0] > 1:  # a prompt: dense gate/up, masked down (prefill is compute-bound anyway)
            act = kernels.gate_up(L.gate, L.up, h, self.act_name)
            mask = self._mask(layer, h, act)
            self._kept(layer, int(mask.sum()), h.shape[0])
            return kernels.linear(L.down, act * mask)
        if self.needs_act:
            act = kernels.gate_up(L.gate, L.up, h, self.act_name)
            mask = self._mask(layer, h, act)
            self._kept(layer, int(mask.sum()))
            rows = np.flatnonzero(mask[0])
            y = np.zeros(h.shape[1], np.float32)
            kernels.scatter_axpy(self._down_t[layer], rows, act[0, rows], y)
            return y[None]
        if self.predictors is not None:
            W1, W2_t, threshold = self.predictors.kernel_weights(layer)
            y, n = kernels.predicted_ffn(W1, W2_t, threshold, L.gate, L.up, self._down_t[layer], h, self.act_name)
            self._kept(layer, n)
            return y
        mask = self._mask(layer, h, None)
        self._kept(layer, int(mask.sum()))
        return kernels.sparse_ffn(L.gate, L.up, self._down_t[layer], np.flatnonzero(mask[0]), h, self.act_name)

    def _mask(self, layer: int, h: np.ndarray, act: np.ndarray | None) -> np.ndarray:
        """The rule's bool mask [T, n_ff] for the kernels backend: the threshold and predictor rules on the
        arrays, another rule (a torch reference: top-k) through zero-copy torch views."""
        if self.thresholds is not None:
            return np.abs(act) > self.thresholds[layer]
        if self.predictors is not None:
            return self.predictors.mask(layer, h)
        import torch

        return self.rule(layer, torch.from_numpy(h), None if act is None else torch.from_numpy(act)).numpy()


def threshold_ffn(model, profile, sparsity: float, backend: str = "kernels", weights=None) -> SparseFFN:
    """Keep neurons with |act| above the profile's per-layer threshold for `sparsity` (any value in [0, 1))."""
    profile.check_model(model)
    thresholds = profile.thresholds(sparsity)
    return SparseFFN(model, lambda layer, h, act: act.abs() > float(thresholds[layer]), True, backend, weights,
                     f"threshold {sparsity:g}", thresholds=thresholds)


def threshold_density(profile, sparsity: float) -> np.ndarray:
    """float64 [n_layers]: the share of neurons each layer's threshold for `sparsity` keeps on the profiled
    tokens (at a profiled level; elsewhere 1 - sparsity, what the interpolated quantile keeps)."""
    if np.any(np.abs(profile.levels - sparsity) < 1e-6):
        return profile.activation_frequency(sparsity).mean(axis=1, dtype=np.float64)
    return np.full(profile.n_layers, 1.0 - sparsity)


def topk_ffn(model, keep: float, backend: str = "torch", weights=None) -> SparseFFN:
    """Oracle: each token keeps its `keep` fraction of neurons with the largest |act|."""
    k = max(1, round(keep * model.config.n_ff))

    def rule(layer: int, h: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        import torch

        idx = act.abs().topk(k, dim=1).indices
        return torch.zeros(act.shape, dtype=torch.bool).scatter_(1, idx, True)

    return SparseFFN(model, rule, True, backend, weights, f"oracle top-{keep:g}")


def predictor_ffn(model, predictors, backend: str = "kernels", weights=None) -> SparseFFN:
    """Compute the rows the per-layer predictors select (their calibrated thresholds)."""
    predictors.check_model(model)
    return SparseFFN(model, lambda layer, h, act: predictors.mask(layer, h), False, backend, weights, "predictor",
                     predictors=predictors)


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    """The engine flags for sparse FFN modes (generate, chat, eval)."""
    p.add_argument("--predictors", metavar="DIR", help="predictor mode: per-layer predictors from `hetinfer train-predictors`")
    p.add_argument("--sparsity", type=float_in(0.0, 1.0, hi_open=True),
                   help="threshold mode: target fraction of FFN neurons skipped (needs --profile); eval's oracle too")
    p.add_argument("--profile", metavar="PROFILE", help="activation profile from `hetinfer profile` (threshold mode)")


MODES = ("dense", "threshold", "predictor", "oracle")  # oracle: each token's top activations (eval only)


def ffn_mode(sparsity: float | None = None, profile: str | None = None, predictors: str | None = None,
             mode: str | None = None) -> str:
    """The FFN mode the sparse flags select (`mode` if given, else the one the flags imply), once
    they are checked to fit it; HetinferError (one line, with the fix) when they do not."""
    if mode is None:
        if sparsity is None and predictors is None and profile is not None:
            raise HetinferError("--profile alone changes nothing; add --sparsity S for threshold mode")
        mode = "predictor" if predictors is not None else "threshold" if sparsity is not None else "dense"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "predictor":
        if predictors is None:
            raise HetinferError("predictor mode needs --predictors DIR (from `hetinfer train-predictors`)")
        if sparsity is not None:
            raise HetinferError("--sparsity selects threshold mode; predictor mode uses the threshold calibrated in "
                                "--predictors (retrain with another --sparsity to change it)")
    if mode in ("threshold", "oracle"):
        if sparsity is None:
            raise HetinferError(f"{mode} mode needs --sparsity S")
        if not 0.0 <= sparsity < 1.0:
            raise HetinferError(f"--sparsity must be in [0, 1), got {sparsity:g}")
    if mode == "threshold" and profile is None:
        raise HetinferError("threshold mode needs per-layer thresholds: pass --profile PROFILE (from `hetinfer profile`)")
    return mode


def engine_ffn(model, sparsity: float | None = None, profile: str | None = None, predictors: str | None = None,
               backend: str = "kernels", weights=None, mode: str | None = None,
               costs: FFNCosts | None = None) -> SparseFFN | None:
    """The FFN for `Session(model, ffn=...)` or `evaluate` from the sparse flags (see `ffn_mode`);
    None means dense. `weights`: the torch backend's FloatWeights, to share one copy. With the kernels
    backend, threshold and predictor modes step aside (`SparseFFN.step_aside`) where this machine's
    kernel costs (`costs`, by default measured by the kernels' probe) say the sparse path loses: a
    threshold layer by the share its profiled threshold keeps, a predictor layer by the density its
    predictor showed in training plus the predictor's own call (skipped too when the layer runs dense)."""
    mode = ffn_mode(sparsity, profile, predictors, mode)
    if mode == "dense":
        return None
    if mode == "oracle":
        return topk_ffn(model, 1.0 - sparsity, backend, weights)
    if mode == "threshold":
        prof = load_profile(profile)
        ffn = threshold_ffn(model, prof, sparsity, backend, weights)
        if backend == "kernels":
            ffn.step_aside(threshold_density(prof, sparsity), "threshold", costs=costs)
        return ffn
    preds = load_predictors(predictors)
    ffn = predictor_ffn(model, preds, backend, weights)
    if backend == "kernels":
        ffn.step_aside(preds.density(), "sparse", [w.shape[0] for w in preds.w1], costs)
    return ffn
