"""The CLI on the real model: streamed greedy output equals the library's, stats and info are complete."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import TORCH_FREE_CLI
from hetinfer import kernels
from hetinfer.cli import build_parser, open_session
from hetinfer.generate import Session
from hetinfer.kernels import numba_cache
from hetinfer.sampling import SamplingParams


def test_generate_streams_greedy_text_and_writes_stats(model, model_path, tmp_path):
    """...and never imports torch (exit 3 if it did)."""
    stats = tmp_path / "stats.json"
    p = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CLI, "generate", "-m", model_path, "-p", "The capital of France is",
         "-n", "8", "--temperature", "0", "--verbose", "--stats-json", str(stats)],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    want = "".join(Session(model, 64).complete("The capital of France is", SamplingParams(temperature=0, max_tokens=8)))
    assert p.stdout == want + "\n"
    s = json.loads(stats.read_text())
    assert set(s) == {"prompt_tokens", "prompt_tok_s", "gen_tokens", "gen_tok_s", "peak_rss_bytes"}
    assert s["prompt_tokens"] == 5 and 0 < s["gen_tokens"] <= 8 and s["peak_rss_bytes"] > 0
    assert "tok/s" in p.stderr
    # the Q4 weights were packed before the prompt, not during it (Transformer.pack; 66 of SmolLM2's 98 MB)
    assert ("[weights packed in" in p.stderr and " MiB)]" in p.stderr) == kernels.simd.PACKS


def test_generate_chat_answers_one_user_turn(model, model_path):
    p = subprocess.run(
        [sys.executable, "-m", "hetinfer.cli", "generate", "-m", model_path, "--chat", "-p", "What is 2 + 2?",
         "-n", "8", "--temperature", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    want = "".join(Session(model, 128).chat([{"role": "user", "content": "What is 2 + 2?"}],
                                             SamplingParams(temperature=0, max_tokens=8)))
    plain = "".join(Session(model, 128).complete("What is 2 + 2?", SamplingParams(temperature=0, max_tokens=8)))
    assert p.stdout == want + "\n" and want != plain


def test_first_run_gives_the_same_text_as_later_runs(model_path, tmp_path):
    """With an empty kernel cache the kernels compile in child processes and this one loads them, so the
    first run's greedy text equals a later run's. (Compiled fresh in-process, the fastmath attention
    rounded differently: this prompt's text parted after ~120 tokens, once attention ran on 2 threads.)
    A dense run compiles only a dense session's kernels; the first process to want them all compiles the
    rest. The children, compiling at once, left numba's cache whole: that process loads every kernel from it."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "hetinfer.cli", "generate", "-m", model_path, "--chat", "-p",
           "Explain why caches make computers fast.", "-n", "200", "--temperature", "0", "-t", "2"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "compiling the CPU kernels" in first.stderr and list(tmp_path.rglob("hetinfer-kernels-*.dense.ready"))
    steps = len(numba_cache._compile_steps(True))
    assert f" {steps}/{steps} " in first.stderr  # the progress bar's last state
    assert not list(tmp_path.rglob("cpu.sparse_ffn-*.nbc"))
    later = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert later.returncode == 0 and "compiling" not in later.stderr, later.stderr
    assert first.stdout == later.stdout and len(first.stdout) > 500
    code = """
from hetinfer import kernels
from hetinfer.kernels import cpu
print(kernels.compiled(), kernels.compiled(dense_only=True))
kernels.warmup()
stats = [k.stats for k in vars(cpu).values() if hasattr(k, "stats")]
print(kernels.compiled(), sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
"""
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr
    (every, dense), (after, hits, misses) = (line.split() for line in loaded.stdout.splitlines())
    assert (every, dense, after) == ("False", "True", "True") and list(tmp_path.rglob("cpu.sparse_ffn-*.nbc"))
    assert int(hits) == len(list(tmp_path.rglob("cpu.*.nbc"))) > 10 and int(misses) == 0, loaded.stderr


def test_info_json(model_path):
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "info", "-m", model_path, "--json"],
                       capture_output=True, text=True, timeout=300)
    info = json.loads(p.stdout)
    assert (info["layers"], info["d_model"], info["n_ff"], info["heads"], info["kv_heads"]) == (30, 576, 1536, 9, 3)
    assert info["file_tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # Q4_1 gate+up rows (18 blocks x 20 B each) + a 1536-col Q4_1 down column share (576*960/1536 B)
    assert info["ffn_neuron_bytes"] == 360 + 360 + 576 * 960 // 1536
    assert info["bytes"]["ffn"] == 30 * 3 * 1536 * 360


def test_info_memory_splits_a_decode_into_model_kv_and_overhead(model_path):
    """`info --memory` decodes in a fresh process and accounts for every resident byte: the model file's
    pages (every weight read by the decode), the KV positions written, and the runtime's own overhead
    by what holds it; a box needs model + full KV cache + overhead."""
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "info", "-m", model_path, "--memory", "--json",
                        "--tokens", "3", "--ctx", "256", "--kv", "f16"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    size = os.path.getsize(model_path)
    # the file's pages, and the packed copies (kernels.packed_nbytes) of Q4 weights whose whole pages were let go
    # (the partial pages at their ends stay mapped: counted twice, 1% at most)
    assert 0.8 * size <= r["model_file_bytes"] + r["model_packed_bytes"] <= 1.01 * size + (64 << 10)
    assert r["model_packed_bytes"] > 0.5 * size or not kernels.simd.PACKS  # SmolLM2's Q4_1 layers, 66 of 98 MB
    position = 2 * 30 * 3 * 64 * 2  # keys and values, 30 layers, 3 kv heads of 64, float16
    assert r["kv_cache_written_bytes"] % position == 0 and 6 * position <= r["kv_cache_written_bytes"] <= 8 * position
    assert r["kv_cache_full_bytes"] == 256 * position
    assert sum(r["overhead_components"].values()) == r["overhead_bytes"]
    assert (r["model_file_bytes"] + r["model_packed_bytes"] + r["kv_cache_written_bytes"] + r["overhead_bytes"]
            == r["resident_bytes"])
    assert r["overhead_components"]["files_numba"] > 0 and r["overhead_components"]["heap_and_anonymous"] > 0
    assert "files_torch" not in r["overhead_components"]  # a CPU decode does not load torch
    assert r["box_needs_bytes"] == (r["model_file_bytes"] + r["model_packed_bytes"] + r["kv_cache_full_bytes"]
                                    + r["overhead_bytes"])
    assert r["deployment"] is None and r["engine_buffers_bytes"] == 0
    # a deployment only with --memory, and not beside -m
    for argv, says in ((["info", str(model_path) + ".nodeploy"], "only with --memory"),
                       (["info", "somewhere", "-m", model_path, "--memory"], "not both")):
        p = subprocess.run([sys.executable, "-m", "hetinfer.cli", *argv], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_mapped_rss_sums_resident_bytes_per_mapping(tmp_path):
    from hetinfer.info import mapped_rss

    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f00-7f10 r--p 00000000 fd:01 123    /opt/site-packages/torch/lib/libtorch_cpu.so\n"
        "Size:                 64 kB\nRss:                  12 kB\n"
        "7f10-7f20 rw-p 00000000 00:00 0 \nRss:                   8 kB\n"
        "7f20-7f30 r--s 00000000 fd:01 456    /models/a model.gguf\nRss:                 100 kB\n"
        "7f30-7f40 rw-p 00000000 00:00 0                          [heap]\nRss:                   4 kB\n"
        "7f40-7f50 r--p 00001000 fd:01 123    /opt/site-packages/torch/lib/libtorch_cpu.so\nRss:    20 kB\n")
    assert mapped_rss(str(smaps)) == {"/opt/site-packages/torch/lib/libtorch_cpu.so": 32 * 1024, "": 8 * 1024,
                                      "/models/a model.gguf": 100 * 1024, "[heap]": 4 * 1024}

def test_generate_flags_for_weights_and_threshold_sparsity(model, model_path, tmp_path):
    """--weights f32 gives the float engine's text; --sparsity/--profile runs the threshold FFN and reports its
    density and how many layers stepped aside to the dense kernel; a missing --profile is a one-line error."""
    from hetinfer.loader import load_model
    from hetinfer.profiler.collect import ProfileOptions, profile_sequences

    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    profile = str(tmp_path / "p.profile")
    profile_sequences(model, [ids[i: i + 128] for i in range(0, 384, 128)], ProfileOptions(samples=128)).save(profile)

    def run(*extra):
        stats = tmp_path / "stats.json"
        p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "generate", "-m", model_path, "-p", "The capital of",
                            "-n", "6", "--temperature", "0", "--stats-json", str(stats), *extra],
                           capture_output=True, text=True, timeout=300)
        return p, (json.loads(stats.read_text()) if p.returncode == 0 else None)

    p, _ = run("--weights", "f32")
    assert p.returncode == 0, p.stderr
    f32 = Session(load_model(model_path, weights="f32"), 64)
    assert p.stdout == "".join(f32.complete("The capital of", SamplingParams(temperature=0, max_tokens=6))) + "\n"

    p, s = run("--sparsity", "0.5", "--profile", profile, "--verbose")
    assert p.returncode == 0, p.stderr
    dense = s["ffn_dense_layers"]  # layers where this machine's probe found the threshold kernel slower than dense
    assert 0 <= dense <= 30 and f"{dense} of 30 layers stepped aside to the dense FFN" in p.stderr
    assert abs(s["ffn_density"] - (dense + 0.5 * (30 - dense)) / 30) < 0.2
    packed = re.search(r"\[weights packed in [0-9.]+ s \(([0-9]+) MiB\)\]", p.stderr)  # the FFN too: prompts read it
    assert (packed is not None and int(packed[1]) > 60) == kernels.simd.PACKS, p.stderr  # in full (63 MiB in all)

    p, _ = run("--sparsity", "0.5")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "pass --profile PROFILE" in p.stderr


@pytest.mark.parametrize("command", [["generate", "-p", "x"], ["chat"], ["serve"], ["run", "DEPLOY", "-p", "x"]])
def test_kv_flag_takes_f32_or_f16(command, capsys):
    """Unset, the session's default (f32) or a deployment's own applies (`test_kv_flag_sizes_the_session_cache`)."""
    ap = build_parser()
    assert ap.parse_args(command).kv is None and ap.parse_args([*command, "--kv", "f16"]).kv == "f16"
    with pytest.raises(SystemExit) as e:
        ap.parse_args([*command, "--kv", "f8"])
    assert e.value.code == 2 and "invalid choice: 'f8' (choose from 'f32', 'f16')" in capsys.readouterr().err


def test_kv_flag_sizes_the_session_cache(model_path):
    """--kv f16 --ctx 256: the session's cache is float16, and the placement `serve` reports counts its bytes;
    without --kv it is float32."""
    args = build_parser().parse_args(["generate", "-m", model_path, "-p", "x", "--ctx", "256"])
    assert open_session(args).cache.k.dtype == np.float32
    args.kv = "f16"
    session = open_session(args)
    assert session.cache.k.dtype == session.cache.v.dtype == np.float16
    nbytes = session.cache.k.nbytes + session.cache.v.nbytes
    assert nbytes == session.model.config.kv_cache_bytes(256, "f16") == session.model.config.kv_cache_bytes(256) // 2
    pytest.importorskip("fastapi")
    from hetinfer.server.app import placement_summary

    assert placement_summary(session)["tiers"]["ram"]["components"]["kv_cache"] == nbytes
