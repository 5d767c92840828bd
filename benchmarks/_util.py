"""Shared benchmark helpers: timing medians, memory bandwidth, machine description, tables and their JSON."""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np


def timings(fn, reps: int, warm: int = 2, sync=lambda: None) -> np.ndarray:
    """Wall times of `reps` runs of `fn()` after `warm` untimed runs; `sync()` ends each run (a GPU's
    queued work: torch.cuda.synchronize)."""
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return np.array(ts)


def median_seconds(fn, reps: int, warm: int = 2) -> float:
    return float(np.median(timings(fn, reps, warm)))


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Memory bandwidth in GB/s from a large numpy copy, counting bytes read plus written."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    t = median_seconds(lambda: np.copyto(b, a), reps, warm=1)
    return 2 * nbytes / t / 1e9


def machine() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {cpus} CPUs available, load average {load:.2f} at start"


def llama_cpp_build() -> str:
    """The vector extensions llama-cpp-python was compiled with ("AVX2 FMA F16C ..." for scripts/install.sh's
    portable build on an AMX machine, AVX512 ... for a native one), so a ratio against it says which peer it was."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    feats = [k.strip() for k, _, v in (f.partition("=") for f in info.split("|")) if v.strip() == "1"]
    return f"llama-cpp-python {llama_cpp.__version__}, {' '.join(f.split(':')[-1].strip() for f in feats)}"


def table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _value(cell):
    """A table cell as JSON: numbers as numbers, "1.27x" as 1.27, "85%" as 0.85, anything else as text."""
    if isinstance(cell, (bool, int, float, np.integer, np.floating)):
        return cell.item() if isinstance(cell, np.generic) else cell
    text = str(cell).strip()
    for suffix, scale in (("x", 1.0), ("%", 0.01), ("", 1.0)):
        if suffix and not text.endswith(suffix):
            continue
        try:
            return float(text[: len(text) - len(suffix)]) * scale
        except ValueError:
            pass
    return text


class Report:
    """A benchmark's output: its notes and tables printed as they come, or with `as_json` one JSON object
    printed by `close()`: {"notes": [...], "tables": [{"title": ..., "rows": [{column: cell}]}]}, cells as
    numbers where they are ("1.27x" -> 1.27, "85%" -> 0.85)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.notes: list[str] = []
        self.tables: list[dict] = []

    def note(self, text: str = "") -> None:
        if self.as_json:
            if text:
                self.notes.append(text.strip())
        else:
            print(text)

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        if self.as_json:
            self.tables.append({"title": title, "rows": [{h: _value(c) for h, c in zip(header, r)} for r in rows]})
        else:
            print(title)
            print(table(header, rows))

    def close(self) -> None:
        if self.as_json:
            print(json.dumps({"notes": self.notes, "tables": self.tables}, indent=1))
