"""Where placement can put neurons, and how fast each place is.

A `Hardware` is CPU RAM plus an optional GPU and an optional flash directory, each with a
capacity in bytes and a speed: the rate hetinfer.kernels' `sparse_ffn` streams neuron bytes on
the GPU and CPU, the host-to-device link, and flash read throughput per read size and number of
reads in flight. `probe.detect` measures this machine (its kernel and flash probes are cached
under ~/.cache/hetinfer/); `load_hardware` reads the JSON description of a machine that is not here
(format in docs/formats/plan.md, "Hardware"). Every number records where it came from
(`sources`: measured, flag, file or assumed) so a plan can say what it rests on.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hetinfer.atomic import atomic_write_json
from hetinfer.errors import HetinferError
from hetinfer.tiers import TIERS
from hetinfer.schema import MapOf, Nullable, Omittable, dataclass_schema, validate

HARDWARE_FORMAT = "hetinfer.hardware"
HARDWARE_VERSION = 1
FLASH_BLOCK = 4096  # a page: store sections start at its multiples, buffered reads move whole ones, and
# O_DIRECT accepts reads aligned to it on every device (many accept 512 B: FlashTier.align)
# A streamed flash span is read in up to this many requests at once, as the cost model prices it (`offload.stream`
# reads in fewer where timing shows the reads' CPU cost outweighs their speed)
STREAM_PIECES = 4

# Used only for tiers that are not on this machine (what-if planning); always labelled "assumed".
ASSUMED_GPU = {"bytes_per_s": 600e9, "h2d_bytes_per_s": 25e9, "sync_latency_s": 20e-6}  # PCIe 4 x16 card
ASSUMED_FLASH = {  # PCIe 4 NVMe SSD, random reads
    "read_sizes": [4096, 16384, 65536, 262144, 1048576],
    "concurrency": [1, 8, 32],
    "bytes_per_s": [
        [0.06e9, 0.45e9, 1.2e9],
        [0.20e9, 1.40e9, 3.0e9],
        [0.60e9, 3.00e9, 5.0e9],
        [1.50e9, 5.00e9, 6.0e9],
        [2.50e9, 6.00e9, 6.5e9],
    ],
}


class HardwareError(HetinferError):
    """A size, flag or hardware description that cannot be used; the message says how to fix it."""


@dataclass
class GpuTier:
    capacity_bytes: int
    bytes_per_s: float  # weight bytes per second the FFN kernels stream
    h2d_bytes_per_s: float  # host <-> device copy bandwidth
    sync_latency_s: float  # one host/device round trip (launch + copy + synchronise)


@dataclass
class RamTier:
    capacity_bytes: int
    bytes_per_s: float  # weight bytes per second the CPU FFN kernels stream
    # Fixed CPU time per layer and token besides reading weights: norms, rotary, residual adds and each
    # kernel call's cost (~3-5 us from Python, ~1.6 us per parallel region); 0 when not measured.
    layer_seconds: float = 0.0
    # CPU time per layer and token the offloading engine (hetinfer.offload) adds to that: its predictor calls
    # (the layer's and the look-ahead's), window-cache step, read planning and submission; 0 when not measured.
    offload_layer_seconds: float = 0.0
    # CPU time per layer and token a streamed layer (one with flash neurons, in a plan that streams whole flash
    # spans) costs the offloading engine besides its rows' compute: a second kernel call, handing its pool back,
    # its reads' system calls and thread wake-ups; 0 when not measured.
    stream_layer_seconds: float = 0.0
    # CPU time per layer, token and position in the KV cache: attention's scores and weighted sum over the
    # cached keys and values, which grow with the context; 0 when not measured.
    position_seconds: float = 0.0


@dataclass
class FlashTier:
    capacity_bytes: int
    dir: str
    read_sizes: list[int]  # bytes per read, ascending
    concurrency: list[int]  # reads in flight
    bytes_per_s: list[list[float]]  # aggregate throughput [read size][concurrency]
    method: str  # "o_direct", "fadvise" (O_DIRECT refused) or "assumed"
    align: int = FLASH_BLOCK  # read offsets and sizes are multiples of it (O_DIRECT: the device's logical block)
    # Share of the smaller of a token's flash-read time and its compute time that the engine hides by reading
    # ahead while it computes (`cost.overlapped`): 0 reads add to compute, 1 a token takes the larger; measured
    # by running the engine (`probe.measure_flash_overlap`), 0 when not measured.
    overlap: float = 0.0

    def read_seconds(self, nbytes: int | np.ndarray) -> float | np.ndarray:
        """Seconds one read of `nbytes` costs when reads are issued at the best measured concurrency
        (elementwise for an array of sizes: the reader plans thousands of reads per layer).

        Throughput is interpolated log-log between measured sizes; below the smallest size a read
        costs as much as the smallest, above the largest it streams at the largest size's rate.
        """
        best = np.array([max(row) for row in self.bytes_per_s])
        sizes = np.array(self.read_sizes, dtype=np.float64)
        n = np.maximum(np.asarray(nbytes, dtype=np.float64), sizes[0])
        thr = np.exp(np.interp(np.log(n), np.log(sizes), np.log(best)))
        return n / thr

    def join_pays(self, a: int | np.ndarray, gap: int | np.ndarray, b: int | np.ndarray) -> bool | np.ndarray:
        """Whether reading requests of `a` and `b` bytes `gap` bytes apart as one read beats two (elementwise
        for arrays): the read planner's rule (`offload.reader.plan_reads`, `cost.miss_reads`).

        One read of a + gap + b must cost no more than the two, counting the gap's bytes once more at the
        disk's best measured rate: reads in flight share the disk, so bytes nobody asked for take that long
        from the other reads, besides staging memory. On a disk capped in requests rather than bytes a
        64 KiB read costs what a 4 KiB one does, and without that charge the planner read 2.1x a 7B
        trace's record bytes to save 8% of its disk time; with it, 1.3x for 6% (BENCHMARKS.md).
        """
        gap = np.asarray(gap)
        joined, alone_a, alone_b = self.read_seconds(np.stack(np.broadcast_arrays(a + gap + b, a, b)))
        return joined + gap / max(map(max, self.bytes_per_s)) <= alone_a + alone_b


@dataclass
class Hardware:
    ram: RamTier
    gpu: GpuTier | None = None
    flash: FlashTier | None = None
    sources: dict[str, str] = field(default_factory=dict)  # "gpu.bytes_per_s" -> measured|flag|file|assumed

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names present, fastest first."""
        return tuple(n for n in TIERS if getattr(self, n) is not None)

    def capacity(self, tier: str) -> int:
        t = getattr(self, tier)
        return 0 if t is None else int(t.capacity_bytes)

    def sync_seconds(self, d_model: int) -> float:
        """Cost of one layer running on both GPU and CPU: a round trip plus the hidden state both ways."""
        if self.gpu is None:
            return 0.0
        return self.gpu.sync_latency_s + 2 * d_model * 4 / self.gpu.h2d_bytes_per_s

    def to_dict(self) -> dict:
        return {"format": HARDWARE_FORMAT, "version": HARDWARE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "hardware description") -> "Hardware":
        """Validate and build; every problem is reported as one line naming the field and the fix."""
        if not isinstance(d, dict) or d.get("format") != HARDWARE_FORMAT:
            raise HardwareError(f"{where}: not a hetinfer hardware description (want format {HARDWARE_FORMAT!r})")
        if d.get("version") != HARDWARE_VERSION:
            raise HardwareError(
                f"{where}: version {d.get('version')!r} is not supported (this hetinfer reads {HARDWARE_VERSION})")
        validate(d, hardware_schema(), where, "see docs/formats/plan.md (Hardware)", HardwareError)
        try:
            ram = RamTier(**d["ram"])
            gpu = GpuTier(**d["gpu"]) if d.get("gpu") else None
            flash = FlashTier(**d["flash"]) if d.get("flash") else None
        except TypeError as e:  # a field no version knows
            raise HardwareError(f"{where}: {e}; see docs/formats/plan.md (Hardware)") from None
        hw = cls(ram=ram, gpu=gpu, flash=flash, sources=dict(d.get("sources") or {}))
        _validate(hw, where)
        return hw


def hardware_schema() -> dict:
    """Every field of the hardware format and its JSON type (docs/formats/plan.md, Hardware)."""
    return {"format": str, "version": int, "ram": dataclass_schema(RamTier),
            "gpu": Omittable(Nullable(dataclass_schema(GpuTier))),
            "flash": Omittable(Nullable(dataclass_schema(FlashTier))),
            "sources": Omittable(Nullable(MapOf(str)))}


def _validate(hw: Hardware, where: str) -> None:
    def positive(name: str, v, allow_zero: bool = False) -> None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
        if not ok or v != v or v == float("inf"):
            kind = "non-negative" if allow_zero else "positive"
            raise HardwareError(f"{where}: {name} must be a {kind} number, got {v!r}")

    positive("ram.capacity_bytes", hw.ram.capacity_bytes, allow_zero=True)
    positive("ram.bytes_per_s", hw.ram.bytes_per_s)
    positive("ram.layer_seconds", hw.ram.layer_seconds, allow_zero=True)
    positive("ram.offload_layer_seconds", hw.ram.offload_layer_seconds, allow_zero=True)
    positive("ram.stream_layer_seconds", hw.ram.stream_layer_seconds, allow_zero=True)
    positive("ram.position_seconds", hw.ram.position_seconds, allow_zero=True)
    if hw.gpu is not None:
        positive("gpu.capacity_bytes", hw.gpu.capacity_bytes, allow_zero=True)
        for k in ("bytes_per_s", "h2d_bytes_per_s", "sync_latency_s"):
            positive(f"gpu.{k}", getattr(hw.gpu, k))
    if hw.flash is not None:
        f = hw.flash
        positive("flash.capacity_bytes", f.capacity_bytes, allow_zero=True)
        if not f.read_sizes or list(f.read_sizes) != sorted(set(f.read_sizes)) or min(f.read_sizes) <= 0:
            raise HardwareError(f"{where}: flash.read_sizes must be distinct positive sizes in ascending order")
        if f.align not in (512, 1024, 2048, FLASH_BLOCK):
            raise HardwareError(f"{where}: flash.align must be 512, 1024, 2048 or {FLASH_BLOCK} bytes, got {f.align!r}")
        if not f.concurrency or min(f.concurrency) <= 0:
            raise HardwareError(f"{where}: flash.concurrency must list positive numbers of reads in flight")
        if len(f.bytes_per_s) != len(f.read_sizes) or any(len(r) != len(f.concurrency) for r in f.bytes_per_s):
            raise HardwareError(f"{where}: flash.bytes_per_s must be [len(read_sizes)][len(concurrency)]")
        for row in f.bytes_per_s:
            for v in row:
                positive("flash.bytes_per_s entries", v)
        positive("flash.overlap", f.overlap, allow_zero=True)
        if f.overlap > 1:
            raise HardwareError(f"{where}: flash.overlap must lie in [0, 1] (a share of the time reads hide), "
                                f"got {f.overlap!r}")


def load_hardware(path: str | Path) -> Hardware:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HardwareError(f"cannot read hardware description {path}: {e}") from None
    hw = Hardware.from_dict(d, where=str(path))
    for k in source_keys(hw):
        hw.sources.setdefault(k, "file")
    return hw


def save_hardware(hw: Hardware, path: str | Path) -> None:
    atomic_write_json(path, hw.to_dict(), indent=2)


def source_keys(hw: Hardware) -> list[str]:
    """The `sources` entries a Hardware with these tiers has: one per number."""
    keys = ["ram.capacity_bytes", "ram.bytes_per_s", "ram.layer_seconds", "ram.position_seconds"]
    if hw.gpu is not None:
        keys += ["gpu.capacity_bytes", "gpu.bytes_per_s", "gpu.h2d_bytes_per_s", "gpu.sync_latency_s"]
    if hw.flash is not None:
        keys += ["ram.offload_layer_seconds", "ram.stream_layer_seconds", "flash.capacity_bytes", "flash.bytes_per_s",
                 "flash.overlap"]
    return keys


# ---------------------------------------------------------------------------------------- sizes

_BINARY = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """Bytes from "2GiB", "512MB", "1.5G" or "1024". K/M/G/T and KiB/MiB/GiB/TiB are powers of
    1024, KB/MB/GB/TB powers of 1000 (the coreutils convention)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if unit.endswith("ib") and len(unit) == 3:
        unit = unit[0]
    scale = _BINARY.get(unit) or _DECIMAL.get(unit)
    if m is None or scale is None:
        raise HardwareError(
            f"cannot read size {text!r}: use a number with an optional unit, e.g. 2GiB, 512MB, 1.5G, 1024")
    return int(round(float(m.group(1)) * scale))


def format_size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
