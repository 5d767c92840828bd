"""benchmarks/offload.py's own logic: an engine's overhead, found by bisection on the limit; re-planning."""
import time
from pathlib import Path

import pytest

from benchmarks.offload import KEEP, MiB, Settings, median_run, overhead, peak_overhead, reread_bytes, store_path

LONE = 50e6  # bytes/s of a lone small read: the slack for 8 tokens at 100 tok/s is (1 - KEEP) * 0.08 s of it, 400 kB


class LimitedEngine:
    """A runner whose engine keeps its pages at limits >= `needs` bytes and reads them back below (slowly:
    10% of `speed`), decoding at `speed` (None: the kernel counts no reads); a run with `noise` set reads
    nothing back but comes out that much slower or faster, as on a busy machine."""

    cgroup_problem = None
    s = Settings()

    def __init__(self, needs: int, speed: float = 100.0, counted: bool = True, noise: float = 1.0,
                 reread: float = 3.0, edge: int = 0):
        self.needs, self.speed, self.counted, self.noise, self.limits = needs, speed, counted, noise, []
        self.reread = reread  # bytes read back per byte of limit short of `needs`
        self.edge = edge  # limits up to this far below `needs` fit on their first run only (the kernel's luck)

    def run(self, label, spec, limit, files, listed=True, timeout_s=None):
        assert not listed and spec["tokens"] == 8 and timeout_s > 0  # probes: not in the report
        self.limits.append(limit)
        if limit < self.needs - 40 * MiB:
            return {"failed": "OOM-killed", "tok_s": None}
        fits = limit >= self.needs or (limit >= self.needs - self.edge and self.limits.count(limit) == 1)
        reads = 1000 + (0 if fits else int(self.reread * (self.needs - limit)))  # read back from storage, decoding
        return {"tok_s": self.speed * (self.noise if fits else 0.1),
                "decode_read_bytes": reads if self.counted else None}


def uncapped_run(counted: bool = True) -> dict:
    return {"peak_memory_bytes": 400 * MiB, "model_bytes_held": 150 * MiB, "tok_s": 100.0, "wall_s": 10.0,
            "decode_read_bytes": 1000 if counted else None}


def test_overhead_is_the_least_limit_whose_decode_reads_nothing_back_less_the_model_bytes():
    uncapped = uncapped_run()
    assert peak_overhead(uncapped) == 250 * MiB
    runner = LimitedEngine(needs=300 * MiB)
    found = overhead(runner, "engine", {"tokens": 128}, [], uncapped, 8, LONE)
    # within the search's step (2% of the peak, at least 4 MiB) above what the engine needs, never below it
    assert 150 * MiB <= found < 150 * MiB + 8 * MiB
    assert len(runner.limits) <= 8 and runner.limits.count(runner.limits[-1]) == 2  # the answer run a second time
    # reads back within the slack fit: up to 400 kB more than uncapped (8 tokens of 10 ms, 10% of it at 50 MB/s),
    # here 16 MiB short of what the engine needs (but not 32)
    near = LimitedEngine(needs=300 * MiB, reread=1 / 64)
    assert 150 * MiB - 32 * MiB < overhead(near, "engine", {"tokens": 128}, [], uncapped, 8, LONE) <= found - 8 * MiB


def test_a_limit_that_fits_once_is_tried_again_and_raised_until_it_fits_twice():
    runner = LimitedEngine(needs=300 * MiB, edge=12 * MiB)
    found = overhead(runner, "engine", {"tokens": 128}, [], uncapped_run(), 8, LONE)
    assert 150 * MiB <= found < 150 * MiB + 8 * MiB  # not a lucky limit below what the engine needs
    assert any(288 * MiB <= limit < 300 * MiB for limit in runner.limits)  # one was tried


def test_a_slow_machine_does_not_move_the_overhead_where_reads_are_counted():
    for noise in (0.5, 1.5):  # the whole machine slower or faster by half, with the pages all kept
        runner = LimitedEngine(needs=300 * MiB, noise=noise)
        assert 150 * MiB <= overhead(runner, "engine", {"tokens": 128}, [], uncapped_run(), 8, LONE) < 158 * MiB


def test_without_read_counts_a_limit_fits_when_the_speed_is_kept():
    runner = LimitedEngine(needs=300 * MiB, counted=False)
    assert 150 * MiB <= overhead(runner, "engine", {"tokens": 128}, [], uncapped_run(False), 8, LONE) < 158 * MiB
    # then a run slower than KEEP of the uncapped speed counts as not fitting
    slow = LimitedEngine(needs=300 * MiB, speed=KEEP * 100.0 - 1, counted=False)
    assert overhead(slow, "engine", {"tokens": 128}, [], uncapped_run(False), 8, LONE) == 250 * MiB  # uncapped peak


def test_without_cgroups_the_overhead_is_the_uncapped_peaks():
    runner = LimitedEngine(needs=0)
    runner.cgroup_problem = "no cgroup v1"
    assert overhead(runner, "engine", {"tokens": 128}, [], uncapped_run(), 8, LONE) == 250 * MiB
    assert runner.limits == []


def test_the_median_run_counts_and_a_failed_run_is_the_slowest():
    runs = [{"tok_s": 50.0, "peak_memory_bytes": 1}, {"failed": "OOM-killed", "tok_s": None},
            {"tok_s": 40.0, "peak_memory_bytes": 2}]
    mid = median_run(runs)
    assert mid["tok_s"] == 40.0 and mid["peak_memory_bytes"] == 2 and mid["tok_s_rounds"] == [50.0, None, 40.0]
    assert median_run(runs[:1])["tok_s"] == 50.0


def test_rereads_leave_out_the_runs_own_flash_reads_and_page_cache_runs():
    run = {"tokens": 10, "tok_s": 5.0, "decode_read_bytes": 5_000, "offload": {"flash_bytes_per_token": 400.0},
           "reader_method": "o_direct"}
    assert reread_bytes(run) == 1_000
    assert reread_bytes({**run, "decode_read_bytes": 3_900}) == 0  # a stream's read-ahead counted as issued
    assert reread_bytes({**run, "reader_method": "fadvise"}) is None  # which of its reads reached the disk is unknown
    assert reread_bytes({"tokens": 10, "tok_s": 5.0, "decode_read_bytes": 7}) == 7  # llama.cpp, or hetinfer all in RAM
    assert reread_bytes({"tokens": 10, "tok_s": 5.0, "decode_read_bytes": None}) is None


@pytest.mark.slow
def test_replanning_makes_the_plans_again_and_removes_the_stores_left_unused(tmp_path, offline, model_path):
    """A full run re-makes SmolLM2's plans from fresh probes (the cost model's check): each deployment's plan
    is made again, and stores of earlier plans that no deployment uses are removed."""
    from benchmarks.offload import prepare_deployments
    from hetinfer.placement import load_plan

    (tmp_path / "profile").symlink_to(offline / "profile")
    args = (str(tmp_path), model_path, {"quality": str(offline / "predictors")}, [["quality", 0.5, 110 * MiB]])
    [(dep, _)] = prepare_deployments(*args, replan=False).values()
    first = load_plan(dep / "plan").manifest["created"]
    stale = tmp_path / "flash" / "old.store"
    stale.mkdir()
    (stale / "neurons.bin").write_bytes(b"x")
    time.sleep(1)  # plans' creation times are in seconds
    [(again, _)] = prepare_deployments(*args, replan=True).values()
    assert again == dep and load_plan(dep / "plan").manifest["created"] > first
    assert not stale.exists() and [p.name for p in (tmp_path / "flash").glob("*.store")] == [Path(store_path(dep)).parent.name]
