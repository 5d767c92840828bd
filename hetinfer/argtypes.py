"""Argparse pieces every command shares: typed, bounded flags checked where they are parsed.

A bad value is a one-line `error: argument --ctx: ...` naming the accepted range, given before any model
loads; `Parser` keeps every argparse error to that one line. Each bounded type exposes its range
(`lo`, `hi`) so tests can walk every numeric flag of every command.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

from hetinfer.errors import HetinferError

MAX_SIZE = 1 << 50  # bytes (1024 TiB): beyond any tier of one machine, and safe in int64 arithmetic
MAX_THREADS = 1024
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (`error: ...; see `PROG --help``), exit status 2."""

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


@dataclass(frozen=True)
class Bounded:
    """An argparse type: a finite int or float within [lo, hi] (either end open, or absent)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.kind.__name__

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            if self.kind is int:
                return f"{what} from {lo} to {hi}"
            return f"{what} in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi:g}"
        return f"a finite {what[2:]}" if self.kind is float else what

    def contains(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or self.lo_open and v == self.lo):
            return False
        return self.hi is None or v < self.hi or not self.hi_open and v == self.hi

    def __call__(self, value: str):
        try:
            v = self.kind(value)
        except (ValueError, OverflowError):
            v = None
        if v is None or not self.contains(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {value!r}")
        return v


def int_in(lo: int | None = None, hi: int | None = None) -> Bounded:
    """Integers in [lo, hi]."""
    return Bounded(int, lo, hi)


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Bounded:
    """Finite floats between lo and hi (closed ends unless `lo_open`/`hi_open`)."""
    return Bounded(float, lo, hi, lo_open, hi_open)


THREADS = int_in(1, MAX_THREADS)
SEED = int_in(0, MAX_SEED)
FRACTION_OPEN = float_in(0.0, 1.0, lo_open=True, hi_open=True)  # (0, 1): sparsities that must leave some neurons


@dataclass(frozen=True)
class Size:
    """An argparse type: a byte size ("2GiB", "512MB", "1.5G", "1024") within [lo, hi] bytes."""

    lo: int = 0
    hi: int = MAX_SIZE
    __name__ = "size"

    def __call__(self, value: str) -> int:
        from hetinfer.placement.hardware import format_size, parse_size

        try:
            n = parse_size(value)
        except HetinferError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not self.lo <= n <= self.hi:
            raise argparse.ArgumentTypeError(f"size {value!r} must be from {format_size(self.lo)} to "
                                              f"{format_size(self.hi)}")
        return n


SIZE = Size()


@dataclass(frozen=True)
class IntList:
    """An argparse type: comma-separated integers in [lo, hi], e.g. `16,32,64` (returned as a tuple)."""

    lo: int
    hi: int | None = None
    __name__ = "list"

    def __call__(self, value: str) -> tuple[int, ...]:
        item = int_in(self.lo, self.hi)
        try:
            return tuple(item(t.strip()) for t in value.split(","))
        except argparse.ArgumentTypeError:
            each = item.describe().removeprefix("an integer ")
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, each {each}; got {value!r}") from None


def text(value: str) -> str:
    """An argparse type for text the model reads (prompts, system messages, stop strings): valid Unicode."""
    from hetinfer.tokenizer import check_unicode

    try:
        return check_unicode(value, "the text")
    except HetinferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def output_file(path: str) -> str:
    """An argparse type for a file to write: not a directory, and no file above it (the writer creates
    missing directories)."""
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a directory; give the path of a file to write")
    _check_writable_parent(path)
    return path


def output_dir(path: str) -> str:
    """An argparse type for an artefact directory to write: not an existing file, and no file above it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory; give a new or artefact directory")
    _check_writable_parent(path)
    return path


def _check_writable_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)  # the writer creates the missing directories below this one
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} {what}; give a path in an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: no permission to write in {parent}; "
                                          "give a path in a directory you can write")
