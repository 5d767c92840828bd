"""`hetinfer train-predictors`: training the per-layer low-rank activation predictors (`predictors.py`).

Per layer: logits = W2 relu(W1 h), h the post-norm FFN input, W1 [r, d], W2 [n_ff, r], no bias;
the engine computes the neurons whose logit exceeds the layer's calibrated threshold. The same
`predict_logits` runs at training and at run time.

Training data: the FFN inputs stored in the profile; the labels are recomputed from the model's
weights: neuron j is active if |act(gate h) * up h|_j exceeds the profile's threshold for the
target sparsity. Samples from every tenth calibration sequence are held out for validation.
Loss: BCE weighted by what a miss costs the layer's output: a positive (j active) weighs the
squared error that dropping it adds, (|act_j| * ||down[:, j]||)^2, over the layer's mean for active
neurons, times the layer's #negatives / #positives, so the two classes weigh the same in all but a
neuron that moves the output a lot counts more than one that barely does (on SmolLM2 at 50% density,
held-out WikiText-2: 1.40x dense perplexity, against 5.98x with plain per-neuron class balance and
1.50x weighting by the unsquared contribution; BENCHMARKS.md). Adam with a one-cycle learning
rate. The weights kept are those of the epoch with the best validation recall of activation mass
at the target density; training stops early when it stops improving. Then per layer:
- the threshold is the highest one whose validation recall of activation mass reaches `recall`
  (mass recall = sum |act| over predicted active neurons / sum |act| over all active neurons);
- the rank is the smallest candidate that reaches `recall` at or below the target density
  (PowerInfer's adaptive sizing); if none does, the candidate with the fewest FFN + predictor
  FLOPs per token at that recall. Candidates are capped so that the predictor has at most
  `max_param_ratio` of the FFN's parameters and `max_flops_ratio` of the FFN FLOPs skipped at
  the target density.
"""
from __future__ import annotations

import datetime
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

import hetinfer
from hetinfer.errors import HetinferError
from hetinfer.profiler.predictors import PREDICTORS_VERSION, LayerReport, Predictors, TrainOptions, predict_logits


def mass_recall_curve(z: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorting all (token, neuron) logits `z` descending: (sorted logits, cumulative recall of `mass`)."""
    zf, order = z.flatten().sort(descending=True)
    cum = mass.flatten()[order].cumsum(0, dtype=torch.float64)
    return zf, cum / cum[-1].clamp_min(1e-30)


def mass_recall(mass: torch.Tensor, kept: torch.Tensor) -> float:
    """Recall of activation mass: the share of `mass` on the `kept` (token, neuron) pairs."""
    total = float(mass.sum(dtype=torch.float64))
    return float((mass * kept).sum(dtype=torch.float64)) / total if total > 0 else 1.0


def recall_at_density(z: torch.Tensor, mass: torch.Tensor, density: float) -> float:
    """Recall of `mass` when the top `density` fraction of logits (one threshold for all tokens) is kept."""
    k = min(max(int(round((1.0 - density) * z.numel())), 1), z.numel())
    return mass_recall(mass, z > z.flatten().kthvalue(k).values)


def _keep_above(zf: torch.Tensor, k: int) -> tuple[float, float]:
    """(threshold, density) keeping the sorted-descending logits zf[:k + 1] and every logit tied with zf[k]."""
    lower = zf[zf < zf[k]]
    below = lower[0] if len(lower) else zf[k] - 1.0
    thr = float((zf[k] + below) / 2)
    return thr, int((zf > thr).sum()) / len(zf)


def calibrate(z: torch.Tensor, mass: torch.Tensor, recall: float) -> tuple[float, float]:
    """(threshold, density): the highest logit threshold whose kept set reaches `recall` of `mass`."""
    zf, rec = mass_recall_curve(z, mass)
    k = min(int(torch.searchsorted(rec, torch.tensor(recall - 1e-9, dtype=rec.dtype))), len(zf) - 1)
    return _keep_above(zf, k)


def threshold_for_density(z: torch.Tensor, density: float) -> tuple[float, float]:
    """(threshold, density): keep the top `density` fraction of logits (more when logits tie)."""
    zf = z.flatten().sort(descending=True).values
    return _keep_above(zf, min(max(int(round(density * len(zf))) - 1, 0), len(zf) - 1))


def loss_weights(cost: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE weights: 1 for a negative, a positive's `cost` over the mean positive cost
    times #negatives / #positives (see the module doc)."""
    p = float(y.mean().clamp(1e-3, 1 - 1e-3))
    mean_cost = float((cost * y).sum() / y.sum().clamp_min(1))
    return torch.where(y > 0, cost * ((1 - p) / p / max(mean_cost, 1e-30)), 1.0)


def train_rank(h_tr, wt_tr, y_tr, h_va, mass_va, rank: int, density: float, opts: TrainOptions):
    """Train one predictor (wt_tr: `loss_weights`); returns (w1, w2, epochs run), the weights from the
    best validation epoch."""
    g = torch.Generator().manual_seed(opts.seed)
    d, n = h_tr.shape[1], y_tr.shape[1]
    w1 = (torch.randn(rank, d, generator=g) / d ** 0.5).requires_grad_()
    w2 = (torch.randn(n, rank, generator=g) / rank ** 0.5 * 0.1).requires_grad_()
    opt = torch.optim.Adam([w1, w2], lr=opts.lr)
    steps = opts.epochs * -(-len(h_tr) // opts.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=steps)
    best, best_w, since, ep = -1.0, None, 0, 0
    for ep in range(1, opts.epochs + 1):
        perm = torch.randperm(len(h_tr), generator=g)
        for b in range(0, len(h_tr), opts.batch):
            i = perm[b: b + opts.batch]
            loss = F.binary_cross_entropy_with_logits(predict_logits(w1, w2, h_tr[i]), y_tr[i], weight=wt_tr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            rec = recall_at_density(predict_logits(w1, w2, h_va), mass_va, density)
        if rec > best:
            best, best_w, since = rec, (w1.detach().clone(), w2.detach().clone()), 0
        else:
            since += 1
            if since >= opts.patience:
                break
    return best_w[0], best_w[1], ep


def train_layer(layer: int, h: torch.Tensor, act: torch.Tensor, down_norm: torch.Tensor, threshold: float,
                val: torch.Tensor, opts: TrainOptions) -> tuple[torch.Tensor, torch.Tensor, float, LayerReport]:
    """Pick the rank and threshold of one layer's predictor (see the module doc)."""
    d, n = h.shape[1], act.shape[1]
    a = act.abs()
    y = (a > threshold).float()
    mass_va = a[val] * y[val]
    h_tr, y_tr = h[~val], y[~val]
    wt_tr = loss_weights((a[~val] * down_norm) ** 2, y_tr)  # cost: the squared error a miss adds to the output
    budget = 1.0 - opts.sparsity if opts.density is None else opts.density
    ffn_params = 3 * d * n
    rmax = int(min(opts.max_param_ratio, opts.max_flops_ratio * (1.0 - budget)) * ffn_params / (d + n))
    ranks = sorted({min(r, rmax) for r in opts.ranks if r >= 1}) or [max(1, rmax)]
    best, tried = None, {}
    for r in ranks:
        w1, w2, epochs = train_rank(h_tr, wt_tr, y_tr, h[val], mass_va, r, budget, opts)
        with torch.no_grad():
            z = predict_logits(w1, w2, h[val])
        if opts.density is None:  # calibrated for recall: fewer multiply-adds per token is better
            thr, dens = calibrate(z, mass_va, opts.recall)
            ok, score, min_gain = dens <= budget, -(r * (d + n) + dens * ffn_params), 0.0
        else:  # calibrated for density: higher recall is better, by at least half a point per step
            thr, dens = threshold_for_density(z, opts.density)
            score = mass_recall(mass_va, z > thr)
            ok, min_gain = score >= opts.recall, 0.005
        tried[r] = round(dens if opts.density is None else score, 4)
        cand = (score, r, w1, w2, thr, z, epochs)
        if ok:
            best = cand  # the smallest rank that meets the target
            break
        if best is not None and score <= best[0] + min_gain:
            break  # larger ranks stop paying off
        best = cand
    _, r, w1, w2, thr, z, epochs = best
    pred = z > thr
    yv = y[val].bool()
    dens = float(pred.float().mean())
    saved = (1.0 - dens) * ffn_params
    report = LayerReport(
        layer=layer, rank=r, recall=mass_recall(mass_va, pred),
        precision=float((pred & yv).sum() / max(int(pred.sum()), 1)), density=dens,
        label_density=float(yv.float().mean()), params=r * (d + n), ffn_params=ffn_params,
        flops_vs_saved=float(r * (d + n) / saved) if saved > 0 else float("inf"), epochs=epochs, tried=tried,
    )
    return w1, w2, thr, report


def train_predictors(model, profile, opts: TrainOptions = TrainOptions(), progress: bool = False,
                     layers: list[int] | None = None) -> tuple[Predictors, list[LayerReport]]:
    """Train every layer's predictor from `profile`'s samples (or only `layers`, for tests)."""
    from tqdm import tqdm

    from hetinfer.profiler.runner import FloatWeights

    profile.check_model(model)
    try:
        thresholds = profile.thresholds(opts.sparsity)
        profile.level_index(opts.sparsity)
    except ValueError as e:
        raise HetinferError(f"--sparsity: {e}") from None
    inputs, seq = profile.samples()
    val = torch.from_numpy(seq % 10 == 0)
    if val.all() or not val.any():
        raise HetinferError("the profile's samples come from too few calibration sequences to hold out validation "
                            "data; profile with more text (--tokens)")
    torch.manual_seed(opts.seed)
    weights = FloatWeights(model, keep=False)
    L = model.config.n_layers
    todo = list(range(L)) if layers is None else layers
    w1s, w2s, thr = [None] * L, [None] * L, torch.full((L,), float("-inf"))
    reports = []
    for i in tqdm(todo, desc="train-predictors", unit="layer", disable=not progress):
        h = torch.from_numpy(inputs[i])
        with torch.no_grad():
            act = weights.gate_up(i, h).float()
            down_norm = weights.layer(i).down.float().norm(dim=0)
        w1s[i], w2s[i], t, rep = train_layer(i, h, act, down_norm, float(thresholds[i]), val, opts)
        thr[i] = t
        reports.append(rep)
    cfg = model.config
    for i in range(L):  # layers not trained (tests) predict every neuron
        if w1s[i] is None:
            w1s[i], w2s[i] = torch.zeros(1, cfg.d_model), torch.zeros(cfg.n_ff, 1)
    manifest = {
        "version": PREDICTORS_VERSION,
        "hetinfer_version": hetinfer.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": model.path, "fingerprint": model.fingerprint, "config": cfg.to_dict()},
        "profile": {"path": profile.path, "created": profile.manifest.get("created"), "tokens": profile.tokens},
        "options": asdict(opts),
        "layers": list(range(L)),
        "report": [asdict(r) for r in reports],
        "summary": summarize(reports),
    }
    return Predictors(manifest, [w.numpy() for w in w1s], [w.numpy() for w in w2s], thr.numpy()), reports


def summarize(reports: list[LayerReport]) -> dict:
    if not reports:
        return {}
    ffn = sum(r.ffn_params for r in reports)
    saved = sum((1 - r.density) * r.ffn_params for r in reports)
    return {
        "median_recall": float(np.median([r.recall for r in reports])),
        "mean_density": float(np.mean([r.density for r in reports])),
        "param_ratio": sum(r.params for r in reports) / ffn,
        "flops_vs_saved": sum(r.params for r in reports) / saved if saved > 0 else float("inf"),
    }


def report_table(reports: list[LayerReport]) -> str:
    rows = ["layer rank recall precision density label_density params/ffn flops/saved"]
    for r in reports:
        rows.append(f"{r.layer:5d} {r.rank:4d} {r.recall:6.3f} {r.precision:9.3f} {r.density:7.3f} "
                    f"{r.label_density:13.3f} {r.params / r.ffn_params:10.3f} {r.flops_vs_saved:11.3f}")
    s = summarize(reports)
    rows.append(f"median recall {s['median_recall']:.3f}, mean density {s['mean_density']:.3f}, "
                f"params {s['param_ratio']:.1%} of FFN, FLOPs {s['flops_vs_saved']:.1%} of the FFN FLOPs saved")
    return "\n".join(rows)
