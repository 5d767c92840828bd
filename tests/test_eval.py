"""Evaluation: dense perplexity against transformers, metric definitions, the eval command."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import data_path
from hetinfer.cli import main as run_cli
from hetinfer.data import Window, sliding_windows
from hetinfer.profiler.evaluate import evaluate
from hetinfer.profiler.runner import FloatWeights, LayerRunner, Packed
from hetinfer.sparse import topk_ffn
from test_profiler import random_sequences, tiny_model


@pytest.mark.slow
def test_dense_perplexity_matches_transformers(model, hf_model, wikitext_eval):
    ids = model.tokenizer.encode(wikitext_eval[:2600])[:600]
    window, stride = 256, 128
    ours = evaluate(model, sliding_windows(ids, window, stride), {"dense": None})["dense"]
    # the usual transformers recipe: each window scores the targets the previous one did not
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - max(prev_end, begin + 1)
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(x).logits[0, :-1].float(), -1)
        tgt = x[0, 1:]
        nll -= float(logp[-trg:].gather(1, tgt[-trg:, None]).sum())
        n += trg
        prev_end = end
        if end == len(ids):
            break
    assert ours.tokens == n == len(ids) - 1
    assert ours.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert ours.perplexity == ours.dense_perplexity
    assert (ours.top1_agreement, ours.kl, ours.ffn_density) == (1.0, 0.0, 1.0)


def test_sparse_metrics_follow_their_definitions():
    m = tiny_model(seed=11, n_layers=2)
    rng = np.random.default_rng(0)
    wins = [Window(s, int(rng.integers(0, 5))) for s in random_sequences(rng, 6, m.config.vocab_size, 10, 40)]
    w = FloatWeights(m)
    half, full = topk_ffn(m, 0.5, "torch", w), topk_ffn(m, 1.0, "torch", w)
    res = evaluate(m, wins, {"half": half, "all": full, "dense": None}, w, batch_tokens=64)
    # keeping every neuron is the dense model
    assert res["all"].perplexity == pytest.approx(res["dense"].perplexity, rel=1e-6)
    assert res["all"].top1_agreement == 1.0 and res["all"].kl == pytest.approx(0.0, abs=1e-9)
    assert res["half"].ffn_density == pytest.approx(0.5) and res["half"].layer_density == [0.5, 0.5]
    # recompute the sparse metrics directly from full-sequence logits
    packed = Packed([w_.tokens for w_ in wins])
    xd, xs = LayerRunner(m, packed, w).run(), LayerRunner(m, packed, w).run(topk_ffn(m, 0.5, "torch", w))
    nll = agree = kl = n = 0
    for k, win in enumerate(wins):
        ld = torch.log_softmax(w.logits(xd[packed.positions_of(k)]), -1)[win.first:-1]
        ls = torch.log_softmax(w.logits(xs[packed.positions_of(k)]), -1)[win.first:-1]
        tgt = torch.tensor(win.tokens[win.first + 1:])
        nll -= float(ls[torch.arange(len(tgt)), tgt].sum())
        agree += int((ls.argmax(-1) == ld.argmax(-1)).sum())
        kl += float(torch.nn.functional.kl_div(ls, ld, log_target=True, reduction="sum"))
        n += len(tgt)
    r = res["half"]
    assert r.tokens == n
    assert r.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert r.top1_agreement == agree / n < 1.0
    assert r.kl == pytest.approx(kl / n, rel=1e-4) and r.kl > 0


@pytest.mark.slow
def test_eval_command_json(model_path, capsys):
    held_out = data_path("wikitext-2", "valid.txt") + "[0.7:]"
    assert run_cli(["eval", "-m", model_path, "--data", held_out, "--mode", "oracle", "--sparsity", "0.5",
                    "--tokens", "200", "--window", "128", "--stride", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"perplexity", "top1_agreement", "kl", "ffn_density", "tokens", "layer_density"} <= set(out)
    assert out["tokens"] >= 200 and out["ffn_density"] == pytest.approx(0.5, abs=1e-3)
    assert 1.0 < out["perplexity"] / out["dense_perplexity"] < 1.5 and 0.5 < out["top1_agreement"] < 1.0
