"""benchmarks/_cgroup.py: children run inside a cgroup v1 memory limit from their first instruction,
their peak is the cgroup's, the limit holds (OOM kill past it), and the cgroup is removed after."""
import sys

import pytest

from benchmarks._cgroup import cgroup_status, parent_cgroup, run_limited

pytestmark = pytest.mark.skipif(cgroup_status() is not None, reason=f"no memory cgroups here: {cgroup_status()}")

MiB = 1 << 20


def alloc(mib: int) -> list[str]:
    """A child that touches `mib` MiB of anonymous memory and prints its own cgroup."""
    return [sys.executable, "-c", f"b = bytearray({mib} * {MiB}); print(open('/proc/self/cgroup').read())"]


def leftovers() -> list:
    return sorted(parent_cgroup().glob("hetinfer-bench-test-*"))


def test_child_runs_in_its_cgroup_and_peak_counts_its_memory():
    r = run_limited(alloc(96), "test", 512 * MiB, timeout=120)
    assert r.returncode == 0, r.output
    assert "hetinfer-bench-test-" in r.output  # joined before exec: the interpreter itself is inside
    assert 96 * MiB <= r.peak_bytes <= 512 * MiB
    assert r.oom_kills == 0 and not r.timed_out
    assert leftovers() == []


def test_limit_holds_and_oom_kill_is_reported():
    r = run_limited(alloc(256), "test", 128 * MiB, timeout=120)
    assert r.returncode == -9 and r.oom_kills >= 1 and not r.timed_out
    assert r.peak_bytes <= 128 * MiB
    assert leftovers() == []


def test_uncapped_run_measures_peak_and_timeout_kills():
    r = run_limited(alloc(64), "test", None, timeout=120)
    assert r.returncode == 0 and r.peak_bytes >= 64 * MiB
    r = run_limited([sys.executable, "-c", "import time; time.sleep(60)"], "test", None, timeout=1)
    assert r.timed_out and r.returncode == -9
    assert leftovers() == []
