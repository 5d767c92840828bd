"""Streaming generation: prefill, decode loop, stop tokens and strings, chat turns, stats."""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from hetinfer.config import DEFAULT_KV
from hetinfer.errors import HetinferError
from hetinfer.loader import Model
from hetinfer.model import FFN
from hetinfer.sampling import SamplingParams, make_generator, sample

PREFILL_CHUNK = 256


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    finish_reason: str = ""
    cached_tokens: int = 0  # prompt tokens whose KV the session reused instead of computing them

    def to_dict(self) -> dict:
        rate = lambda n, s: n / s if s > 0 else 0.0  # noqa: E731
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_tok_s": rate(self.prompt_tokens, self.prompt_seconds),
            "gen_tokens": self.gen_tokens,
            "gen_tok_s": rate(self.gen_tokens, self.gen_seconds),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


class Session:
    """A model with one KV cache; generates streamed text for one conversation at a time.

    The cache keeps the tokens it holds, so a prompt that starts like the previous one (a shared
    system prompt, the next chat turn) prefills only from the first chunk that differs; the result
    is bit-identical to prefilling it alone (see `_prefill`).
    """

    def __init__(self, model: Model, n_ctx: int | None = None, ffn: FFN | None = None, kv: str = DEFAULT_KV):
        self.model = model
        if n_ctx is not None and n_ctx < 1:
            raise HetinferError(f"the context must hold at least 1 token, got {n_ctx}")
        self.n_ctx = min(n_ctx or 4096, model.config.context_length)
        self.cache = model.transformer.new_cache(self.n_ctx, kv)  # kv: "f32" or "f16" (`--kv`)
        self.ffn = ffn
        self.stats = Stats()
        self._prompt: tuple[list[int], np.ndarray] | None = None  # the last prompt and the logits after it
        self._exact = 0  # leading cached positions computed in whole PREFILL_CHUNK chunks by a prefill

    def close(self) -> None:
        """Release what the FFN holds besides memory (an offloaded FFN's reading threads and store file);
        `with Session(...) as s:` does it on leaving. The model stays usable by other sessions."""
        if hasattr(self.ffn, "close"):
            self.ffn.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self) -> None:
        self.cache.truncate(0)
        self._prompt = None
        self._exact = 0

    def complete(self, prompt: str, params: SamplingParams, cancel: Callable[[], bool] | None = None) -> Iterator[str]:
        return self.stream(self.model.tokenizer.encode(prompt), params, cancel)

    def chat(self, messages: list[dict], params: SamplingParams, cancel: Callable[[], bool] | None = None) -> Iterator[str]:
        if not messages:
            raise HetinferError("chat needs at least one message")
        return self.stream(self.model.tokenizer.encode_chat(messages), params, cancel)

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt == 0:
            raise HetinferError("the prompt is empty; give some text to continue")
        if n_prompt + max_tokens > self.n_ctx:
            raise HetinferError(
                f"prompt ({n_prompt} tokens) plus max tokens ({max_tokens}) exceeds the context of {self.n_ctx} tokens; "
                "shorten the prompt, lower max tokens, or raise --ctx"
                + (f" (the model allows up to {self.model.config.context_length})" if self.n_ctx < self.model.config.context_length else "")
            )

    def stream(self, prompt_ids: list[int], params: SamplingParams, cancel: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated; `self.stats` describes the finished run."""
        self.check_fits(len(prompt_ids), params.max_tokens)
        return self._run(list(prompt_ids), params, cancel)

    def _run(self, prompt_ids: list[int], params: SamplingParams, cancel) -> Iterator[str]:
        tr, tok = self.model.transformer, self.model.tokenizer
        stats = self.stats = Stats(prompt_tokens=len(prompt_ids))
        gen = make_generator(params.seed)
        t0 = time.perf_counter()
        logits, stats.cached_tokens = self._prefill(prompt_ids)
        stats.prompt_seconds = time.perf_counter() - t0
        out: list[int] = []
        emitted = ""
        t0 = time.perf_counter()
        stats.finish_reason = "length"
        while len(out) < params.max_tokens:
            if cancel is not None and cancel():
                stats.finish_reason = "cancelled"
                break
            nxt = sample(logits, params, prompt_ids + out, gen)
            if nxt in tok.stop_ids:
                stats.finish_reason = "stop"
                break
            out.append(nxt)
            stats.gen_tokens = len(out)
            text = tok.decode(out)
            cut = _find_stop(text, params.stop)
            if cut is not None:
                stats.finish_reason = "stop"
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                emitted = None  # the stop string and what follows are never shown
                break
            if not text.endswith("\ufffd"):  # else an incomplete UTF-8 sequence: wait for the next token
                text = text[: len(text) - _held_back(text, params.stop)]
                if len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
            if len(out) < params.max_tokens:
                logits = tr.forward([nxt], self.cache, self.ffn)
        if emitted is not None:  # flush text held back as a possible stop-string prefix
            final = tok.decode(out)
            if len(final) > len(emitted):
                yield final[len(emitted):]
        stats.gen_seconds = time.perf_counter() - t0

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """Logits after `ids`, and how many of its tokens came from the cache, bit-identical to
        prefilling `ids` in an empty cache.

        A prefill computes chunks of PREFILL_CHUNK tokens at positions 0, C, 2C, ...; a whole chunk's
        keys and values depend only on its tokens and the chunks before it, so those an earlier prefill
        left in the cache are reused where `ids` starts with the same tokens. Everything else is
        recomputed: the last, partial chunk (the batched path rounds a token differently with the
        chunk's length: GEMV_MAX_T switches kernels, and 8-bit activations amplify the difference) and
        generated tokens (decoded one at a time by other kernels). Reusing those made a greedy answer
        depend on the request served before it. Repeating the last prompt returns its stored logits."""
        held = self.cache.tokens
        if self._prompt is not None and self._prompt[0] == ids and held[: len(ids)] == ids:
            self.cache.truncate(len(ids))
            return self._prompt[1], len(ids)
        keep = 0
        while (keep + PREFILL_CHUNK < len(ids) and keep + PREFILL_CHUNK <= self._exact
               and held[keep : keep + PREFILL_CHUNK] == ids[keep : keep + PREFILL_CHUNK]):
            keep += PREFILL_CHUNK
        self.cache.truncate(keep)
        self._exact = keep
        logits = None
        for s in range(keep, len(ids), PREFILL_CHUNK):
            logits = self.model.transformer.forward(ids[s : s + PREFILL_CHUNK], self.cache, self.ffn)
        self._exact = len(ids) // PREFILL_CHUNK * PREFILL_CHUNK
        self._prompt = (list(ids), logits)
        return logits, keep


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could start a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best
