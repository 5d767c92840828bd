"""Tokenization against llama.cpp (vocab-only load) and a SentencePiece reference."""
import json

import pytest

from tests.conftest import data_path


@pytest.fixture(scope="module")
def llama_vocab(model_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path, vocab_only=True, verbose=False)


def _texts():
    with open(data_path("mt_bench", "question.jsonl")) as fh:
        questions = [json.loads(line) for line in fh]
    with open(data_path("wikitext-2", "valid.txt")) as fh:
        lines = [line for line in fh.read().split("\n") if line.strip()][:200]
    return [t for q in questions for t in q["turns"]] + lines


def test_matches_llama_cpp_and_round_trips(model, llama_vocab):
    texts = _texts()
    assert len(texts) >= 360
    for text in texts + ["<|im_start|>user\nhi<|im_end|>\n", "  12345 tabs\t\tand\n\n\nnewlines", "héllo 日本語 🎉"]:
        ids = model.tokenizer.encode(text)
        assert ids == llama_vocab.tokenize(text.encode(), add_bos=False, special=True), text[:60]
        assert model.tokenizer.decode(ids) == text


def test_chat_template_renders_smollm_format(model):
    text = model.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_spm_tokenizer_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from hetinfer.tokenizer import SPMTokenizer

    with open(data_path("wikitext-2", "valid.txt")) as fh:
        corpus = [line for line in fh.read().split("\n") if line.strip()][:3000]
    (tmp_path / "c.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"), vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama 2 / Mistral
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    ours = SPMTokenizer([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)], types)
    for text in corpus[3000 - 200:] + ["Zürich costs 5€ — ok?", "  two  spaces"]:
        assert ours.encode(text).ids == sp.encode(text), text[:60]
        assert ours.decode(ours.encode(text).ids) == sp.decode(sp.encode(text))
