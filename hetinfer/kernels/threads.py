"""How many threads the CPU kernels (and torch's ops) run on.

`set_threads(n)` fixes the count; `set_threads()` (the default, set at import) lets the kernels use as many
of this process's cores as other processes leave free, re-chosen every CHECK_SECONDS from /proc/stat
(`threads_for`). A kernel asks `get_threads()` before each parallel call; sums are split by
`max_threads()` instead (the `_fixed_split` of the kernels' interface), so results never depend on the load.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import numba
import psutil

_threads = 1  # the most threads a kernel uses
_auto = True  # set_threads() without a count: as many of those as other processes leave cores free
_active = 1  # the threads kernels run on now (auto: re-chosen every CHECK_SECONDS)
_checked = -1.0  # time.monotonic() of the last choice
_sample: tuple[float, float | None, float] | None = None  # (wall, busy CPU seconds of our cores, our CPU seconds)
# torch's count in auto mode, where torch is loaded (training, evaluation, the GPU tier): its default, the physical cores
_torch_threads = psutil.cpu_count(logical=False) or 1
_counts = (1, 1)  # the (numba, torch) thread counts for _active
_applied = threading.local()  # the _counts last set in the calling thread
# Seconds between readings of what other processes take: a core that gets busy costs a fraction of a
# second of slow decode steps, and /proc/stat is read only a few times a second.
CHECK_SECONDS = 0.25


def set_threads(n: int | None = None) -> int:
    """Threads the CPU kernels and torch's ops (the prompt's matrix products and attention) use;
    returns the count. `n`: exactly that many (`-t`, benchmarks). None: up to every core this
    process may run on (torch: up to its own default), the kernels on as many as other processes leave
    free, re-chosen while generating (see `threads_for`): a parallel region waits for its slowest thread,
    and a thread sharing its core with a busy process is often descheduled, so beside a busy core
    fewer threads compute faster (BENCHMARKS.md, contention). torch's count stays: its results may
    depend on it."""
    global _threads, _auto, _checked, _sample
    _auto = n is None
    n = len(_cores()) if n is None else int(n)
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    _threads = min(n, numba.config.NUMBA_NUM_THREADS)
    _checked, _sample = time.monotonic(), _cpu_sample()
    _run_on(_threads)
    get_threads()
    return _threads


def get_threads() -> int:
    """Threads the next kernel call may use, also set as numba's and torch's count for the calling thread."""
    if _auto and _threads > 1 and time.monotonic() - _checked >= CHECK_SECONDS:
        _run_on(_choose_threads())
    if getattr(_applied, "counts", None) is not _counts:  # both are per thread: set in each thread that computes
        numba.set_num_threads(_counts[0])
        _applied.counts, _applied.torch = _counts, False
    if not _applied.torch and "torch" in sys.modules:  # torch loaded by then: its count too
        sys.modules["torch"].set_num_threads(_counts[1])  # auto mode keeps it fixed: a product's sums may be split by it
        _applied.torch = True
    return _active


def max_threads() -> int:
    """The most threads a kernel uses (set_threads' count), whatever other processes leave free right now."""
    return _threads


@contextlib.contextmanager
def every_thread():
    """Run on max_threads(), not re-chosen meanwhile: a probe measures the machine, not the moment (after a
    solver's child process, auto mode would run the probe, and key its result, on fewer threads)."""
    global _auto
    auto, active = _auto, _active
    _auto = False
    _run_on(_threads)
    try:
        yield _threads
    finally:
        _auto = auto
        _run_on(active)


def _run_on(n: int) -> None:
    """Run on `n` threads from now on (each thread applies the new counts at its next get_threads)."""
    global _active, _counts
    # torch keeps one count while auto mode moves numba's: its matrix products may split a sum among its
    # threads, so a prompt's logits would depend on the load (numba's sums are split by _threads instead)
    counts = (n, min(_torch_threads, _threads) if _auto else n)
    if counts != _counts:  # the same object while unchanged: threads compare it by identity (get_threads)
        _counts = counts
    _active = n


def threads_for(others: float, cores: int, most: int) -> int:
    """Threads to run on when other processes keep `others` cores busy of the `cores` this process may
    use: one per core left free, a core counting as free while others take less than half of it
    (beyond that, a thread there takes longer than the others would to do its share); 1 to `most`."""
    return max(1, min(most, int(cores - others + 0.5)))


def _choose_threads() -> int:
    """Threads for the CPU time other processes took on our cores since the last choice: the cores'
    busy time (/proc/stat) less our own; without /proc/stat, the 1-minute load average less our
    running threads (slow to react: it averages over a minute)."""
    global _checked, _sample
    now = _cpu_sample()
    last, _sample, _checked = _sample, now, now[0]
    cores = len(_cores())
    if now[1] is None or last is None or last[1] is None:
        others = os.getloadavg()[0] - _active if hasattr(os, "getloadavg") else 0.0
    elif now[0] - last[0] < 1e-3:
        return _active
    else:
        others = ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
    return threads_for(max(0.0, others), cores, _threads)


def _cpu_sample() -> tuple[float, float | None, float]:
    """(now, busy CPU seconds of the cores this process may use or None without /proc/stat, this process's CPU seconds)."""
    try:
        with open("/proc/stat") as fh:
            busy = busy_seconds(fh.read(), _cores())
    except OSError:
        busy = None
    return time.monotonic(), busy, time.process_time()


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds(proc_stat: str, cores: set[int]) -> float:
    """CPU seconds the given cores spent busy since boot, from /proc/stat's per-core lines
    (user, nice, system, irq, softirq and steal time; idle and iowait are not busy)."""
    ticks = 0
    for line in proc_stat.splitlines():
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in (fields + ["0"] * 8)[:8])
            ticks += user + nice + system + irq + softirq + steal
    return ticks / _TICK


def _cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


set_threads()
