"""benchmarks/offload.py's own logic: an engine's overhead, found by bisection on the limit."""
from benchmarks.offload import KEEP, MiB, Settings, overhead, peak_overhead


class LimitedEngine:
    """A runner whose engine keeps its uncapped speed at limits >= `needs` bytes and thrashes below."""

    cgroup_problem = None
    s = Settings()

    def __init__(self, needs: int, speed: float = 100.0):
        self.needs, self.speed, self.limits = needs, speed, []

    def run(self, label, spec, limit, files, listed=True, timeout_s=None):
        assert not listed and spec["tokens"] == 8 and timeout_s > 0  # probes: not in the report
        self.limits.append(limit)
        if limit < self.needs - 40 * MiB:
            return {"failed": "OOM-killed", "tok_s": None}
        return {"tok_s": self.speed if limit >= self.needs else 0.1 * self.speed}


def test_overhead_is_the_least_limit_that_keeps_the_speed_less_the_model_bytes():
    uncapped = {"peak_memory_bytes": 400 * MiB, "model_bytes_held": 150 * MiB, "tok_s": 100.0, "wall_s": 10.0}
    assert peak_overhead(uncapped) == 250 * MiB
    runner = LimitedEngine(needs=300 * MiB)
    found = overhead(runner, "engine", {"tokens": 128}, [], uncapped, tokens=8)
    # within the search's step (2% of the peak, at least 4 MiB) above what the engine needs, never below it
    assert 150 * MiB <= found < 150 * MiB + 8 * MiB
    assert len(runner.limits) <= 7
    # a run slower than KEEP of the uncapped speed counts as not fitting
    slow = LimitedEngine(needs=300 * MiB, speed=KEEP * 100.0 - 1)
    assert overhead(slow, "engine", {"tokens": 128}, [], uncapped, tokens=8) == 250 * MiB  # the uncapped peak


def test_without_cgroups_the_overhead_is_the_uncapped_peaks():
    runner = LimitedEngine(needs=0)
    runner.cgroup_problem = "no cgroup v1"
    uncapped = {"peak_memory_bytes": 400 * MiB, "model_bytes_held": 150 * MiB, "tok_s": 100.0, "wall_s": 10.0}
    assert overhead(runner, "engine", {"tokens": 128}, [], uncapped, tokens=8) == 250 * MiB
    assert runner.limits == []
