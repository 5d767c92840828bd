"""Bad input through the real CLI: one-line error naming problem and fix, non-zero exit, no traceback."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "hetinfer.cli", *args], capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_missing_file(tmp_path):
    assert "model not found" in run_cli("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")


def test_truncated_gguf(tmp_path, model_path):
    bad = tmp_path / "trunc.gguf"
    with open(model_path, "rb") as fh:
        bad.write_bytes(fh.read(3_000_000))
    err = run_cli("generate", "-m", str(bad), "-p", "hi")
    assert "truncated or corrupt" in err and "again" in err


def test_corrupt_safetensors_header(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b'{"a": {"dtype": "F32", "shape": [4], "da')
    err = run_cli("info", "-m", str(d))
    assert "not a valid safetensors file" in err


def test_unknown_architecture_gguf(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    err = run_cli("info", "-m", str(path))
    assert "'falcon' is not supported" in err


def test_unknown_architecture_hf(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert "'gpt2' is not supported" in run_cli("info", "-m", str(d))


@pytest.mark.slow
def test_prompt_longer_than_context(model_path):
    err = run_cli("generate", "-m", model_path, "--ctx", "32", "-p", "word " * 60, "-n", "4")
    assert "exceeds the context" in err and "--ctx" in err


def test_stats_json_to_a_directory_leaves_nothing_behind(model_path, tmp_path):
    err = run_cli("generate", "-m", model_path, "-p", "hi", "-n", "1", "--stats-json", str(tmp_path))
    assert f"{tmp_path} is a directory; give the path of a file" in err and err.count("\n") <= 1
    assert list(tmp_path.parent.glob(f"{tmp_path.name}*")) == [tmp_path] and list(tmp_path.iterdir()) == []
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))
