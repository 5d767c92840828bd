"""`hetinfer prepare` and deployments on SmolLM2: the pipeline, resume after kill -9, running a
deployment through the CLI, and every bad input the issue lists (one line, exit 2, nothing left)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TORCH_FREE_CLI
from hetinfer import kernels
from hetinfer.cli import main
from hetinfer.offload.deploy import PREPARE_MIP_GAP
from hetinfer.offload.stream import PIECE_CHOICES

pytestmark = pytest.mark.slow
# SmolLM2's dense parts (~75 MiB with a 512-token f32 KV cache) + the offloading engine's flash I/O buffers
# (4-8 MiB) + about half the FFN
RAM = "110MiB"


def _prepare(out: Path, flash: Path, offline: Path, *extra: str) -> list[str]:
    """A prepare with the offline predictors (`--neurons predicted`: whether a plan without them would be faster
    depends on the machine's disk, and these tests exercise the predictors' pipeline)."""
    return ["prepare", "-o", str(out), "--flash-dir", str(flash), "--ram", RAM, "--ctx", "512",
            "--profile", str(offline / "profile"), "--predictors", str(offline / "predictors"), "--neurons", "predicted",
            *extra]


def test_prepare_every_neuron_plans_without_predictors(tmp_path, offline, capsys):
    """`--neurons every`: no predictors trained or named, the plan prices every neuron as used every token, and
    the deployment computes every neuron; it cannot be combined with --predictors."""
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    argv = ["prepare", "-o", str(out), "--flash-dir", str(flash), "--ram", RAM, "--ctx", "512",
            "--profile", str(offline / "profile"), "--neurons", "every"]
    assert main(argv) == 0
    place = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[3/4 place")]
    assert len(place) == 1 and f"--mip-gap {PREPARE_MIP_GAP}" in place[0]  # prepare's trials stop at its looser gap
    m = json.loads((out / "deployment.json").read_text())
    plan = json.loads((out / m["plan"] / "plan.json").read_text())
    assert m["predictors"] is None and not (out / "predictors").exists()
    assert plan["inputs"]["frequencies"] == "every neuron" and plan["predictors"]["source"] is None
    assert plan["predicted"]["ffn_density"] == 1.0 and plan["window_tokens"] == 0
    stats = tmp_path / "stats.json"
    run = subprocess.run([sys.executable, "-c", TORCH_FREE_CLI, "run", str(out), "-p", "The capital of France is",
                          "-n", "6", "--temperature", "0", "--stats-json", str(stats)],
                         capture_output=True, text=True, timeout=300)  # exit 3: it imported torch
    assert run.returncode == 0, run.stderr
    assert json.loads(stats.read_text())["ffn_density"] == 1.0 and run.stdout.strip()
    capsys.readouterr()
    assert main([*argv, "--predictors", str(offline / "predictors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--neurons" in err
    other = tmp_path / "other"
    assert main([*argv[:2], str(other), *argv[3:], "--window", "2"]) == 2  # nothing to cache across tokens
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "--window" in err and not other.exists()


def test_auto_keeps_the_trial_predicted_fastest(tmp_path, monkeypatch, capsys):
    """prepare's place step: one plan per trial, the fastest renamed into place, the others removed."""
    from hetinfer.offload import deploy
    from hetinfer.placement.cost import PlacementError

    speed = {"window 0": 20.0, "window 1": None, "every neuron, window 0": 31.0}  # None: that plan does not fit

    def step(title, argv):
        name = title.split(", ", 1)[1]
        if speed[name] is None:
            raise PlacementError("does not fit")
        Path(argv[-1]).mkdir()
        (Path(argv[-1]) / "name").write_text(name)

    class Plan:
        def __init__(self, path):
            self.manifest = {"predicted": {"tok_s": speed[(Path(path) / "name").read_text()]}, "model": {"n_ctx": 512}}

    monkeypatch.setattr(deploy, "_step", step)
    monkeypatch.setattr("hetinfer.placement.load_plan", Plan)
    plan_dir = tmp_path / "plan"
    deploy._place(["place"], plan_dir, [(name, []) for name in speed])
    assert (plan_dir / "name").read_text() == "every neuron, window 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    assert "every neuron, window 0 predicted fastest (31.0 tok/s with attention over 256 cached positions" in (
        capsys.readouterr().err)


def test_prepare_then_run_greedy_matches_every_neuron_reference(tmp_path, offline, capsys):
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    assert main(_prepare(out, flash, offline)) == 0
    m = json.loads((out / "deployment.json").read_text())
    assert m["format"] == "hetinfer.deployment" and m["ctx"] == 512
    assert (out / m["plan"] / "plan.json").exists() and Path(m["store"]).is_dir()
    capsys.readouterr()
    stats = tmp_path / "stats.json"
    assert main(["run", str(out), "-p", "The capital of France is", "-n", "12", "--temperature", "0",
                 "--stats-json", str(stats), "--verbose"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    s = json.loads(stats.read_text())
    for key in ("flash_bytes_per_token", "flash_reads_per_token", "cache_hit_rate", "ffn_density", "io_wait_share"):
        assert key in s
    assert 0 < s["ffn_density"] < 1 and s["gen_tokens"] == 12 and text.strip()
    plan = json.loads((out / m["plan"] / "plan.json").read_text())  # streaming is the plan's choice, for this disk
    assert s["flash_reads"] == ("spans" if plan["tiers"]["flash"]["streamed"] else "records")
    assert s.get("span_pieces") in (PIECE_CHOICES if s["flash_reads"] == "spans" else (None,))
    how = f"streamed ahead, {s['span_pieces']} requests each" if s["flash_reads"] == "spans" else "window cache hit rate"
    assert how in captured.err and f"reads ({s['flash_io']})" in captured.err  # --verbose says how flash is read
    assert s["flash_io"] in ("o_direct, uring", "o_direct, threads", "fadvise, threads")  # io_uring where allowed
    packed = re.search(r"\[weights packed in [0-9.]+ s \(([0-9]+) MiB\)\]", captured.err)  # before the prompt:
    assert (packed is not None and int(packed[1]) < 20) == kernels.simd.PACKS  # attention's 16 MiB, not the FFN's
    # every neuron (the exact mode) runs too, and a second prepare reuses everything
    assert main(["run", str(out), "-p", "The capital of France is", "-n", "4", "--temperature", "0",
                 "--sparsity", "0"]) == 0
    before = sorted(p.name for p in flash.iterdir())
    assert main(_prepare(out, flash, offline)) == 0
    assert sorted(p.name for p in flash.iterdir()) == before
    assert "reusing" in capsys.readouterr().err
    # info --memory measures the deployment with its own engine, in a fresh process: the FFN's records and
    # caches are the engine's (how much of the model file is mapped depends on what the page cache holds:
    # the kernel maps cached neighbours of a touched page)
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "info", str(out), "--memory", "--json", "--tokens", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["deployment"] == str(out) and r["ram_budget_bytes"] == 110 << 20 and r["context"] == 512
    assert "files_torch" not in r["overhead_components"]  # its predictors run without torch
    assert 0 < r["engine_buffers_bytes"] < r["ram_budget_bytes"]
    assert 0 < r["model_file_bytes"] <= os.path.getsize(m["model"]["path"]) + (64 << 10)
    assert (r["model_file_bytes"] + r["model_packed_bytes"] + r["engine_buffers_bytes"] + r["kv_cache_written_bytes"]
            + r["overhead_bytes"] == r["resident_bytes"])
    # the attention's Q4_1 weights are packed at their first call; the FFN, run from the records, is not
    attention = 30 * (576 + 192 + 192 + 576) * 576 // 32 * 20  # q, k, v, o of 30 layers
    assert r["model_packed_bytes"] == (attention if kernels.simd.PACKS else 0)


def test_deployment_moved_and_model_gone(tmp_path, offline, model_path, capsys):
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    local = tmp_path / Path(model_path).name  # the fingerprint covers the file name
    shutil.copy(model_path, local)
    assert main(_prepare(out, flash, offline, "-m", str(local))) == 0
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), moved)
    assert main(["run", str(moved), "-p", "Hi", "-n", "2", "--temperature", "0"]) == 0  # relative paths work
    local.unlink()
    capsys.readouterr()
    assert main(["run", str(moved), "-p", "Hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model file" in err and "gone" in err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, offline) -> Path:
    """One `prepare` (dep/ and its store in flash/) that the bad-input cases each copy and then spoil."""
    d = tmp_path_factory.mktemp("prepared")
    (d / "flash").mkdir()
    assert main(_prepare(d / "dep", d / "flash", offline)) == 0
    return d


def _copy_deployment(prepared: Path, to: Path) -> None:
    """prepared's dep/ and flash/ under `to`, the manifest's store path (absolute: outside dep/) moved along."""
    shutil.copytree(prepared / "dep", to / "dep")
    shutil.copytree(prepared / "flash", to / "flash", dirs_exist_ok=True)
    m = json.loads((to / "dep" / "deployment.json").read_text())
    m["store"] = str(to / "flash" / Path(m["store"]).name)
    (to / "dep" / "deployment.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["no_flash_dir", "flash_dir_is_file", "ram_too_small", "not_a_deployment",
                                  "other_version", "bit_flip", "truncated_store", "other_model"])
def test_bad_input_one_line_exit_2(tmp_path, offline, prepared, case, capsys):
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    args = _prepare(out, flash, offline)
    if case == "no_flash_dir":
        args[args.index("--flash-dir") + 1] = str(tmp_path / "missing")
    elif case == "flash_dir_is_file":
        (tmp_path / "file").write_text("x")
        args[args.index("--flash-dir") + 1] = str(tmp_path / "file")
    elif case == "ram_too_small":
        args[args.index("--ram") + 1] = "20MiB"
    if case in ("no_flash_dir", "flash_dir_is_file", "ram_too_small"):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1
        assert not list(flash.glob("*")) and not (out / "deployment.json").exists()
        if case == "ram_too_small":
            assert "raise --ram" in err
        return
    _copy_deployment(prepared, tmp_path)
    m = json.loads((out / "deployment.json").read_text())
    store = Path(m["store"])
    run = ["run", str(out), "-p", "Hello there", "-n", "3", "--temperature", "0"]
    assert main(run) == 0  # the copy runs, before each case spoils what it reads
    if case == "not_a_deployment":
        run[1] = str(tmp_path)
    elif case == "other_version":
        (out / "deployment.json").write_text(json.dumps({**m, "version": 99}))
    elif case == "bit_flip":
        data = bytearray((store / "neurons.bin").read_bytes())
        data[len(data) // 2] ^= 0x10  # a flash record of a middle layer
        (store / "neurons.bin").write_bytes(bytes(data))
        run += ["--sparsity", "0"]  # every neuron: the flipped record is read
    elif case == "truncated_store":
        with open(store / "neurons.bin", "r+b") as f:
            f.truncate(os.path.getsize(store / "neurons.bin") - 8192)
    elif case == "other_model":
        m["model"]["fingerprint"] = "0" * 16
        (out / "deployment.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    if case == "bit_flip":
        assert "layer" in err[0]


def test_prepare_resumes_after_kill_9(tmp_path, offline):
    """kill -9 while the store is being written; the next prepare finishes and nothing half-written stays."""
    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    argv = [sys.executable, "-m", "hetinfer.cli", *_prepare(out, flash, offline)]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not any(p.name.startswith(".") for p in flash.iterdir()):
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "deployment.json").exists()
    assert main(_prepare(out, flash, offline)) == 0
    assert [p.name for p in flash.iterdir() if p.name.startswith(".")] == []
    assert main(["run", str(out), "-p", "Hi", "-n", "2", "--temperature", "0"]) == 0


def test_serve_deployment_health_shows_tiers_and_hit_rate(tmp_path, offline):
    from tests.test_server import Server

    out, flash = tmp_path / "dep", tmp_path / "flash"
    flash.mkdir()
    assert main(_prepare(out, flash, offline)) == 0
    server = Server([str(out)], tmp_path / "server.log")
    try:
        r = server.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        p = server.health()["placement"]
        assert p["engine"] == "offloaded" and set(p["tiers"]) == {"gpu", "ram", "flash"}
        assert p["tiers"]["flash"]["bytes"] > 0 and p["tiers"]["ram"]["components"]["window_cache"] >= 0
        assert 0 <= p["cache_hit_rate"] <= 1 and 0 < p["ffn_density"] <= 1
    finally:
        server.stop()
