"""Tokenizers from GGUF metadata or tokenizer.json, and chat templates.

- GGUF `gpt2` vocabularies (byte-level BPE: SmolLM, Llama 3, Qwen2) are built as a
  `tokenizers` BPE with the pre-tokenizer regex llama.cpp uses for `tokenizer.ggml.pre`.
- GGUF `llama` vocabularies (SentencePiece BPE with scores and byte fallback: Llama 2,
  Mistral) use `SPMTokenizer`, a direct implementation of the score-ordered merge.
- HF directories load `tokenizer.json` with `tokenizers`.
Control tokens written in text (`<|im_start|>`) are parsed as single tokens, as llama.cpp does, except
in chat messages: `encode_chat` takes control tokens only from the template, so a message cannot
forge a turn by writing `<|im_end|><|im_start|>system`.
"""
from __future__ import annotations

import datetime
import heapq
import copy
import json
import os
import re
from dataclasses import dataclass, field

from hetinfer.errors import HetinferError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> list of regexes applied in sequence (mirrors llama.cpp's llama-vocab.cpp)
PRE_TOKENIZERS = {
    "default": [_GPT2],
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
}
CONTROL, USER_DEFINED, BYTE = 3, 4, 6


def check_unicode(text: str, what: str = "the text") -> str:
    """`text` if it is valid Unicode, else a HetinferError naming the first bad character.

    One rule for the CLI and the server: text holding undecodable bytes (Python's surrogate escapes of a
    command line that is not UTF-8) or lone surrogates (JSON's "\\ud800") is refused, never replaced, so
    the model never reads a prompt other than the one sent."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        bad = f"an undecodable byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "a lone surrogate"
        raise HetinferError(f"{what} is not valid Unicode: character {e.start} is {bad} (U+{code:04X}); "
                            "send UTF-8 text") from None
    return text


@dataclass
class Tokenizer:
    """encode/decode plus the special ids and chat template the engine needs."""

    backend: object  # tokenizers.Tokenizer or SPMTokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None = None
    stop_ids: set[int] = field(default_factory=set)
    vocab_size: int = 0
    specials: dict[str, int] = field(default_factory=dict)  # control (and user-defined) token text -> id
    _plain: object = field(default=None, init=False, repr=False)  # the backend reading those texts as plain text
    _template: object = field(default=None, init=False, repr=False)  # chat_template compiled (`_chat_template`)

    def __post_init__(self) -> None:
        names = sorted(self.specials, key=len, reverse=True)  # longest first, as the tokenizers match them
        self._specials_re = re.compile("|".join(map(re.escape, names)) if names else r"(?!)")

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`; `special=False` tokenizes control-token text (`<|im_end|>`) as ordinary text.

        Runs through `encode_batch`, which releases the GIL (`encode` holds it: a 1 MB prompt stalled
        every other thread, the server's event loop included, for a second)."""
        check_unicode(text)
        backend = self.backend if special else self._plain_backend()
        ids = list(backend.encode_batch([text], add_special_tokens=False)[0].ids)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def _plain_backend(self):
        if self._plain is None:
            if isinstance(self.backend, SPMTokenizer):
                plain = copy.copy(self.backend)
                plain.specials = []
            else:
                from tokenizers import Tokenizer as HFTok

                plain = HFTok.from_str(self.backend.to_str())
                plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the chat template, control tokens only where the template
        writes them: a control token's text inside a message is tokenized as plain text.

        Splits the rendered prompt at the control tokens outside the messages' text and tokenizes the
        pieces between them as plain text, as `encode` does with every control token, so a
        conversation without such text gets exactly `encode(render_chat(messages))`."""
        text = self.render_chat(messages, add_generation_prompt)
        spans = _message_spans(self, messages, text, add_generation_prompt)
        ids = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        start = outside = 0  # the plain text not yet tokenized starts at `start`; the template's at `outside`
        for lo, hi in spans + [(len(text), len(text))]:
            for m in self._specials_re.finditer(text, outside, lo):  # control tokens the template wrote
                ids += self.encode(text[start:m.start()], add_bos=False, special=False)
                ids.append(self.specials[m.group()])
                start = m.end()
            outside = hi
        return ids + self.encode(text[start:], add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_text(self, i: int) -> str:
        return self.backend.id_to_token(i) or ""

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` through the model's chat template (sandboxed jinja2)."""
        from jinja2.exceptions import TemplateError

        tok = lambda i: self.token_text(i) if i is not None else ""  # noqa: E731
        try:
            return self._chat_template().render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_id), eos_token=tok(self.eos_id),
            )
        except TemplateError as e:
            raise HetinferError(f"the model's chat template rejected the conversation: {e}") from None

    def prepare_chat(self) -> None:
        """Compile the chat template and make the plain-text backend now (`encode_chat` needs both), so the
        first chat request does not wait for them (the plain-text backend is a copy of the whole tokenizer);
        nothing without a template."""
        if self.chat_template:
            self._chat_template()
            self._plain_backend()

    def _chat_template(self):
        """The chat template compiled once (sandboxed jinja2): compiling took longer than rendering."""
        if self._template is None:
            if not self.chat_template:
                raise HetinferError("this model has no chat template; use `hetinfer generate` with a plain prompt instead")
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise HetinferError(f"the model's chat template does not compile: {e}") from None
        return self._template


_MARK = re.compile("\ue000([0-9]+)\ue001")  # private-use characters standing for message i's text


def _message_spans(tok: Tokenizer, messages: list[dict], text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Where each message's text lies in `text`, the rendered conversation: the template is rendered
    again with a mark in place of each message's text, and the rendering must equal that skeleton with
    the texts put back (as written, or stripped as templates like Llama 3's do)."""
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    parts = _MARK.split(tok.render_chat(marked, add_generation_prompt))  # [template, i, template, j, ..., template]
    spans, pos = [], 0
    for k in range(0, len(parts) - 1, 2):
        if not text.startswith(parts[k], pos):
            break
        pos += len(parts[k])
        content, after = messages[int(parts[k + 1])]["content"], parts[k + 2]
        for t in (content, content.strip()):
            end = pos + len(t)
            if text.startswith(t, pos) and (text.startswith(after, end) if k + 3 < len(parts) else text[end:] == after):
                break
        else:
            break
        spans.append((pos, end))
        pos = end
    else:
        return spans
    raise HetinferError("the model's chat template changes the messages' text in a way hetinfer cannot follow "
                        "(it keeps control tokens out of message text); serve the model with a chat template "
                        "that writes each message's text as given")


class SPMTokenizer:
    """SentencePiece-style BPE: merge the adjacent pair whose merged piece scores highest."""

    def __init__(self, tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool = True):
        self.tokens, self.scores, self.types = tokens, scores, types
        self.index = {t: i for i, t in enumerate(tokens)}
        self.add_space_prefix = add_space_prefix
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(tokens) if types[i] == BYTE and len(t) == 6}
        self.specials = sorted(
            (t for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED) and t), key=len, reverse=True
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> "_Encoding":
        ids: list[int] = []
        for piece, special in _split_specials(text, self.specials):
            if special:
                ids.append(self.index[piece])
            elif piece:
                ids.extend(self._encode_piece(piece, first=not ids))
        return _Encoding(ids)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list["_Encoding"]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def _encode_piece(self, text: str, first: bool) -> list[int]:
        text = text.replace(" ", "\u2581")
        if self.add_space_prefix and first:
            text = "\u2581" + text
        syms = list(text)
        prev, nxt = list(range(-1, len(syms) - 1)), list(range(1, len(syms) + 1))
        heap: list = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < len(syms):
                tid = self.index.get(syms[i] + syms[j])
                if tid is not None:
                    heapq.heappush(heap, (-self.scores[tid], i, syms[i], syms[j]))

        for i in range(len(syms) - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if i < len(syms) else len(syms)
            if j >= len(syms) or syms[i] != left or syms[j] != right:
                continue  # stale entry
            syms[i], syms[j] = left + right, ""
            nxt[i] = nxt[j]
            if nxt[i] < len(syms):
                prev[nxt[i]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        out: list[int] = []
        for s in syms:
            if not s:
                continue
            if s in self.index:
                out.append(self.index[s])
            else:
                out.extend(self.byte_ids[b] for b in s.encode("utf-8"))
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        buf = bytearray()
        for i in ids:
            t, kind = self.tokens[i], self.types[i]
            if kind == BYTE:
                buf.append(int(t[3:5], 16))
            elif kind == CONTROL:
                if not skip_special_tokens:
                    buf += t.encode()
            else:
                buf += t.replace("\u2581", " ").encode()
        text = buf.decode("utf-8", errors="replace")
        if self.add_space_prefix and ids and self.types[ids[0]] not in (CONTROL, BYTE) and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]


@dataclass
class _Encoding:
    ids: list[int]


def _split_specials(text: str, specials: list[str]):
    """Yield (piece, is_special) splitting `text` at occurrences of special-token strings."""
    i = start = 0
    while i < len(text):
        for s in specials:
            if text.startswith(s, i):
                yield text[start:i], False
                yield s, True
                i = start = i + len(s)
                break
        else:
            i += 1
    yield text[start:], False


def _bpe_from_gguf(fields: dict, tokens: list[str], types: list[int]):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    pre = str(fields.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise HetinferError(
            f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))}); "
            "convert the model with a supported tokenizer or use its HF directory"
        )
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    # llama.cpp (like HF) takes a whole pre-token found in the vocabulary as is for Llama 3
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre in ("llama-bpe", "llama3"))
    tok = HFTok(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                            if k in (CONTROL, USER_DEFINED) and t])
    return tok


def tokenizer_from_gguf(fields: dict) -> Tokenizer:
    kind = fields.get("tokenizer.ggml.model")
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise HetinferError("the GGUF file has no tokenizer (tokenizer.ggml.tokens); convert it again with its vocabulary")
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _bpe_from_gguf(fields, tokens, types)
        add_bos_default = False
    elif kind == "llama":
        scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        backend = SPMTokenizer(tokens, scores, types, bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True
    else:
        raise HetinferError(f"tokenizer model {kind!r} is not supported (gpt2-style BPE and llama SentencePiece are)")
    bos, eos = fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id")
    stops = {int(i) for i in (eos, fields.get("tokenizer.ggml.eot_token_id"), fields.get("tokenizer.ggml.eom_token_id"))
             if i is not None}
    return Tokenizer(
        backend=backend,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=fields.get("tokenizer.chat_template"),
        stop_ids=stops,
        vocab_size=len(tokens),
        specials={t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (CONTROL, USER_DEFINED) and t},
    )


def tokenizer_from_hf(path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTok

    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise HetinferError(f"{path} has no tokenizer.json; save the tokenizer with the checkpoint (tokenizer.save_pretrained)")
    backend = HFTok.from_file(tj)
    cfg: dict = {}
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc) as fh:
            cfg = json.load(fh)

    def tok_id(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return backend.token_to_id(v) if v else None

    bos, eos = tok_id("bos_token"), tok_id("eos_token")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    gen_cfg = os.path.join(path, "generation_config.json")
    stops = {eos} if eos is not None else set()
    if os.path.isfile(gen_cfg):
        with open(gen_cfg) as fh:
            e = json.load(fh).get("eos_token_id")
        stops |= set(e if isinstance(e, list) else [e] if e is not None else [])
    return Tokenizer(
        backend=backend, bos_id=bos, eos_id=eos, add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=template, stop_ids=stops, vocab_size=backend.get_vocab_size(),
        specials={t.content: i for i, t in backend.get_added_tokens_decoder().items()},
    )
