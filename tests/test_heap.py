"""heap.trim gives freed heap memory back to the OS (what keeps `prepare`'s probes from holding their
arrays' pages through the later place trials inside a memory limit)."""
import subprocess
import sys

import pytest

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
