"""heap.trim gives freed heap memory back to the OS (what keeps `prepare`'s probes from holding their
arrays' pages through the later place trials inside a memory limit)."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import memory_cgroup
from hetinfer import heap

FREED = """
import numpy as np
from hetinfer import heap
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
big = np.ones(16 << 20, np.uint8); del big  # glibc raises its mmap threshold: 1 MiB arrays now come from the heap
parts = [np.ones(1 << 20, np.uint8) for _ in range(200)]
pin = np.ones(1 << 20, np.uint8)  # above them, so freeing them cannot shrink the heap's top
del parts
before = rss()
{trim}
print((before - rss()) >> 20)
"""


def _released_mib(trim: str) -> int:
    out = subprocess.run([sys.executable, "-c", FREED.format(trim=trim)], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_trim_returns_the_pages_of_freed_arrays():
    if heap._malloc_trim() is None:
        pytest.skip("no glibc malloc_trim here: nothing to return")
    assert _released_mib("pass") < 50  # freed, yet still resident: what trim is for
    assert _released_mib("heap.trim()") >= 150


def test_generate_takes_the_loaded_model_out_of_the_collectors_reach(model_path, capsys):
    """Once `hetinfer generate` has loaded its model, a full collection has nothing long-lived to traverse
    (with torch, numba and the model: ~270k objects, a ~0.1 s pause every few hundred decoded tokens)."""
    import gc

    from hetinfer.cli import main

    gc.unfreeze()
    try:
        assert main(["generate", "-m", model_path, "-p", "Hello", "-n", "2", "--temperature", "0"]) == 0
        assert gc.get_freeze_count() > 100_000
        assert len(gc.get_objects()) < gc.get_freeze_count() // 10
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_available_bytes_counts_the_tightest_memory_cgroup(tmp_path, monkeypatch, version):
    """A cgroup's limit less its usage caps what the machine has available, at any level of the process's
    cgroup path; a level without a limit ("max" in v2, absent files) caps nothing."""
    root = tmp_path / "cgroup"
    limit, usage = ("memory.limit_in_bytes", "memory.usage_in_bytes") if version == "v1" else ("memory.max",
                                                                                                "memory.current")
    leaf = root / "system.slice" / "hetinfer.service"
    leaf.mkdir(parents=True)
    (root / "system.slice" / limit).write_text(f"{800 << 20}\n")
    (root / "system.slice" / usage).write_text(f"{300 << 20}\n")
    (leaf / limit).write_text("max\n" if version == "v2" else f"{1 << 62}\n")
    (leaf / usage).write_text(f"{200 << 20}\n")
    proc = tmp_path / "cgroup.txt"
    proc.write_text("4:memory:/system.slice/hetinfer.service\n" if version == "v1" else
                    "0::/system.slice/hetinfer.service\n")
    monkeypatch.setattr(heap, "_PROC_CGROUP", proc)
    key = "memory" if version == "v1" else ""
    monkeypatch.setitem(heap._CGROUPS, key, (root, limit, usage))
    monkeypatch.setattr(heap.psutil, "virtual_memory", lambda: SimpleNamespace(available=8 << 30))
    assert heap.available_bytes() == 500 << 20
    (root / "system.slice" / limit).write_text("max\n" if version == "v2" else f"{1 << 62}\n")
    assert heap.available_bytes() == 8 << 30
    (leaf / limit).write_text(f"{100 << 20}\n")  # below its usage: nothing left
    assert heap.available_bytes() == 0
    monkeypatch.setattr(heap, "_PROC_CGROUP", tmp_path / "missing")
    assert heap.available_bytes() == 8 << 30  # no /proc/self/cgroup (not Linux): the machine's figure


def test_one_process_compiles_the_kernels_inside_a_small_memory_cgroup():
    """The kernels compile in one process per 768 MiB the process may still take: inside a 600 MiB cgroup v1
    (an edge box's unit) that is one, whatever the cores."""
    with memory_cgroup("hetinfer-heap-test", str(600 << 20)) as group:
        code = ("from hetinfer import heap; from hetinfer.kernels import numba_cache; "
                "print(heap.available_bytes() >> 20, numba_cache._compile_jobs())")
        p = subprocess.run(["bash", "-c", f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c '{code}'"],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    free_mib, jobs = map(int, p.stdout.split())
    assert 300 < free_mib < 600 and jobs == 1
