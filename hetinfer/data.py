"""Calibration and evaluation text: plain text files and chat JSONL, turned into token sequences.

A source is a file, optionally sliced by fraction: `valid.txt[:0.7]` is the first 70% of the
file's characters, `valid.txt[0.7:]` the rest; for chat JSONL the slice selects records.
Chat JSONL holds one conversation per line, either MT-Bench form (`{"turns": ["...", ...]}`,
each turn rendered as its own single-user-message prompt, since MT-Bench has no answers) or
`{"messages": [{"role": ..., "content": ...}, ...]}`, rendered through the model's chat template
exactly as `hetinfer chat` renders a prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from hetinfer.errors import HetinferError
from hetinfer.tokenizer import check_unicode

PACKAGED = os.path.join(os.path.dirname(__file__), "calibration")  # shipped data; licenses in its README.md
DEFAULT_PROFILE_DATA = (os.path.join(PACKAGED, "wikitext-2.txt") + "[:0.8]", os.path.join(PACKAGED, "mt-bench.jsonl"))
DEFAULT_EVAL_DATA = (os.path.join(PACKAGED, "wikitext-2.txt") + "[0.8:]",)  # text the default profile never saw
MIN_SCORED_TOKENS = 32  # fewer scored predictions make a perplexity too noisy to report (eval)

_SLICE = re.compile(r"^(?P<path>.+)\[(?P<start>[0-9.]*):(?P<end>[0-9.]*)\]$")


@dataclass
class Source:
    path: str
    start: float = 0.0
    end: float = 1.0

    @property
    def spec(self) -> str:
        if (self.start, self.end) == (0.0, 1.0):
            return self.path
        return f"{self.path}[{self.start:g}:{self.end:g}]"


def parse_source(spec: str) -> Source:
    """`FILE`, or `FILE[a:b]` with fractions 0 <= a < b <= 1 (either may be omitted)."""
    m = _SLICE.match(spec)
    if m and not os.path.exists(spec):
        try:
            start = float(m["start"]) if m["start"] else 0.0
            end = float(m["end"]) if m["end"] else 1.0
        except ValueError:
            raise HetinferError(f"bad slice in {spec!r}; write FILE[a:b] with fractions, e.g. valid.txt[:0.7]") from None
        if not 0.0 <= start < end <= 1.0:
            raise HetinferError(f"slice [{start:g}:{end:g}] in {spec!r} must satisfy 0 <= a < b <= 1")
        src = Source(m["path"], start, end)
    else:
        src = Source(spec)
    if not os.path.isfile(src.path):
        raise HetinferError(f"data file not found: {src.path}; pass a plain-text file or a chat JSONL file")
    return src


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_chat_jsonl(path: str) -> bool:
    """A file whose first non-empty line is a JSON object with `turns` or `messages`."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and ("turns" in obj or "messages" in obj)
    return False


def read_text(src: Source) -> str:
    """The source's text (bytes that are not UTF-8 read as U+FFFD); an error when it holds only whitespace."""
    with open(src.path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    text = text[int(len(text) * src.start): int(len(text) * src.end)]
    if not text.strip():
        raise HetinferError(f"{src.spec} holds no text (only whitespace); pass a file with text in it")
    return text


def read_chats(src: Source, tokenizer) -> list[str]:
    """Prompts rendered through the model's chat template, one per MT-Bench turn or `messages` record."""
    records = []
    with open(src.path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HetinferError(f"{src.path}:{n}: bytes that are not UTF-8 ({e.reason} at byte {e.start}); "
                                    "chat data must be UTF-8 text") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise HetinferError(f"{src.path}:{n}: not valid JSON ({e.msg}); chat data must be one JSON object per line")
            # "\ud800" escapes parse as JSON, but are not text
            check_unicode(json.dumps(obj, ensure_ascii=False), f"{src.path}:{n}")
            obj = obj if isinstance(obj, dict) else {}
            turns, msgs = obj.get("turns"), obj.get("messages")
            if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
                records.append([[{"role": "user", "content": t}] for t in turns])
            elif isinstance(msgs, list) and msgs and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                records.append([msgs])
            else:
                raise HetinferError(f"{src.path}:{n}: expected a `turns` list of strings or a `messages` list of "
                                    "{\"role\": ..., \"content\": ...} objects")
    records = records[int(len(records) * src.start): int(len(records) * src.end)]
    out = []
    for convs in records:
        for msgs in convs:
            gen = msgs[-1].get("role") != "assistant"
            out.append(tokenizer.render_chat(msgs, add_generation_prompt=gen))
    return out


def source_sequences(src: Source, tokenizer, seq_len: int) -> tuple[str, list[list[int]]]:
    """(kind, sequences): text cut into `seq_len`-token pieces, or one sequence per chat prompt (truncated)."""
    if is_chat_jsonl(src.path):
        return "chat", [tokenizer.encode(t)[:seq_len] for t in read_chats(src, tokenizer)]
    ids = tokenizer.encode(read_text(src), add_bos=False)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    step = seq_len - len(bos)
    return "text", [bos + ids[i: i + step] for i in range(0, len(ids), step) if len(ids[i: i + step]) > 1]


def shares(available: list[int], total: int) -> list[int]:
    """Split `total` tokens equally across sources; what a small source cannot use goes to the others."""
    share = [0] * len(available)
    left, open_ = total, [i for i, a in enumerate(available) if a > 0]
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for i in list(open_):
            take = min(each, available[i] - share[i], left)
            share[i] += take
            left -= take
            if share[i] == available[i]:
                open_.remove(i)
            if left == 0:
                break
    return share


def calibration_sequences(sources: list[Source], tokenizer, n_tokens: int, seq_len: int = 512
                          ) -> tuple[list[list[int]], list[dict]]:
    """Sequences totalling about `n_tokens` (at most one sequence per source over), balanced across sources.

    Within a source the sequences are spread evenly over the file, not taken from its start.
    Returns the sequences and one description per source (for the artefact's manifest)."""
    per_source = [source_sequences(s, tokenizer, seq_len) for s in sources]
    want = shares([sum(map(len, seqs)) for _, seqs in per_source], n_tokens)
    out: list[list[int]] = []
    report = []
    for src, (kind, seqs), budget in zip(sources, per_source, want):
        total = sum(map(len, seqs))
        picked, got = [], 0
        step = max(1, total // max(budget, 1))  # every step-th sequence, then the ones in between
        for i in (i for start in range(step) for i in range(start, len(seqs), step)):
            if got >= budget:
                break
            picked.append(seqs[i])
            got += len(seqs[i])
        out.extend(picked)
        report.append({"path": os.path.abspath(src.path), "slice": [src.start, src.end], "kind": kind,
                       "sha256": file_sha256(src.path), "sequences": len(picked), "tokens": sum(map(len, picked))})
    if not out:
        raise HetinferError("the data files hold no text; pass non-empty plain-text or chat JSONL files")
    return out, report


@dataclass
class Window:
    """`tokens` of one forward pass; the predictions at positions >= `first` are scored."""

    tokens: list[int]
    first: int


def sliding_windows(ids: list[int], window: int, stride: int, bos: int | None = None) -> list[Window]:
    """Windows of `window` tokens every `stride` tokens; each token after the first is scored exactly once,
    with at least `window - stride` tokens of context (and never none) once the first window is past. A `bos`
    id is prepended to every window (never scored as a target; it takes one of the window's places)."""
    if not 0 < stride <= window:
        raise HetinferError(f"stride {stride} must be between 1 and the window size {window}")
    pre = [] if bos is None else [bos]
    span = window - len(pre)
    if span < 2:
        raise HetinferError(f"window {window} is too small: it must hold at least 2 tokens besides BOS")
    out, done, b = [], 1, 0  # global positions < done are already scored targets (position 0 never is)
    while True:
        e = min(b + span, len(ids))
        # prediction at window position p targets global token b + p + 1 - len(pre)
        out.append(Window(pre + ids[b:e], done - b - 1 + len(pre)))
        done = e
        if e == len(ids):
            return out
        b = min(b + stride, done - 1)  # the next target's predecessor must be in the window
