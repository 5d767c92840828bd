"""cgroup v1 memory limits for benchmark runs, and dropping the page cache between them.

A run is a child process that joins a memory cgroup of its own between fork and exec, so every
page it touches from its first instruction on (heap, mapped model files, page cache its reads
cause) is charged to that cgroup: `memory.limit_in_bytes` caps it (the kernel reclaims page cache
first and OOM-kills the child when anonymous memory alone exceeds the limit) and
`memory.max_usage_in_bytes` is its peak. The cgroups are made below the memory cgroup this
process runs in (on a host where it runs in the root cgroup: /sys/fs/cgroup/memory/hetinfer-bench-*)
and removed after the run. This needs root and a mounted cgroup v1 memory controller
(`cgroup_status` says why not); cgroup v2-only hosts are not supported.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
PREFIX = "hetinfer-bench-"


def parent_cgroup() -> Path:
    """The memory cgroup directory this process runs in (where its children's cgroups go)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_ROOT / rel.lstrip("/")
    raise OSError("no cgroup v1 memory controller in /proc/self/cgroup")


def cgroup_status() -> str | None:
    """None when memory cgroups can be made here, else a line saying why not."""
    try:
        parent = parent_cgroup()
    except OSError as e:
        return f"cgroup v1 memory controller unavailable ({e})"
    if not (parent / "memory.limit_in_bytes").exists():
        return f"cgroup v1 memory controller not mounted at {parent}"
    if not os.access(parent, os.W_OK):
        return f"no permission to create cgroups in {parent} (run as root)"
    return None


@dataclass
class RunResult:
    returncode: int  # negative: killed by that signal (-9: the OOM killer, or the timeout)
    seconds: float
    peak_bytes: int  # memory.max_usage_in_bytes (RSS + page cache + kernel memory), or max RSS without a cgroup
    oom_kills: int  # the cgroup's OOM kills (0 without a cgroup)
    timed_out: bool
    output: str  # the child's stdout and stderr


class MemoryCgroup:
    """One cgroup v1 memory cgroup, created with an optional limit and removed by `remove`."""

    def __init__(self, name: str, limit_bytes: int | None = None):
        self.path = parent_cgroup() / f"{PREFIX}{name}-{os.getpid()}"
        self.path.mkdir()
        if limit_bytes is not None:
            self._write("memory.limit_in_bytes", str(int(limit_bytes)))
        self.limit_bytes = limit_bytes

    def _write(self, name: str, value: str) -> None:
        with open(self.path / name, "w") as f:
            f.write(value)

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def join(self) -> None:
        """Move the calling process into this cgroup (a child calls it between fork and exec)."""
        self._write("cgroup.procs", str(os.getpid()))

    @property
    def peak_bytes(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    @property
    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return int(fields.get("oom_kill", 0))

    def remove(self) -> None:
        """Remove the cgroup once its processes have exited (their page cache moves to the parent)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:  # a killed child's exit is still being accounted
                time.sleep(0.1)
        self.path.rmdir()

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def run_limited(argv: list[str], name: str, limit_bytes: int | None, timeout: float,
                use_cgroup: bool = True) -> RunResult:
    """Run `argv` in a fresh memory cgroup limited to `limit_bytes` (None: no limit, peak measured only).

    The child joins the cgroup before it execs, so nothing it loads escapes the limit. Without
    cgroups (`use_cgroup` False) it runs unlimited and the peak is its maximum RSS (page cache not
    counted). The child's output (stdout and stderr) is captured in `RunResult.output`."""
    cg = MemoryCgroup(name, limit_bytes) if use_cgroup else None
    try:
        with tempfile.TemporaryFile("w+") as err:
            t0 = time.perf_counter()
            child = subprocess.Popen(argv, stdout=err, stderr=err, text=True, preexec_fn=cg.join if cg else None)
            expired = threading.Event()
            timer = threading.Timer(timeout, lambda: (expired.set(), child.kill()))
            timer.start()
            try:
                _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, for the no-cgroup peak
            finally:
                timer.cancel()
            child.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - t0
            err.seek(0)
            output = err.read()
        if cg is not None:
            peak, ooms = cg.peak_bytes, cg.oom_kills
        else:
            peak, ooms = usage.ru_maxrss * 1024, 0
        return RunResult(child.returncode, seconds, peak, ooms, expired.is_set(), output)
    finally:
        if cg is not None:
            cg.remove()


def drop_page_cache(paths: list[str]) -> str:
    """Drop cached file pages before a run: every clean page via /proc/sys/vm/drop_caches when
    permitted ("drop_caches"), else the pages of `paths` with posix_fadvise(DONTNEED) ("fadvise")."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"
