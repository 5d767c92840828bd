"""The GPU tier (hetinfer.offload.gpu) executing a plan beside the CPU tiers: exactness against the
dense engine for GPU/RAM/flash splits, the split of predicted sets by tier, the transfer and overlap
bookkeeping, and its bad input. Without CUDA the GPU side runs on the CPU stand-in (device "cpu":
the same torch code on its own thread); tests marked cuda run it on a GPU when one is present.
Unit tests use random-weight models (test_store.random_model)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.errors import HetinferError
from hetinfer.offload import gpu as gpu_mod
from hetinfer.offload.deploy import Deployment, tiered_ffn
from hetinfer.offload.ffn import TieredFFN
from hetinfer.offload.gpu import GPUExecutor, GPUMemoryError, open_executor, resolve_device
from hetinfer.offload.store import build_store
from hetinfer.placement.plan import Plan
from hetinfer.profiler.predictors import Predictors
from test_deploy import _prepare
from test_offload import _logits
from test_store import random_model

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def hybrid(model, store, n_gpu, n_ram, capacity, device="cpu", window=2, select=None) -> TieredFFN:
    """A TieredFFN whose layer l holds positions [0, n_gpu[l]) on `device`, the next n_ram[l] in RAM and the
    rest on flash behind a window cache of `capacity` slots (at most the layer's flash neurons)."""
    L, n_ff = model.config.n_layers, model.config.n_ff
    n_gpu, n_ram = (np.broadcast_to(np.asarray(a, np.int64), (L,)) for a in (n_gpu, n_ram))
    cap = np.minimum(np.broadcast_to(np.asarray(capacity), (L,)), n_ff - n_gpu - n_ram)
    gpu = GPUExecutor(store, n_gpu, device, model.config.activation)
    return tiered_ffn(store, None, select or (lambda layer, h: None), n_ram, cap, window, model.config.activation,
                      threads=2, gpu=gpu)


@pytest.mark.slow
def test_every_neuron_gives_the_dense_logits_for_any_gpu_split(model_f32, tmp_path):
    """SmolLM2, f32 store, every neuron active: random per-layer GPU/RAM/flash splits (a small cache, so the
    scratch path runs too), whole layers on the GPU beside layers without any, and GPU + flash without a RAM
    tier reproduce the dense engine's logits over a prompt (prefill) and decoded tokens (max |diff| <= 1e-4);
    each decode step moves one copy each way per layer with GPU work and computes each GPU neuron once."""
    m, cfg = model_f32, model_f32.config
    L, n_ff = cfg.n_layers, cfg.n_ff
    rng = np.random.default_rng(0)
    tiers = rng.choice(3, size=(L, n_ff), p=[0.3, 0.3, 0.4]).astype(np.uint8)
    store = build_store(m, tmp_path / "s.store", tiers, [rng.permutation(n_ff) for _ in range(L)], weights="f32",
                        progress=False)
    prompt = m.tokenizer.encode("Hot neurons on the GPU, the rest on the CPU:")
    steps = 4
    want = _logits(m, None, prompt, steps)
    n_gpu = rng.integers(0, n_ff // 2, L)
    whole = np.where(np.arange(L) % 3 == 0, n_ff, 0)
    for g, ram, cap in ((n_gpu, rng.integers(0, n_ff // 4, L), 40), (whole, (n_ff - whole) // 2, n_ff), (n_gpu, 0, 0)):
        ffn = hybrid(m, store, g, ram, cap)
        got = _logits(m, ffn, prompt, steps)
        assert np.abs(got - want).max() <= 1e-4, (g, ram, cap)
        r = ffn.report()
        with_gpu = int((g > 0).sum())
        assert r["ffn_density"] == 1.0 and r["gpu_neurons_per_token"] == g.sum()
        assert r["transfers_per_token"] == 2 * with_gpu
        assert r["gpu_split_layers_per_token"] == int(((g > 0) & (g < n_ff)).sum())
        assert r["transfer_bytes_per_token"] == sum(  # h in, y out; every GPU neuron active: no positions sent
            -(-4 * cfg.d_model // 8) * 8 + 4 * cfg.d_model for n in g if n)
        assert r["gpu_s_per_token"] > 0 and r["gpu_wall_s_per_token"] > 0 and 0 <= r["gpu_overlap"] <= 1
        ffn.gpu.close()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_layers_placed_on_a_device_give_the_host_logits(model_path, model_f32, device):
    """`place_layers` on SmolLM2 (f32): whole layers 10-19 and the output head (the layer split llama.cpp's
    -ngl makes), or only every third layer's attention (a plan's GPU attention beside a CPU FFN), run on the
    device with their KV cache there; prompt and decode logits within 1e-4 of the host engine's, and with a
    float16 cache within 1e-2 of the host's float16 cache (a key rounded the other way moves ~1e-3)."""
    from hetinfer.loader import load_model
    from hetinfer.model import place_layers

    prompt = model_f32.tokenizer.encode("Hot neurons on the GPU, the rest on the CPU:")
    want = _logits(model_f32, None, prompt, 4)
    for layers, ffn, head in ((range(10, 20), True, True), (range(0, 30, 3), False, False)):
        m = load_model(model_path, weights="f32")
        moved = place_layers(m.transformer, torch.device(device), layers, ffn=ffn, head=head)
        L = m.weights.layers[layers[0]]
        assert isinstance(L.wq, kernels.GPUTensor) and isinstance(L.gate, kernels.GPUTensor) == ffn
        assert moved == sum(getattr(model_f32.weights.layers[i], n).nbytes for i in layers
                            for n in ("wq", "wk", "wv", "wo") + (("gate", "up", "down") if ffn else ())
                            ) + (model_f32.weights.output.nbytes if head else 0)
        cache = m.transformer.new_cache(64)
        assert isinstance(cache.k_layers[layers[0]], torch.Tensor) and type(cache.k_layers[1]) is np.ndarray
        got = _logits(m, None, prompt, 4)
        assert type(got) is np.ndarray and np.abs(got - want).max() <= 1e-4, (layers, np.abs(got - want).max())
        f16 = [_logits(x, None, prompt, 4, kv="f16") for x in (model_f32, m)]
        assert np.abs(f16[1] - f16[0]).max() <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ["f32", "q4_1"])
@pytest.mark.parametrize("h_on_device", [False, True])
def test_predicted_sets_split_by_tier(tmp_path, device, qtype, h_on_device):
    """Random model, a fixed predicted set per layer: the GPU computes exactly the set's GPU-tier neurons, the
    CPU the rest (RAM and flash), and their sum equals sparse_ffn over the model's own matrices for the set;
    the look-ahead reads only flash-tier records, so the second token finds every flash neuron cached.
    With h on the device (the layer's attention ran there) the sum comes back there: per layer h goes out
    once for the CPU side, and the GPU part's positions and the CPU side's y come in."""
    m = random_model(qtype, n_layers=3, n_ff=96)
    cfg = m.config
    rng = np.random.default_rng(1)
    tiers = rng.choice(3, size=(cfg.n_layers, cfg.n_ff)).astype(np.uint8)
    store = build_store(m, tmp_path / "s.store", tiers, [rng.permutation(cfg.n_ff) for _ in range(cfg.n_layers)],
                        progress=False)
    ids = [np.sort(rng.permutation(cfg.n_ff)[:40]) for _ in range(cfg.n_layers)]
    n_gpu = np.array([s.tier_starts[1] for s in store.layers])
    n_ram = np.array([s.tier_starts[2] - s.tier_starts[1] for s in store.layers])
    ffn = hybrid(m, store, n_gpu, n_ram, cfg.n_ff, device, select=lambda layer, h: ids[layer])
    for token in range(2):
        ffn.reset_stats()
        for layer, Lw in enumerate(m.weights.layers):
            h = rng.standard_normal((1, cfg.d_model)).astype(np.float32)
            want = kernels.sparse_ffn(Lw.gate, Lw.up, kernels.transpose_down(Lw.down), ids[layer], h, "silu")
            got = ffn(layer, torch.from_numpy(h).to(device) if h_on_device else h)
            if h_on_device:
                assert got.device.type == device
                got = got.cpu().numpy()
            if qtype == "f32":
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            else:  # the GPU side multiplies in float16, the CPU quantizes x to 8 bits (~0.5% each way)
                assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want)
        r = ffn.report()
        on_gpu = sum(int((store.layers[i].position[ids[i]] < n_gpu[i]).sum()) for i in range(cfg.n_layers))
        assert r["gpu_neurons_per_token"] == on_gpu
        assert r["transfers_per_token"] == (3 if h_on_device else 2) * cfg.n_layers  # every layer has both sides
        assert r["cache_hit_rate"] == (0.0 if token == 0 else 1.0)
    summary = ffn.placement_summary()["tiers"]
    assert summary["gpu"]["bytes"] == ffn.gpu.nbytes == n_gpu.sum() * (store.record_bytes - _pad(store))
    assert summary["gpu"]["activation_share"] == pytest.approx(on_gpu / sum(len(i) for i in ids))
    ffn.gpu.close()


def _pad(store) -> int:
    """Bytes of a record past its three rows (the GPU holds the rows only)."""
    return store.record_bytes - sum(gpu_mod._part_bytes(store))


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_tier_is_held_in_the_stored_format(tmp_path, device):
    m = random_model("q4_0", n_layers=2, n_ff=64)
    tiers = np.zeros((2, 64), np.uint8)
    store = build_store(m, tmp_path / "s.store", tiers, progress=False)
    ex = GPUExecutor(store, np.array([64, 10]), device, "silu")
    Wg, Wu, Wd_t = ex.weights[1]
    assert (Wg.qtype, Wd_t.qtype) == ("q4_0", "q8_0") and Wg.data.dtype == torch.uint8
    assert Wg.shape == (10, 64) and Wg.device.type == device
    assert np.array_equal(Wg.data.cpu().numpy(), store.views(store.read_records(1, 0, 10))[0].data)
    ex.close()


@pytest.mark.slow
@no_cuda
def test_prepare_with_gpu_mem_runs_on_the_stand_in_only_when_asked(tmp_path, offline, model_path, capsys):
    """`prepare --gpu-mem` on a machine without CUDA plans for a what-if GPU; `run` refuses the deployment
    (one line naming --gpu-mem 0 and --device cpu), `--device cuda` is refused too, and `--device cpu` runs
    the GPU tier on the stand-in, with the attention and KV cache of the layers the plan puts on the GPU:
    with every neuron (f32 store) its greedy text is the dense engine's; with the predictors (run on the
    stand-in for those layers) a layer exchanges at most one copy each way."""
    from hetinfer.cli import main
    from hetinfer.offload.deploy import tier_counts
    from hetinfer.placement import load_plan

    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    assert main(_prepare(out, flash, offline, "--gpu-mem", "260MiB", "--weights", "f32")) == 0
    m = json.loads((out / "deployment.json").read_text())
    n_gpu = tier_counts(load_plan(out / m["plan"]))[:, 0]
    assert m["gpu"] is None and n_gpu.sum() > 0
    prompt = ["-p", "The capital of France is", "-n", "8", "--temperature", "0"]
    run = ["run", str(out), *prompt, "--sparsity", "0"]
    capsys.readouterr()
    for extra, want in (([], "--gpu-mem 0.*--device cpu"), (["--device", "cuda"], "--device cuda: no CUDA device")):
        assert main(run + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert re.search(want, err[0]), err[0]
    stats = tmp_path / "stats.json"
    assert main(run + ["--device", "cpu", "--verbose", "--stats-json", str(stats)]) == 0
    got = capsys.readouterr()
    s = json.loads(stats.read_text())
    plan = load_plan(out / m["plan"])
    attn = np.array([plan.attention_on_gpu(i) for i in range(len(n_gpu))])
    assert attn.any()  # the what-if GPU takes attention too: it runs on the stand-in, its KV cache there
    assert f"attention of {attn.sum()} layers |" in got.err and s["gpu_attention_layers"] == attn.sum()
    # copies per layer and token: attention on the host and GPU neurons: h in, y out; attention on the GPU: h out
    # for the CPU side, its y in unless the GPU holds every neuron (every neuron active: no positions sent)
    n_ff = len(plan.tiers[0])
    want = np.where(attn, 1 + (n_gpu < n_ff), 2 * (n_gpu > 0)).sum()
    assert s["gpu_neurons_per_token"] == n_gpu.sum() and s["transfers_per_token"] == want
    assert main(["generate", "-m", model_path, "--weights", "f32", *prompt]) == 0
    assert got.out == capsys.readouterr().out and got.out.strip()
    # with its predictors, a GPU-attention layer predicts there: at most one copy each way per layer
    assert main(["run", str(out), *prompt, "--device", "cpu", "--stats-json", str(stats)]) == 0
    assert capsys.readouterr().out.strip()
    s = json.loads(stats.read_text())
    assert 0 < s["transfers_per_token"] <= 2 * int(((n_gpu > 0) | attn).sum())
    assert 0 < s["gpu_neurons_per_token"] < n_gpu.sum()


def test_no_cuda_refuses_a_gpu_plan_unless_the_stand_in_is_asked_for():
    assert resolve_device(None, 0, "DEPLOY") is None and resolve_device("cpu", 0, "DEPLOY") is None
    assert resolve_device("cpu", 5, "DEPLOY") == torch.device("cpu")
    with pytest.raises(HetinferError, match="--device tpu: use cuda, cuda:N or cpu"):
        resolve_device("tpu", 5, "DEPLOY")


@no_cuda
def test_gpu_plan_without_cuda_names_both_fixes():
    with pytest.raises(HetinferError, match=r"DEPLOY was planned with 1,234 GPU-tier neurons .* no CUDA device; "
                                            r"re-plan .*--gpu-mem 0.*--device cpu"):
        resolve_device(None, 1234, "DEPLOY")
    with pytest.raises(HetinferError, match="--device cuda: no CUDA device is visible.*use --device cpu"):
        resolve_device("cuda", 1234, "DEPLOY")


def test_gpu_tier_too_big_for_the_device_is_refused_before_loading(tmp_path, monkeypatch):
    m = random_model("f32", n_layers=2, n_ff=64)
    store = build_store(m, tmp_path / "s.store", np.zeros((2, 64), np.uint8), progress=False)
    need = 2 * 64 * 3 * 64 * 4
    monkeypatch.setattr(gpu_mod, "device_free_bytes", lambda device: need - 1000)
    with pytest.raises(GPUMemoryError, match="need 96.00 KiB but the CPU stand-in has 95.02 KiB free; lower "
                                             "--gpu-mem by at least 1000 B"):
        GPUExecutor(store, np.array([64, 64]), "cpu", "silu")


def test_out_of_memory_at_load_says_how_much_to_lower_gpu_mem(tmp_path, monkeypatch):
    """The device runs out while copying layer 1 (a fault injected into the copy): the error names the GPU
    tier, the layer, and the bytes still to load, which is what --gpu-mem must drop by at least."""
    m = random_model("f32", n_layers=3, n_ff=64)
    store = build_store(m, tmp_path / "s.store", np.zeros((3, 64), np.uint8), progress=False)
    copies = []

    def to_cuda(W, device):
        copies.append(W)
        if len(copies) > 3:  # layer 0's three matrices fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return kernels.cuda.to_cuda(W, device)

    monkeypatch.setattr(kernels, "to_cuda", to_cuda)
    with pytest.raises(GPUMemoryError, match=r"loading the GPU tier \(layer 1's neurons, 72.00 KiB still to load\); "
                                             r"lower --gpu-mem by at least 72.00 KiB"):
        GPUExecutor(store, np.array([64, 32, 64]), "cpu", "silu")


def _gpu_deployment(tmp_path, attn: set[int], head: bool) -> Deployment:
    """A random f32 model (3 layers) whose store holds every neuron in tier order, and a plan (the fields
    `open_executor` reads) putting the attention of `attn` and, with `head`, the output head on the GPU."""
    m = random_model("f32", n_layers=3, n_ff=64)
    store = build_store(m, tmp_path / "s.store", np.zeros((3, 64), np.uint8), progress=False)
    manifest = {"layers": [{"attention": "gpu" if i in attn else "ram"} for i in range(3)],
                "dense": {"head": "gpu" if head else "ram"}, "hardware": {"sources": {}},
                "model": {"kv_bytes_per_layer": 4096}}
    return Deployment(tmp_path, {"gpu": None}, m, Plan(manifest, np.zeros((3, 64), np.uint8)), store, None)


def _moved_bytes(dep, attn: set[int], head: bool) -> int:
    w = dep.model.weights
    return (sum(getattr(w.layers[i], n).nbytes for i in attn for n in ("wq", "wk", "wv", "wo")) + 4096 * len(attn)
            + (w.output.nbytes if head else 0))


@pytest.mark.parametrize("device", DEVICES)
def test_open_executor_runs_the_plans_gpu_attention_and_head_there(tmp_path, device):
    """The layers whose attention the plan puts on the GPU, and the head, move to the device with their KV cache
    (a layer without GPU neurons among them); with every neuron active the logits are the dense engine's
    (1e-4), and each decode step counts its copies: h out and the CPU side's y in per GPU-attention layer with
    CPU neurons, h in and y out per host-attention layer with GPU neurons."""
    attn = {0, 1}
    dep = _gpu_deployment(tmp_path, attn, head=True)
    want = _logits(random_model("f32", n_layers=3, n_ff=64), None, [1, 5, 9], 3)
    n_gpu, moved = np.array([64, 0, 32]), _moved_bytes(dep, attn, True)
    ex = open_executor(dep, n_gpu, device)
    w = dep.model.weights
    assert [isinstance(L.wq, kernels.GPUTensor) for L in w.layers] == [True, True, False]
    assert isinstance(w.output, kernels.GPUTensor) and ex.dense_nbytes == moved
    cache = dep.model.transformer.new_cache(8)
    assert isinstance(cache.k_layers[1], torch.Tensor) and cache.k_layers[1].device.type == device
    ffn = tiered_ffn(dep.store, None, lambda layer, h: None, 64 - n_gpu, np.zeros(3, np.int64), 0, "silu", gpu=ex)
    got = _logits(dep.model, ffn, [1, 5, 9], 3)
    assert np.abs(got - want).max() <= 1e-4
    # layer 0: every neuron on the GPU (h out for the predictor's side, nothing back); layer 1: h out, y in;
    # layer 2 (attention in RAM): h in, y out
    assert ffn.report()["transfers_per_token"] == 1 + 2 + 2
    summary = ffn.placement_summary()["tiers"]["gpu"]["components"]
    assert summary == {"ffn_gpu": ex.nbytes, "dense_gpu": ex.dense_nbytes} and ffn.report()["gpu_attention_layers"] == 2
    ex.close()


@pytest.mark.parametrize("device", DEVICES)
def test_a_gpu_layer_predicts_its_set_there_and_copies_once_each_way(tmp_path, device):
    """With h on the device (the layer's attention ran there), the layer's predictor runs there too
    (`Predictors.device_rows`): the GPU part's positions never leave the device, h and the CPU side's
    positions come out in one copy and the CPU side's y goes in: one copy each way per layer. The sum equals
    sparse_ffn over the model's own matrices for the set the host's predictor picks."""
    m = random_model("f32", n_layers=3, n_ff=96)
    rng = np.random.default_rng(4)
    store = build_store(m, tmp_path / "s.store", np.zeros((3, 96), np.uint8),
                        [rng.permutation(96) for _ in range(3)], progress=False)
    pred = Predictors({}, [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(3)],
                      [rng.standard_normal((96, 8)).astype(np.float32) for _ in range(3)], np.full(3, 0.5, np.float32))
    n_gpu = np.array([40, 40, 40])
    ex = GPUExecutor(store, n_gpu, device, "silu")
    ffn = tiered_ffn(store, None, pred.rows, 96 - n_gpu, np.zeros(3, np.int64), 0, "silu", gpu=ex,
                     device_select=pred.device_rows)
    on_gpu = 0
    for layer, Lw in enumerate(m.weights.layers):
        h = rng.standard_normal((1, 64)).astype(np.float32)
        ids = pred.rows(layer, h)
        assert 0 < len(ids) < 96 and np.array_equal(pred.device_rows(layer, torch.from_numpy(h).to(device)).cpu(), ids)
        want = kernels.sparse_ffn(Lw.gate, Lw.up, kernels.transpose_down(Lw.down), ids, h, "silu")
        got = ffn(layer, torch.from_numpy(h).to(device))
        assert got.device.type == device
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=1e-5)
        on_gpu += int((store.layers[layer].position[ids] < 40).sum())
    r = ffn.report()
    assert r["gpu_neurons_per_token"] == on_gpu and r["transfers_per_token"] == 2 * 3
    ex.close()


def test_gpu_attention_that_does_not_fit_is_refused_before_moving(tmp_path, monkeypatch):
    dep = _gpu_deployment(tmp_path, {0, 2}, head=False)
    n_gpu = np.array([64, 0, 0])
    need = 64 * 3 * 64 * 4 + _moved_bytes(dep, {0, 2}, False)
    monkeypatch.setattr(gpu_mod, "device_free_bytes", lambda device: need - 2048)
    with pytest.raises(GPUMemoryError, match=r"the GPU tier \(neurons, attention, KV cache and head\) need .* but the CPU "
                                             r"stand-in has .* free; lower --gpu-mem by at least 2.00 KiB"):
        open_executor(dep, n_gpu, "cpu")
    assert not any(isinstance(L.wq, kernels.GPUTensor) for L in dep.model.weights.layers)


def test_out_of_memory_moving_attention_says_how_much_to_lower_gpu_mem(tmp_path, monkeypatch):
    dep = _gpu_deployment(tmp_path, {0, 2}, head=False)
    copies = []

    def to_cuda(W, device):
        copies.append(W)
        if len(copies) > 3 + 4:  # layer 0's neurons and its attention fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return kernels.cuda.to_cuda(W, device)

    monkeypatch.setattr(kernels, "to_cuda", to_cuda)
    with pytest.raises(GPUMemoryError, match=r"out of memory on the CPU stand-in moving 2 layers' attention and KV "
                                             r"cache \(.*\) there; lower --gpu-mem by at least"):
        open_executor(dep, np.array([64, 0, 0]), "cpu")


def test_gpu_mem_above_free_vram_is_refused_when_planning(monkeypatch):
    """`hetinfer place/prepare --gpu-mem` on a CUDA machine: more than the free memory is an error naming it.
    The probes of a GPU that is not here are replaced by their measurements."""
    from hetinfer.placement import probe
    from hetinfer.placement.hardware import GpuTier, HardwareError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(probe, "measure_gpu", lambda *a, **k: GpuTier(8 << 30, 1e12, 2e10, 1e-5))
    monkeypatch.setattr(probe, "measure_cpu_bytes_per_s", lambda *a, **k: 1e10)
    monkeypatch.setattr(probe, "_cpu_layer_costs", lambda *a, **k: {"layer_seconds": 0.0, "position_seconds": 0.0})
    assert probe.detect(gpu_mem=4 << 30).gpu.capacity_bytes == 4 << 30
    with pytest.raises(HardwareError, match=r"--gpu-mem 10.00 GiB is more than the 8.00 GiB free on Test GPU; "
                                            r"lower --gpu-mem to at most 8.00 GiB"):
        probe.detect(gpu_mem=10 << 30)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_another_gpu_than_planned_warns_how_to_replan(capsys):
    here = torch.cuda.get_device_properties(0)
    gpu_mod.check_same_gpu({"name": here.name, "total_bytes": here.total_memory}, False, torch.device("cuda"), "D")
    assert capsys.readouterr().err == ""
    gpu_mod.check_same_gpu({"name": "Other GPU", "total_bytes": 1 << 30}, False, torch.device("cuda"), "D")
    err = capsys.readouterr().err
    assert "D was planned on Other GPU (1.00 GiB) and runs on " + here.name in err and "--gpu-mem SIZE" in err
    gpu_mod.check_same_gpu(None, True, torch.device("cuda"), "D")
    assert "what-if GPU with assumed speeds" in capsys.readouterr().err
