"""examples/edge: serve_edge.sh prepares a deployment for the env file's budget and serves it inside a
memory cgroup as large as the systemd unit's MemoryMax, so the documented pair is checked by running."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import memory_cgroup
from tests.test_server import free_port

pytestmark = pytest.mark.slow
EDGE = Path(__file__).resolve().parent.parent / "examples" / "edge"


def _setting(path: Path, key: str) -> str:
    return re.search(rf"^{key}=(\S+)", path.read_text(), re.M).group(1)


def test_serve_edge_runs_within_the_units_memory_max(tmp_path, model_path, offline):
    limit = _setting(EDGE / "hetinfer.service", "MemoryMax")  # the kernel takes systemd's 768M form
    budget = _setting(EDGE / "hetinfer.env", "HETINFER_BUDGET")
    port, proc = free_port(), None
    env = dict(os.environ, HETINFER_STATE=str(tmp_path), HETINFER_PORT=str(port),
               HETINFER_CTX=_setting(EDGE / "hetinfer.env", "HETINFER_CTX"),
               HETINFER="hetinfer", HETINFER_PREPARE_ARGS=f"--profile {offline / 'profile'} "
                                                         f"--predictors {offline / 'predictors'}")
    with memory_cgroup("hetinfer-edge-test", limit) as group:
        try:
            log = open(tmp_path / "edge.log", "w")
            proc = subprocess.Popen(["bash", "-c", f"echo $$ > {group}/cgroup.procs && exec bash "
                                                   f"{EDGE / 'serve_edge.sh'} {model_path} {budget}"],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            base, deadline, up = f"http://127.0.0.1:{port}", time.time() + 900, False
            while proc.poll() is None and time.time() < deadline and not up:
                try:
                    up = httpx.get(base + "/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    time.sleep(0.5)
            assert up, (tmp_path / "edge.log").read_text()[-3000:]
            r = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0},
                           timeout=300)
            assert r.status_code == 200 and r.json()["choices"][0]["text"]
            assert httpx.get(base + "/health", timeout=10).json()["placement"]["engine"] == "offloaded"
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            assert peak <= int((group / "memory.limit_in_bytes").read_text())
            proc.terminate()
            proc.wait(timeout=30)
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
