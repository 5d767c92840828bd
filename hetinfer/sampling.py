"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seed."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hetinfer.errors import HetinferError


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; llama.cpp style: logits of seen tokens / penalty (x penalty if < 0)
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HetinferError(f"bad sampling parameter: {msg}")


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def sample(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator) -> int:
    """One token id from `logits` [vocab] (float32)."""
    logits = logits.float()
    if p.repeat_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
        vals = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs, ids = candidates(logits, p)
    i = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
    return i if ids is None else int(ids[i])


def candidates(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens sampling may pick and their unnormalised probabilities after top-k, temperature,
    min-p and top-p: (probs [n], ids [n]), or (probs [vocab], None) when no filter needs an order.

    With top-k on, only the k best are ever sorted or exponentiated: over a 49k vocabulary, sorting
    all of it took 2.4 ms per token, 30% of a SmolLM2 decode step."""
    if p.top_k > 0:
        vals, ids = torch.topk(logits, min(p.top_k, logits.numel()))  # descending
    elif p.top_p < 1:
        vals, ids = torch.sort(logits, descending=True)
    else:
        vals, ids = logits, None
    probs = torch.softmax(vals / p.temperature, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1:  # probs are in descending order here: keep the smallest prefix reaching top_p
        probs = probs.masked_fill(torch.cumsum(probs, 0) - probs >= p.top_p, 0.0)
    return probs, ids
