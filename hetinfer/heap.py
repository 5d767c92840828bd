"""Give freed heap memory back to the operating system, and say how much more this process may take.

glibc's malloc keeps freed blocks for reuse, and after a large array is freed it raises its threshold for
serving big requests from the heap, so a few hundred MB of temporary arrays (a probe's random layers) stay
in RSS after they are gone. Inside a memory limit that is memory the next step cannot have."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from pathlib import Path

import psutil


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return getattr(lib, "malloc_trim", None)  # glibc only; musl and macOS have none and need none


def trim() -> None:
    """Collect garbage, then return the heap's free pages to the OS (no-op without glibc)."""
    gc.collect()
    if (fn := _malloc_trim()) is not None:
        fn(0)


def freeze() -> None:
    """Collect garbage, then exempt every object alive now from the cyclic collector for good: called once
    the model is loaded, by programs that keep it until they exit (run, chat, serve, the benchmarks). A
    loaded model and tokenizer are a few hundred thousand objects that every full collection would
    traverse: a pause of ~0.1 s every few hundred decoded tokens, for nothing, since they live as long
    as the process."""
    gc.collect()
    gc.freeze()


def available_bytes() -> int:
    """Bytes this process can still take: the machine's available memory, or less where a memory cgroup
    caps it (v1 or v2, its own or an ancestor's: a systemd unit's MemoryMax, a container's limit), which
    the machine's figure does not see."""
    free = psutil.virtual_memory().available
    for limit, usage in _cgroup_memory():
        free = min(free, max(0, limit - usage))
    return free


# The cgroups this process is in; cgroup v1's memory controller and cgroup v2's unified hierarchy: (mount,
# limit file, usage file)
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUPS = {"memory": (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
            "": (Path("/sys/fs/cgroup"), "memory.max", "memory.current")}


def _cgroup_memory() -> list[tuple[int, int]]:
    """(limit, usage) in bytes of each memory cgroup this process is in and of their ancestors that sets a
    limit ("max" in v2 sets none; v1's unlimited is a huge number)."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:  # not Linux
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        key = "memory" if "memory" in controllers.split(",") else controllers
        if key not in _CGROUPS:
            continue
        root, limit_file, usage_file = _CGROUPS[key]
        d = root / path.lstrip("/")
        while d.is_relative_to(root):
            try:
                limit = (d / limit_file).read_text().strip()
                if limit != "max":
                    found.append((int(limit), int((d / usage_file).read_text())))
            except (OSError, ValueError):  # no such file at this level (a v2 root, an unmounted controller)
                pass
            if d == root:
                break
            d = d.parent
    return found
