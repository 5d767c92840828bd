"""`hetinfer eval`: what a sparse FFN costs in quality, against the dense model on the same windows.

Every window runs with exact attention through the layer-by-layer runner in float32, once dense
and once per sparse FFN. Per scored position: the sparse model's negative log-likelihood of the
next token (perplexity), whether its top-1 token equals the dense model's, and KL(dense || sparse)
of the next-token distributions; the sparse FFN's meter gives the density achieved per layer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from hetinfer.data import Window
from hetinfer.model import FFN
from hetinfer.profiler.runner import FloatWeights, LayerRunner, Packed



@dataclass
class EvalResult:
    mode: str
    tokens: int  # scored next-token predictions
    perplexity: float
    dense_perplexity: float
    top1_agreement: float
    kl: float  # mean KL(dense || sparse), nats per token
    ffn_density: float  # fraction of FFN neurons computed, over all layers and tokens
    layer_density: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Sums:
    nll: float = 0.0
    agree: int = 0
    kl: float = 0.0


def _batches(windows: list[Window], max_tokens: int) -> list[list[Window]]:
    out, cur, n = [], [], 0
    for w in windows:
        if cur and n + len(w.tokens) > max_tokens:
            out.append(cur)
            cur, n = [], 0
        cur.append(w)
        n += len(w.tokens)
    return out + [cur] if cur else out


def evaluate(model, windows: list[Window], ffns: dict[str, FFN | None], weights: FloatWeights | None = None,
             batch_tokens: int = 16384, progress: bool = False) -> dict[str, EvalResult]:
    """Metrics of each named FFN (None = dense) on `windows`; sparse FFNs need a `.meter` (see hetinfer.sparse)."""
    from tqdm import tqdm

    weights = weights or FloatWeights(model)
    sums = {name: _Sums() for name in ffns}
    dense_nll, scored = 0.0, 0
    for f in ffns.values():
        if f is not None:
            f.meter.reset()
    batches = _batches(windows, batch_tokens)
    bar = tqdm(total=len(batches) * (1 + sum(f is not None for f in ffns.values())), desc="eval", disable=not progress)
    for batch in batches:
        packed = Packed([w.tokens for w in batch])
        x_dense = LayerRunner(model, packed, weights).run()
        bar.update()
        finals = {name: (x_dense if f is None else LayerRunner(model, packed, weights).run(f)) for name, f in ffns.items()}
        bar.update(sum(f is not None for f in ffns.values()))
        for k, w in enumerate(batch):
            sl = packed.positions_of(k)
            pos = torch.arange(w.first, len(w.tokens) - 1)
            if len(pos) == 0:
                continue
            target = torch.tensor(w.tokens)[pos + 1]
            logp_d = torch.log_softmax(weights.logits(x_dense[sl][pos]), -1)
            dense_nll -= float(logp_d.gather(1, target[:, None]).sum())
            scored += len(pos)
            top_d = logp_d.argmax(-1)
            for name, x in finals.items():
                logp = logp_d if x is x_dense else torch.log_softmax(weights.logits(x[sl][pos]), -1)
                s = sums[name]
                s.nll -= float(logp.gather(1, target[:, None]).sum())
                s.agree += int((logp.argmax(-1) == top_d).sum())
                s.kl += float((logp_d.exp() * (logp_d - logp)).sum())
    bar.close()
    out = {}
    for name, f in ffns.items():
        s = sums[name]
        layer = [1.0] * model.config.n_layers if f is None else f.meter.per_layer().tolist()
        out[name] = EvalResult(
            mode=name, tokens=scored, perplexity=math.exp(s.nll / max(scored, 1)),
            dense_perplexity=math.exp(dense_nll / max(scored, 1)), top1_agreement=s.agree / max(scored, 1),
            kl=s.kl / max(scored, 1), ffn_density=1.0 if f is None else f.meter.overall(),
            layer_density=[round(d, 4) for d in layer],
        )
    return out


def eval_windows(sources, tokenizer, window: int, stride: int, n_tokens: int | None) -> list[Window]:
    """Windows over text sources (sliding) and chat sources (one window per prompt), up to `n_tokens` scored."""
    from hetinfer.data import is_chat_jsonl, read_chats, read_text, sliding_windows

    bos = tokenizer.bos_id if tokenizer.add_bos else None
    out: list[Window] = []
    for src in sources:
        if is_chat_jsonl(src.path):
            out += [Window(tokenizer.encode(t)[:window], 0) for t in read_chats(src, tokenizer)]
        else:
            ids = tokenizer.encode(read_text(src), add_bos=False)
            out += sliding_windows(ids, window, stride, bos)
    if n_tokens is not None:
        kept, n = [], 0
        for w in out:
            if n >= n_tokens:
                break
            kept.append(w)
            n += len(w.tokens) - 1 - w.first
        out = kept
    return [w for w in out if len(w.tokens) - 1 > w.first]


def summary_table(results: dict[str, EvalResult]) -> str:
    """A plain-text table, one row per mode."""
    rows = ["mode                      ppl     ppl/dense  top1    KL       density"]
    for r in results.values():
        rows.append(f"{r.mode:<24} {r.perplexity:8.3f} {r.perplexity / r.dense_perplexity:8.4f}  "
                    f"{r.top1_agreement:6.2%} {r.kl:8.5f}  {r.ffn_density:6.2%}")
    return "\n".join(rows)

