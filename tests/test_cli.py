"""The CLI on the real model: streamed greedy output equals the library's, stats and info are complete."""
import json
import subprocess
import sys

from hetinfer.generate import Session
from hetinfer.sampling import SamplingParams


def test_generate_streams_greedy_text_and_writes_stats(model, model_path, tmp_path):
    stats = tmp_path / "stats.json"
    p = subprocess.run(
        [sys.executable, "-m", "hetinfer.cli", "generate", "-m", model_path, "-p", "The capital of France is",
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


def test_info_json(model_path):
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", "info", "-m", model_path, "--json"],
                       capture_output=True, text=True, timeout=300)
    info = json.loads(p.stdout)
    assert (info["layers"], info["d_model"], info["n_ff"], info["heads"], info["kv_heads"]) == (30, 576, 1536, 9, 3)
    assert info["file_tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    # Q4_1 gate+up rows (18 blocks x 20 B each) + a 1536-col Q4_1 down column share (576*960/1536 B)
    assert info["ffn_neuron_bytes"] == 360 + 360 + 576 * 960 // 1536
    assert info["bytes"]["ffn"] == 30 * 3 * 1536 * 360
