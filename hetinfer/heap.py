"""Give freed heap memory back to the operating system.

glibc's malloc keeps freed blocks for reuse, and after a large array is freed it raises its threshold for
serving big requests from the heap, so a few hundred MB of temporary arrays (a probe's random layers) stay
in RSS after they are gone. Inside a memory limit that is memory the next step cannot have."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


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
