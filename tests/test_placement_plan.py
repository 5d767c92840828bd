"""The plan artefact (write, read, validate) and `hetinfer place` end to end."""
import argparse
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hetinfer.config import ModelConfig
from hetinfer.placement import cli, ilp, synth
from hetinfer.placement.cost import (FLASH, FLASH_IO_BYTES, FLASH_MAX_READ, FLASH_POOL_BYTES, GPU, PlacementError,
                                     WeightFormats, build_problem, evaluate, flash_io_bytes, gpu_decode_bytes,
                                     model_sizes, weight_sizes)
from hetinfer.placement.hardware import ASSUMED_FLASH, FlashTier, GpuTier, Hardware, RamTier, save_hardware
from hetinfer.placement.manifest import build_manifest
from hetinfer.placement.plan import Plan, PlanError, load_plan, save_plan

SMALL = ModelConfig(arch="llama", n_layers=4, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, head_dim=64,
                    vocab_size=1024, context_length=512, name="small")
LLAMA2_70B_HF = {"model_type": "llama", "hidden_act": "silu", "hidden_size": 8192, "intermediate_size": 28672,
                 "max_position_embeddings": 4096, "num_attention_heads": 64, "num_hidden_layers": 80,
                 "num_key_value_heads": 8, "tie_word_embeddings": False, "vocab_size": 32000,
                 "_name_or_path": "meta-llama/Llama-2-70b-hf"}


def machine(gpu=3 << 20, ram=1600 << 10, flash=1 << 30) -> Hardware:
    """By default the GPU holds 3 of the 4 layers' dense parts, and GPU, RAM and flash all get neurons.
    `gpu` counts the bytes besides the GPU kernels' decode temporaries, `ram` besides the flash I/O buffers."""
    gpu = gpu and gpu + gpu_decode_bytes(SMALL)
    ram = ram + (FLASH_IO_BYTES if flash else 0)
    return Hardware(ram=RamTier(ram, 2e10), gpu=GpuTier(gpu, 5e11, 2e10, 2e-5) if gpu else None,
                    flash=FlashTier(flash, "/nvme", method="assumed", **ASSUMED_FLASH) if flash else None)


def small_plan(tmp_path, hw=None):
    freq = np.random.default_rng(0).permutation(synth.power_law(4, 512, 1.0, 0.9).ravel()).reshape(4, 512)
    p = build_problem(freq, SMALL, model_sizes(SMALL, WeightFormats.uniform("q8_0"), 512), hw or machine())
    sol = ilp.solve(p, max_binaries=600, time_limit=10)
    manifest = build_manifest(p, sol, SMALL, vars(WeightFormats.uniform("q8_0")), {}, [], {"source": None})
    save_plan(tmp_path / "plan", manifest, sol.tiers)
    return p, sol


@pytest.mark.parametrize("overlap", [0.0, 0.8])
def test_plan_roundtrip_gives_the_engine_every_neurons_tier(tmp_path, overlap):
    hw = machine()
    hw.flash.overlap = overlap
    p, sol = small_plan(tmp_path, hw)
    plan = load_plan(tmp_path / "plan")
    np.testing.assert_array_equal(plan.tiers, sol.tiers)
    assert plan.config == SMALL
    for layer in range(4):
        parts = [plan.neurons(layer, t) for t in ("gpu", "ram", "flash")]
        assert sorted(np.concatenate(parts).tolist()) == list(range(512))
        assert (plan.neurons(layer, "gpu") == np.flatnonzero(sol.tiers[layer] == GPU)).all()
        assert plan.attention_on_gpu(layer) == bool(p.dense.attn_on_gpu[layer])
    m = plan.manifest
    assert m["format"] == "hetinfer.plan" and m["version"] == 2
    assert {"gpu", "ram", "flash"} <= set(m["tiers"])
    assert plan.window_cache_bytes == m["tiers"]["ram"]["window_cache_bytes"]
    for t in m["tiers"].values():
        assert t["used_bytes"] <= t["capacity_bytes"]
    assert sum(t["activation_share"] for t in m["tiers"].values()) == pytest.approx(1.0)
    assert sum(t["neurons"] for t in m["tiers"].values()) == 4 * 512
    for name in ("gpu", "ram"):
        assert sum(row[f"{name}_bytes"] for row in m["layers"]) == m["tiers"][name]["neuron_bytes"]
    assert sum(row["flash_bytes"] for row in m["layers"]) == m["tiers"]["flash"]["used_bytes"]
    usage = evaluate(p, sol.tiers)
    assert m["solver"]["objective"] == sol.seconds == usage.seconds
    assert m["predicted"]["tok_s"] == pytest.approx(1 / usage.predicted_seconds)
    assert plan.layer_window_cache_bytes.tolist() == usage.layer_window_bytes.tolist()
    assert plan.layer_window_cache_bytes.sum() == plan.window_cache_bytes > 0
    assert m["model"]["record_bytes"] == [3 * 272] * 4  # q8_0 rows of 256: a multiple of 8 already
    assert m["dense"]["flash_io_bytes"] == FLASH_IO_BYTES
    parts = m["dense"]["seconds_per_token"] + m["sync"]["seconds_per_token"] + sum(
        t["seconds_per_token"] for t in m["tiers"].values()) - m["tiers"]["flash"]["hidden_seconds_per_token"]
    assert parts == pytest.approx(m["predicted"]["seconds_per_token"])  # the breakdown adds up to the prediction
    assert (m["tiers"]["flash"]["hidden_seconds_per_token"] > 0) == (overlap > 0)
    assert m["hardware"]["flash"]["overlap"] == overlap
    from hetinfer.placement.cli import report

    text = report({**m, "inputs": {"frequencies": "every neuron"}}, "plan")
    assert ("flash reads hidden behind compute" in text) == (overlap > 0)
    assert f"ILP {m['solver']['status']}, gap" in text
    killed = report({**m, "inputs": {"frequencies": "every neuron"}, "solver": {**m["solver"], "status": "killed"}}, "p")
    assert "ILP killed, still running past its time limit (its warm start stands in)" in killed


def test_reading_a_plan_does_not_import_the_solver(tmp_path):
    """The engine reads plans; PuLP (and its bundled CBC) is needed only by `hetinfer place`."""
    _, sol = small_plan(tmp_path)
    code = ("import sys; from hetinfer.placement import load_plan; "
            f"plan = load_plan({str(tmp_path / 'plan')!r}); "
            "print(int(plan.tiers.sum()), 'pulp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(int(sol.tiers.sum())), "False"]


def test_rewriting_a_plan_replaces_its_array(tmp_path):
    small_plan(tmp_path)
    small_plan(tmp_path, hw=machine(gpu=None, ram=8 << 20))
    files = sorted(f.name for f in (tmp_path / "plan").iterdir())
    assert len(files) == 2 and files[0] == "plan.json" and files[1].startswith("tiers.")
    assert (load_plan(tmp_path / "plan").tiers != GPU).all()


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "plan.json").unlink(), "no plan.json"),
    (lambda d: (d / "plan.json").write_text("{"), "unreadable"),
    (lambda d: _edit(d, lambda m: m.update(version=9)), "plan version 9"),
    (lambda d: _edit(d, lambda m: m.update(format="x")), "not a hetinfer plan"),
    (lambda d: _edit(d, lambda m: m["layers"][0].update(ram=-1)), "layer 0 ram count disagrees"),
    (lambda d: _edit(d, lambda m: m["layers"][1].update(window_cache_bytes=m["layers"][1]["window_cache_bytes"] + 1)),
     "window_cache_bytes are not whole bytes adding up"),
    (lambda d: _edit(d, lambda m: m["layers"][1].pop("window_cache_bytes")), "window_cache_bytes` is missing"),
    (lambda d: _edit(d, lambda m: m["model"]["config"].update(n_ff=256)), "the model needs uint8"),
    (lambda d: next(d.glob("tiers.*.npy")).write_bytes(b"x"), "do not match the manifest's sha256"),
    (lambda d: next(d.glob("tiers.*.npy")).unlink(), "tier array unreadable"),
    (lambda d: _edit(d, lambda m: m["model"].update(kv_dtype="f8")), "KV-cache dtype 'f8' is not one of f32, f16"),
])
def test_damaged_plans_are_refused_with_the_fix(tmp_path, damage, message):
    small_plan(tmp_path)
    damage(tmp_path / "plan")
    with pytest.raises(PlanError, match=message) as e:
        load_plan(tmp_path / "plan")
    assert "\n" not in str(e.value) and ("hetinfer place" in str(e.value) or "sha256" in str(e.value)
                                         or "not a hetinfer plan" in str(e.value))


def _edit(d, fn):
    m = json.loads((d / "plan.json").read_text())
    fn(m)
    (d / "plan.json").write_text(json.dumps(m))


# -------------------------------------------------------------------------------------------- CLI


class StubProfile:
    """Stands in for hetinfer.profiler.artifact's Profile (config dict, tokens, activation_frequency and the
    stored FFN inputs [n_layers, S, d], when given)."""

    def __init__(self, config: ModelConfig, freq: np.ndarray, inputs: np.ndarray | None = None):
        self.config, self.tokens, self.freq, self.inputs = config.to_dict(), 1000, freq.astype(np.float32), inputs
        self.has_samples = inputs is not None

    def activation_frequency(self, sparsity: float = 0.5) -> np.ndarray:
        return self.freq

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs, np.arange(self.inputs.shape[1])


@pytest.fixture
def profiles(monkeypatch):
    """Path -> StubProfile, served in place of hetinfer.profiler.artifact.load_profile."""
    table = {}
    monkeypatch.setattr(cli, "load_profile", lambda path, model=None: table[str(path)])
    return table


def place(*argv) -> int:
    ap = argparse.ArgumentParser(prog="hetinfer")
    cli.add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["place", *map(str, argv)])
    return args.run(args)


def test_place_json_reports_the_solve_and_every_tier(tmp_path, profiles, capsys):
    freq = synth.power_law(4, 512, 1.0, 0.9)
    profiles["prof"] = StubProfile(SMALL, np.random.default_rng(1).permuted(freq, axis=1))
    save_hardware(machine(), tmp_path / "hw.json")
    assert place("--profile", "prof", "--hardware", tmp_path / "hw.json", "--qtype", "q8_0",
                 "-o", tmp_path / "plan", "--json", "--time-limit", "10", "--max-binaries", "600") == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("solve_seconds", "mip_gap", "objective", "greedy_objective", "predicted_tok_s", "tiers"):
        assert key in out
    assert out["objective"] <= out["greedy_objective"]
    assert out["frequencies"] == "profile" and out["ffn_density"] == pytest.approx(freq.mean())
    assert set(out["tiers"]) == {"gpu", "ram", "flash"}
    for t in out["tiers"].values():
        assert 0 < t["used_bytes"] <= t["capacity_bytes"]
    assert out["prediction"] and any("formats assumed: q8_0" in a for a in out["assumptions"])
    plan = load_plan(tmp_path / "plan")
    assert plan.manifest["inputs"]["profile"] == "measured" and plan.manifest["profile"]["tokens"] == 1000
    assert plan.manifest["inputs"]["predictors"] == "none" and plan.manifest["predictors"]["layer_bytes"] == [0] * 4
    # planned for computing every neuron: each one priced as used every token
    assert place("--profile", "prof", "--hardware", tmp_path / "hw.json", "--qtype", "q8_0", "--every-neuron", "--window", "0", "--ram", "64MiB",
                 "-o", tmp_path / "every", "--json", "--time-limit", "10", "--max-binaries", "600") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frequencies"] == "every neuron" and out["ffn_density"] == 1.0


def test_with_predictors_neurons_are_priced_by_how_often_the_predictors_select_them(tmp_path, profiles, capsys):
    """The engine computes what the predictors select, not the profile's actives at --sparsity: `place` runs
    the predictors (random ones here) over the profile's stored FFN inputs and prices each neuron by its
    count; without stored inputs it keeps the profile's frequencies and says so."""
    import torch

    from hetinfer.profiler.predictors import Predictors, predict_logits

    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((4, 300, SMALL.d_model), dtype=np.float32)
    w1 = [torch.from_numpy(rng.standard_normal((8, SMALL.d_model), dtype=np.float32)) for _ in range(4)]
    w2 = [torch.from_numpy(rng.standard_normal((SMALL.n_ff, 8), dtype=np.float32)) for _ in range(4)]
    from dataclasses import asdict

    from hetinfer.profiler.predictors import TrainOptions

    manifest = {"hetinfer_version": "test", "created": "2026-12-04T00:00:00+00:00", "layers": [0, 1, 2, 3],
                "model": {"config": SMALL.to_dict(), "fingerprint": "random", "path": "random"},
                "profile": {"path": None, "created": None, "tokens": 0}, "options": asdict(TrainOptions()),
                "report": [], "summary": {}}
    Predictors(manifest, w1, w2, torch.full((4,), 25.0)).save(str(tmp_path / "predictors"))
    selected = np.stack([(predict_logits(w1[i], w2[i], torch.from_numpy(inputs[i])) > 25.0).double().mean(0).numpy()
                         for i in range(4)])  # [4, n_ff] the direct count
    profiles["prof"] = StubProfile(SMALL, synth.power_law(4, 512, 1.0, 0.95), inputs)
    profiles["bare"] = StubProfile(SMALL, synth.power_law(4, 512, 1.0, 0.95))
    sizes = model_sizes(SMALL, WeightFormats.uniform("q8_0"), 512, predictor_bytes=8 * (256 + 512) * 4)
    dense = build_problem(selected, SMALL, sizes, machine(gpu=None, ram=64 << 20)).dense.ram_bytes - FLASH_IO_BYTES
    save_hardware(machine(gpu=None, ram=dense + (800 << 10)), tmp_path / "hw.json")  # about half the FFN fits
    common = ["--predictors", tmp_path / "predictors", "--hardware", tmp_path / "hw.json", "--qtype", "q8_0",
              "--window", "2", "--json", "--time-limit", "10", "--max-binaries", "600"]
    place("--profile", "prof", "-o", tmp_path / "plan", *common)
    out = json.loads(capsys.readouterr().out)
    assert out["frequencies"] == "predictors" and out["ffn_density"] == pytest.approx(selected.mean())
    assert 0.15 < selected.mean() < 0.4  # not the profile's 5%
    plan = load_plan(tmp_path / "plan")
    assert plan.manifest["inputs"]["frequencies"] == "predictors"
    for layer in range(4):  # hot before cold by the predictors' counts, not by the profile's order
        ram, fl = selected[layer][plan.tiers[layer] == 1], selected[layer][plan.tiers[layer] == FLASH]
        assert len(ram) and len(fl) and ram.min() >= fl.max()
    place("--profile", "bare", "-o", tmp_path / "plan2", *common)
    out = json.loads(capsys.readouterr().out)
    assert out["frequencies"] == "profile" and out["ffn_density"] == pytest.approx(0.05, abs=1e-3)
    assert any("keeps no FFN inputs" in a for a in out["assumptions"])


def test_place_prints_tier_and_layer_tables(tmp_path, profiles, capsys):
    profiles["prof"] = StubProfile(SMALL, synth.power_law(4, 512, 1.0, 0.9))
    save_hardware(machine(), tmp_path / "hw.json")
    place("--profile", "prof", "--hardware", tmp_path / "hw.json", "-o", tmp_path / "plan",
          "--time-limit", "10", "--max-binaries", "600")
    text = capsys.readouterr().out
    assert "capacity" in text and "of activations" in text and "predicted" in text and "PREDICTION" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "attn"])
    assert len(lines) - header - 1 == SMALL.n_layers


def test_what_if_llama2_70b_on_24g_gpu_64g_ram_nvme(tmp_path, capsys):
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(LLAMA2_70B_HF))
    hw = machine(gpu=24 << 30, ram=64 << 30, flash=2 << 40)
    save_hardware(hw, tmp_path / "hw.json")
    assert place("--model-shape", shape, "--power-law", "1.0", "--sparsity", "0.9", "--qtype", "f16",
                 "--predictor-bytes", "4MiB", "--hardware", tmp_path / "hw.json", "-o", tmp_path / "plan",
                 "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prediction"] and any("model not on disk" in a for a in out["assumptions"])
    assert any("predictors assumed: 4.00 MiB per layer" in a for a in out["assumptions"])
    assert out["predictors"]["bytes"] == "assumed" and out["predictors"]["total_bytes"] == 80 * (4 << 20)
    assert any("power law" in a for a in out["assumptions"])
    assert all(t["used_bytes"] <= t["capacity_bytes"] for t in out["tiers"].values())
    assert out["tiers"]["flash"]["used_bytes"] > 0 and out["tiers"]["gpu"]["used_bytes"] > 23 << 30
    assert out["mip_gap"] is not None and out["mip_gap"] <= 0.01
    plan = load_plan(tmp_path / "plan")
    assert plan.tiers.shape == (80, 28672) and plan.config.name == "meta-llama/Llama-2-70b-hf"


def test_a_profile_of_another_shape_is_rescaled(tmp_path, profiles, capsys):
    other = ModelConfig(arch="llama", n_layers=2, d_model=64, n_ff=128, n_heads=2, n_kv_heads=1, head_dim=32,
                        vocab_size=64, context_length=64, name="other")
    profiles["prof"] = StubProfile(other, synth.power_law(2, 128, 1.5, 0.9))
    shape = tmp_path / "small.json"
    shape.write_text(json.dumps(SMALL.to_dict()))
    save_hardware(machine(), tmp_path / "hw.json")
    place("--model-shape", shape, "--profile", "prof", "--hardware", tmp_path / "hw.json", "-o", tmp_path / "plan",
          "--json", "--time-limit", "10", "--max-binaries", "600")
    out = json.loads(capsys.readouterr().out)
    assert any("rescaled per layer from a 2 x 128 model" in a for a in out["assumptions"])
    plan = load_plan(tmp_path / "plan")
    assert plan.manifest["profile"]["synthesis"] == {"kind": "rescaled", "from_shape": [2, 128]}
    assert plan.tiers.shape == (4, 512)


def test_too_small_a_budget_for_the_dense_parts_says_the_minimum(tmp_path, profiles):
    profiles["prof"] = StubProfile(SMALL, synth.power_law(4, 512, 1.0, 0.9))
    save_hardware(machine(gpu=None), tmp_path / "hw.json")
    with pytest.raises(PlacementError, match=r"need at least [0-9.]+ MiB of RAM"):
        place("--profile", "prof", "--hardware", tmp_path / "hw.json", "--ram", "1MiB", "-o", tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("argv,message", [
    (["-o", "x"], "exactly one of --profile"),
    (["--profile", "p", "--power-law", "1", "-o", "x"], "exactly one of --profile"),
    (["--power-law", "1", "-o", "x"], "--power-law needs the model"),
    (["--power-law", "1"], "-o PLAN is required"),
    (["--power-law", "1", "-o", "x", "--predictors", "p", "--predictor-bytes", "1M"], "not both"),
    (["--power-law", "1", "-o", "x", "--every-neuron", "--predictor-bytes", "1M"], "without predictors"),
])
def test_place_argument_errors(tmp_path, argv, message):
    save_hardware(machine(), tmp_path / "hw.json")
    with pytest.raises(PlacementError, match=message):
        place("--hardware", tmp_path / "hw.json", *argv)


def test_place_counts_the_kv_cache_in_the_chosen_dtype(tmp_path, capsys):
    """--kv f16 reserves half the float32 cache's bytes for the --ctx tokens: per layer in the manifest and
    in the RAM the dense parts take (no GPU: every layer's cache in RAM); the plan records the dtype."""
    shape = tmp_path / "small.json"
    shape.write_text(json.dumps(SMALL.to_dict()))
    save_hardware(machine(gpu=None, ram=16 << 20), tmp_path / "hw.json")
    plans = {}
    for kv in ("f32", "f16"):
        assert place("--model-shape", shape, "--power-law", "1.0", "--hardware", tmp_path / "hw.json", "--ctx", "256",
                     "--kv", kv, "-o", tmp_path / kv, "--json", "--time-limit", "10", "--max-binaries", "600") == 0
        plans[kv] = load_plan(tmp_path / kv)
        assert plans[kv].kv_dtype == plans[kv].manifest["model"]["kv_dtype"] == kv
    kv32, kv16 = (plans[kv].manifest["model"]["kv_bytes_per_layer"] for kv in ("f32", "f16"))
    assert kv32 == 2 * 256 * SMALL.n_kv_heads * SMALL.head_dim * 4 and kv16 * 2 == kv32
    ram32, ram16 = (plans[kv].manifest["tiers"]["ram"]["dense_bytes"] for kv in ("f32", "f16"))
    assert ram32 - ram16 == SMALL.n_layers * (kv32 - kv16)
    with pytest.raises(SystemExit):
        place("--kv", "f8", "--dry-run")
    assert "invalid choice: 'f8' (choose from 'f32', 'f16')" in capsys.readouterr().err


def test_bad_budget_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        place("--ram", "lots", "--dry-run")
    assert "cannot read size 'lots'" in capsys.readouterr().err


def test_dry_run_json_is_a_loadable_hardware_description(tmp_path, capsys):
    save_hardware(machine(), tmp_path / "hw.json")
    assert place("--hardware", tmp_path / "hw.json", "--ram", "2GiB", "--dry-run", "--json") == 0
    hw = Hardware.from_dict(json.loads(capsys.readouterr().out))
    assert hw.ram.capacity_bytes == 2 << 30 and hw.sources["ram.capacity_bytes"] == "flag"


def test_place_reads_formats_from_a_loaded_model(model_path, tmp_path, capsys):
    assert place("-m", model_path, "--power-law", "1.0", "--sparsity", "0.8", "--gpu-mem", "0", "--ram", "300MiB",
                 "--ctx", "256", "-o", tmp_path / "plan", "--json", "--time-limit", "10", "--max-binaries", "600") == 0
    out = json.loads(capsys.readouterr().out)
    assert not any("formats assumed" in a for a in out["assumptions"])
    plan = load_plan(tmp_path / "plan")
    assert plan.manifest["model"]["formats"]["ffn_gate"] == "q4_1" and plan.manifest["inputs"]["model"] == "loaded"
    assert plan.manifest["model"]["neuron_bytes"][0] == 360 + 360 + 612  # q4_1 gate/up rows + q8_0 down column


@pytest.fixture(scope="module")
def smollm2_profile(model, tmp_path_factory):
    """A real (tiny) profile of the default model from the profiler."""
    from hetinfer.profiler.collect import ProfileOptions, profile_sequences

    seqs = [model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)[:64] for _ in range(2)]
    path = tmp_path_factory.mktemp("profile") / "smollm2"
    profile_sequences(model, seqs, ProfileOptions(samples=64, coact_tokens=32, dtype="float32", chunk=256)).save(path)
    return path


@pytest.fixture(scope="module")
def smollm2_predictors(model, smollm2_profile, tmp_path_factory):
    """Real predictors of the default model, trained on layers 0 and 1 (the others keep rank-1 zeros)."""
    from hetinfer.profiler.artifact import load_profile
    from hetinfer.profiler.train import TrainOptions, train_predictors

    preds, _ = train_predictors(model, load_profile(smollm2_profile), TrainOptions(ranks=(16,), epochs=2, density=0.4),
                                layers=[0, 1])
    path = tmp_path_factory.mktemp("predictors") / "smollm2"
    preds.save(str(path))
    return path


@pytest.mark.slow
def test_place_with_a_real_profile_of_the_loaded_model(model_path, model, smollm2_profile, smollm2_predictors,
                                                       tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the flash and kernel probes' cache
    (tmp_path / "flash").mkdir()
    assert place("-m", model_path, "--profile", smollm2_profile, "--predictors", smollm2_predictors,
                 "--sparsity", "0.7", "--gpu-mem", "0", "--ram", "100MiB", "--flash-dir", tmp_path / "flash",
                 "--ctx", "256", "--window", "0", "-o", tmp_path / "plan", "--json", "--time-limit", "10",
                 "--max-binaries", "2000") == 0  # window 0: layers 2-29's untrained predictors select every neuron
    out = json.loads(capsys.readouterr().out)
    assert not out["prediction"] and out["assumptions"] == []  # model, profile, predictors and machine all measured
    plan = load_plan(tmp_path / "plan")
    m = plan.manifest
    assert m["inputs"]["profile"] == "measured" and m["profile"]["tokens"] > 100
    assert plan.tiers.shape == (30, 1536) and set(np.unique(plan.tiers)) == {1, 2}  # RAM and flash, no GPU
    # the predictors' bytes, counted from the artefact: rank 16 on layers 0-1, rank 1 elsewhere, float32
    per_layer = [16 * (576 + 1536) * 4] * 2 + [1 * (576 + 1536) * 4] * 28
    assert m["inputs"]["predictors"] == "measured"
    assert m["predictors"]["source"] == str(smollm2_predictors) and m["predictors"]["bytes"] == "measured"
    assert m["predictors"]["layer_bytes"] == per_layer and m["predictors"]["flops_per_token"] == sum(per_layer) // 2
    attn = weight_sizes(model.config, model.weights, 256).layer_bytes
    assert m["model"]["layer_dense_bytes"] == (attn + per_layer).tolist()
    ram_bw = m["hardware"]["ram"]["bytes_per_s"]
    assert m["predictors"]["seconds_per_token"] == pytest.approx(sum(per_layer) / ram_bw)  # with CPU attention
    assert out["predictors"]["total_bytes"] == sum(per_layer)
    # the RAM speed is hetinfer.kernels' sparse_ffn on the model's own format and width
    assert (tmp_path / "cache" / "hetinfer" / "cpu-probe-q4_1-576.json").exists()
    # neurons priced by how often the predictors select them: layers 0-1's trained ones about 40% of the
    # neurons, the untrained rank-1 ones (threshold -inf) every neuron
    assert m["inputs"]["frequencies"] == "predictors" and out["frequencies"] == "predictors"
    assert m["predicted"]["ffn_density"] == pytest.approx((28 + 2 * 0.4) / 30, abs=0.02)
    assert m["hardware"]["sources"]["ram.offload_layer_seconds"] == "measured"
    assert (tmp_path / "cache" / "hetinfer" / "offload-layer-probe-1536.json").exists()
    assert m["model"]["record_bytes"] == [1336] * 30 and m["tiers"]["flash"]["misses_per_token"] >= 0
    with pytest.raises(PlacementError, match="not a profiled level"):
        place("-m", model_path, "--profile", smollm2_profile, "--sparsity", "0.55", "--gpu-mem", "0",
              "-o", tmp_path / "plan2")


@pytest.mark.slow
def test_predictors_of_another_model_are_refused(model_path, smollm2_predictors, tmp_path):
    from hetinfer.errors import ArtifactError

    save_hardware(machine(gpu=None, ram=1 << 30), tmp_path / "hw.json")
    other = tmp_path / "other"
    shutil.copytree(smollm2_predictors, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0000000000000000"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="fingerprint 0000000000000000 .* re-run `hetinfer train-predictors`"):
        place("-m", model_path, "--power-law", "1", "--predictors", other, "--hardware", tmp_path / "hw.json",
              "-o", tmp_path / "plan")
    shape = tmp_path / "config.json"
    shape.write_text(json.dumps(LLAMA2_70B_HF))
    with pytest.raises(PlacementError, match=r"trained for .*30 layers, d 576, n_ff 1536.* 80 layers, d 8192"):
        place("--model-shape", shape, "--power-law", "1", "--predictors", smollm2_predictors,
              "--hardware", tmp_path / "hw.json", "-o", tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


# --------------------------------------------------------------------- the engine allocates what the plan counted


def test_the_engine_sizes_each_layers_window_cache_from_the_plan(tmp_path):
    from hetinfer.offload.deploy import cache_capacity

    p, _ = small_plan(tmp_path)
    plan = load_plan(tmp_path / "plan")
    record = p.sizes.record_bytes
    flash = plan.tiers == FLASH
    slots = cache_capacity(plan, record.tolist())
    assert slots.tolist() == np.minimum(plan.layer_window_cache_bytes // record, flash.sum(axis=1)).tolist()
    occupancy = np.where(flash, 1 - (1 - p.freq) ** plan.manifest["window_tokens"], 0).sum(axis=1)
    assert np.abs(slots - occupancy).max() < 1 and slots.sum() > 0  # the expected flash neurons in the window
    assert (slots * record).sum() <= plan.window_cache_bytes
    # without a window the layers share two look-ahead pools of FLASH_POOL_BYTES instead
    no_window = Plan({**plan.manifest, "window_tokens": 0}, plan.tiers)
    assert cache_capacity(no_window, record.tolist()).tolist() == np.minimum(FLASH_POOL_BYTES // record,
                                                                            flash.sum(axis=1)).tolist()


def test_the_engines_flash_io_buffers_are_what_the_plan_counts(tmp_path):
    """`offload.deploy.tiered_ffn` sizes the reader's staging (STAGING_KEPT buffers) and the FFN's scratch
    to add up to FLASH_IO_BYTES (less what rounding the scratch to whole records leaves), the RAM
    `place_dense` counts with a flash tier (`flash_io_bytes`: with window 0 also the two look-ahead pools
    of the slots `cache_capacity` gives), and splits reads at FLASH_MAX_READ; a token whose flash neurons
    all overflow a cache of 0 slots is computed right through the scratch. Random-weight model."""

    from hetinfer import kernels
    from hetinfer.offload.deploy import tiered_ffn
    from hetinfer.offload.reader import STAGING_KEPT
    from hetinfer.offload.store import build_store
    from test_store import random_model

    m = random_model("q8_0", n_ff=96)
    tiers = np.where(np.arange(96) < 40, 1, FLASH).astype(np.uint8)[None].repeat(m.config.n_layers, axis=0)
    store = build_store(m, tmp_path / "store", tiers, progress=False)
    ffn = tiered_ffn(store, None, lambda layer, h: None, np.full(3, 40), np.zeros(3, np.int64), 5, "silu")
    try:
        buffers = STAGING_KEPT * ffn.reader.staging_bytes + ffn.scratch.nbytes
        assert FLASH_IO_BYTES - store.record_bytes < buffers <= FLASH_IO_BYTES
        assert ffn.reader.max_read == FLASH_MAX_READ
        h = np.random.default_rng(0).standard_normal((1, m.config.d_model), dtype=np.float32)
        every = store.views(store.read_records(1, 0, 96))
        np.testing.assert_allclose(ffn(1, h), kernels.sparse_ffn(*every, np.arange(96), h, "silu"), rtol=1.3e-6, atol=1e-5)
    finally:
        ffn.reader.close()
    slots = np.full(3, min(FLASH_POOL_BYTES // store.record_bytes, 56))
    ffn = tiered_ffn(store, None, lambda layer, h: None, np.full(3, 40), slots, 0, "silu")
    try:
        pools = sum(p.nbytes for p in ffn.pools)
        assert len(ffn.pools) == 2 and 0 < pools <= 2 * FLASH_POOL_BYTES
        assert STAGING_KEPT * ffn.reader.staging_bytes + ffn.scratch.nbytes + pools <= flash_io_bytes(0)
    finally:
        ffn.reader.close()
    # streaming whole spans: the two pools are all the engine holds (no staging kept, no scratch)
    ffn = tiered_ffn(store, None, lambda layer, h: None, np.full(3, 40), slots, 0, "silu",
                     stream_pool_bytes=FLASH_POOL_BYTES)
    try:
        np.testing.assert_allclose(ffn(1, h), kernels.sparse_ffn(*every, np.arange(96), h, "silu"), rtol=1e-5, atol=1e-5)
        assert ffn.scratch.nbytes == 0 and not ffn.reader._staging and not any(p.nbytes for p in ffn.pools)
        assert ffn.resident_bytes() - sum(s.buf.nbytes for s in ffn.layers) == flash_io_bytes(0, streamed=True)
    finally:
        ffn.reader.close()
