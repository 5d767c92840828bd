"""Shared fixtures: the real default model, the shared data folder, a transformers reference, memory cgroups."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# `python -c TORCH_FREE_CLI ARGS` runs `hetinfer ARGS` and exits 3 if it imported torch: a CPU run must not
# load it (its libraries cost a decode ~200 MiB, issue #20).
TORCH_FREE_CLI = ("import sys\nfrom hetinfer.cli import main\nrc = main(sys.argv[1:])\n"
                  "sys.exit(rc if rc else 3 if 'torch' in sys.modules else 0)")


@contextlib.contextmanager
def memory_cgroup(name: str, limit: str):
    """A cgroup v1 memory cgroup /sys/fs/cgroup/memory/NAME-PID limited to `limit` (bytes, or systemd's 768M
    form), removed afterwards; the test skips where it cannot be made (needs root). A process joins it by
    writing its pid to cgroup.procs."""
    group = Path("/sys/fs/cgroup/memory") / f"{name}-{os.getpid()}"
    if not os.access(group.parent, os.W_OK):
        pytest.skip("cgroup v1 memory controller not writable here (needs root)")
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(limit)
        yield group
    finally:
        for _ in range(50):  # its last process may still be exiting
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def data_path(*parts: str) -> str:
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data not found at {path}: clone the project next to ../shared")
    return path


@pytest.fixture(scope="session", autouse=True)
def kernels_from_cache() -> None:
    """Every test runs the kernels as a user's process does: loaded from numba's cache (compiled by
    child processes when the cache is cold, see `kernels.warmup`), never compiled fresh in this one."""
    from hetinfer import kernels

    kernels.warmup()


@pytest.fixture(scope="session")
def model_path() -> str:
    from hetinfer.errors import HetinferError
    from hetinfer.loader import default_model_path

    try:
        return default_model_path()
    except HetinferError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def model(model_path):
    from hetinfer.loader import load_model

    return load_model(model_path)


@pytest.fixture(scope="session")
def model_f32(model_path):
    """The default model converted to float32 at load (`--weights f32`): the exact float engine, for tests
    that compare against transformers or two engine paths tightly (the native block formats quantize
    activations to 8 bits in their dot products, like llama.cpp)."""
    from hetinfer.loader import load_model

    return load_model(model_path, weights="f32")


@pytest.fixture(scope="session")
def hf_model(model_path):
    """transformers loading the same GGUF, dequantized to float32: the independent reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32
    )
    return m.eval()


@pytest.fixture(scope="session")
def wikitext_eval() -> str:
    """The held-out last 30% of WikiText-2 validation (never used for calibration)."""
    with open(data_path("wikitext-2", "valid.txt")) as fh:
        text = fh.read()
    return text[int(len(text) * 0.7):]


@pytest.fixture(scope="session")
def offline(tmp_path_factory, model_path):
    """A small profile and predictors of the default model (the expensive steps of `hetinfer prepare`),
    made once through their own commands; tests pass them to `prepare --profile/--predictors`."""
    from hetinfer.cli import main

    d = tmp_path_factory.mktemp("offline")
    text = data_path("wikitext-2", "valid.txt")
    assert main(["profile", "-m", model_path, "--data", f"{text}[:0.2]", "--tokens", "2048", "--samples", "1024",
                 "-q", "-o", str(d / "profile")]) == 0
    assert main(["train-predictors", "-m", model_path, "--profile", str(d / "profile"), "--ranks", "32",
                 "--epochs", "2", "-q", "-o", str(d / "predictors")]) == 0
    return d
