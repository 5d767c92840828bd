"""The flash store: every FFN neuron of a model as one record on disk (docs/formats/store.md).

A record holds one neuron's bytes, `gate row | up row | down column | pad`: the down column in
the neuron-major format `kernels.transpose_down` makes (float formats as stored, block formats
requantized to q8_0), the record padded to a multiple of 8 bytes. A layer's records lie back to
back in store order (the plan's tiers gpu, ram, flash in turn, each in the profile's neuron
order: hot to cold, co-active neurons adjacent) in a section of `neurons.bin` that starts at a
4096-aligned offset, so any span of positions is one contiguous byte range. The engine reads
records into uint8 [n, record_bytes] buffers and computes on them where they lie (`Store.views`);
each record's crc32 is checked the first time it is read (`Store.verify`).
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetinfer import kernels
from hetinfer.atomic import atomic_dir
from hetinfer.config import ModelConfig
from hetinfer.errors import ArtifactError
from hetinfer.placement.cost import neuron_down_format, row_bytes
from hetinfer.placement.hardware import FLASH_BLOCK, format_size
from hetinfer.tensors import BLOCK_FORMATS, FLOAT_FORMATS, QTensor
from hetinfer.tiers import FLASH, GPU, RAM, TIERS

STORE_FORMAT, STORE_VERSION = "hetinfer.store", 1
MANIFEST = "store.json"
DATA_FILE = "neurons.bin"
RECORD_ALIGN = 8  # record sizes are multiples of this, so every segment's float view is aligned
SEGMENTS = ("gate", "up", "down_t")  # a record's parts, in order
WEIGHTS = ("native", "f16", "f32")  # kernels.convert's choices for gate and up (and down, when float)
REBUILD = "re-run `hetinfer prepare` to rebuild the store"


class StoreError(ArtifactError):
    """A flash store that cannot be built or used; the message names the problem and the fix."""


@dataclass
class StoreLayer:
    offset: int  # byte offset of position 0 in the data file; a multiple of 4096
    record_bytes: int  # a multiple of 8
    order: np.ndarray  # int64 [n_ff]: position -> neuron id
    position: np.ndarray  # int64 [n_ff]: neuron id -> position
    tier_starts: tuple[int, int, int]  # first position of the gpu, ram and flash tiers (gpu's is 0)
    crc32: np.ndarray  # uint32 [n_ff]: zlib.crc32 of each record, pad included, by position


@dataclass
class Store:
    """An opened, validated store (`open_store`). Positions index a layer's records in store order."""

    path: str
    manifest: dict
    layers: list[StoreLayer]
    data_path: str = field(init=False)  # the records file
    qtypes: tuple[str, str, str] = field(init=False)  # gate, up, down_t (neuron-major) formats
    record_bytes: int = field(init=False)  # the same for every layer
    d_model: int = field(init=False)
    _segments: tuple[tuple[int, int], ...] = field(init=False, repr=False)  # (offset, bytes) of each part
    _verified: list[np.ndarray] = field(init=False, repr=False)  # bool [n_ff] per layer, by position

    def __post_init__(self) -> None:
        m = self.manifest
        self.data_path = os.path.join(self.path, m["data"]["file"])
        self.qtypes = tuple(m["qtypes"][k] for k in SEGMENTS)
        self.record_bytes = int(m["record"]["bytes"])
        self.d_model = int(m["model"]["config"]["d_model"])
        self._segments = tuple((int(m["record"][k]["offset"]), int(m["record"][k]["bytes"])) for k in SEGMENTS)
        self._verified = [np.zeros(len(layer.order), bool) for layer in self.layers]

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"]["config"])

    @property
    def weights(self) -> str:
        """The weights flag the store was built with: native, f16 or f32."""
        return self.manifest["weights"]

    def views(self, records: np.ndarray) -> tuple[QTensor, QTensor, QTensor]:
        """(gate [n, d], up [n, d], down_t [n, d]) QTensor views of records uint8 [n, record_bytes]
        (any row stride, each row contiguous), read in place by kernels.sparse_ffn and the other kernels;
        row i of each view is the neuron whose record is row i."""
        if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != self.record_bytes \
                or (records.strides[1] != 1 and len(records)):  # numpy gives empty arrays zero strides
            raise ValueError(f"records must be uint8 [n, {self.record_bytes}] with contiguous rows, "
                             f"got {records.dtype} {records.shape} strides {records.strides}")
        n = records.shape[0]
        return tuple(QTensor(q, (n, self.d_model), records[:, at : at + width].view(_dtype(q)))
                     for q, (at, width) in zip(self.qtypes, self._segments))

    def verify(self, layer: int, positions: np.ndarray, records: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Check the crc32 of each record (row i of `records`, or row rows[i], holds position positions[i] of
        `layer`) not verified before; a record that passes is not checked again, so after the first reads
        this costs one bitmap lookup (no copy of the rows)."""
        done, crc = self._verified[layer], self.layers[layer].crc32
        positions = np.asarray(positions, np.int64)
        rows = np.arange(len(positions)) if rows is None else np.asarray(rows, np.int64)
        if len(rows) != len(positions):
            raise ValueError(f"{len(rows)} records for {len(positions)} positions")
        for i in np.flatnonzero(~done[positions]):
            p = positions[i]
            if zlib.crc32(records[rows[i]]) != crc[p]:
                raise StoreError(f"{self.data_path}: layer {layer}, position {p} (neuron "
                                 f"{self.layers[layer].order[p]}) fails its checksum, the store is corrupt; {REBUILD}")
            done[p] = True

    def read_records(self, layer: int, start: int, stop: int) -> np.ndarray:
        """uint8 [stop - start, record_bytes]: positions [start, stop) of `layer` by one buffered read,
        verified: the plain reading the tests compare `offload.reader.FlashReader` and the engine against."""
        lay = self.layers[layer]
        if not 0 <= start <= stop <= len(lay.order):
            raise ValueError(f"positions [{start}, {stop}) are outside layer {layer}'s 0..{len(lay.order)}")
        want = (stop - start) * lay.record_bytes
        try:
            data = np.fromfile(self.data_path, np.uint8, count=want, offset=lay.offset + start * lay.record_bytes)
        except OSError as e:
            raise StoreError(f"{self.data_path}: unreadable ({e.strerror or e}); {REBUILD}") from None
        if data.size != want:
            raise StoreError(f"{self.data_path}: layer {layer} ends early (the file was truncated); {REBUILD}")
        records = data.reshape(stop - start, lay.record_bytes)
        self.verify(layer, np.arange(start, stop), records)
        return records


def _dtype(qtype: str) -> np.dtype:
    return np.dtype(np.uint8 if qtype in BLOCK_FORMATS else FLOAT_FORMATS[qtype])


def record_layout(qtypes: tuple[str, str, str], d_model: int) -> tuple[list[tuple[int, int]], int]:
    """([(offset, bytes)] of the gate, up and down_t parts of a record, the record's bytes): parts in
    that order, each starting at a multiple of its element size, the record rounded up to 8 bytes."""
    parts, at = [], 0
    for q in qtypes:
        item = _dtype(q).itemsize
        at = -(-at // item) * item
        parts.append((at, row_bytes(d_model, q)))
        at += parts[-1][1]
    return parts, -(-at // RECORD_ALIGN) * RECORD_ALIGN


def store_order(tiers: np.ndarray, neuron_order: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One layer's store order: (order int64 [n_ff] position -> neuron id, first position of each tier).
    tiers: uint8 [n_ff] tier code per neuron id; neuron_order: int64 [n_ff] every id, in the order
    wanted within a tier. The gpu tier comes first, then ram, then flash."""
    t = tiers[neuron_order]
    order = neuron_order[np.argsort(t, kind="stable")].astype(np.int64)
    counts = np.bincount(t, minlength=3)
    return order, (0, int(counts[GPU]), int(counts[GPU] + counts[RAM]))


def layer_records(layer, weights: str, order: np.ndarray, parts: list[tuple[int, int]],
                  record_bytes: int) -> np.ndarray:
    """uint8 [n_ff, record_bytes]: the records of one layer's FFN (LayerWeights) in `order`."""
    down = kernels.convert(layer.down, weights)
    mats = (kernels.convert(layer.gate, weights), kernels.convert(layer.up, weights), kernels.transpose_down(down))
    records = np.zeros((len(order), record_bytes), np.uint8)
    for W, (at, width) in zip(mats, parts):
        records[:, at : at + width] = W.data[order].view(np.uint8)
    return records


def build_store(model, path: str | os.PathLike, tiers: np.ndarray, neuron_order: list[np.ndarray] | None = None,
                weights: str = "native", progress: bool = True) -> Store:
    """Write the store of `model` (a loader.Model) at directory `path` and open it.

    tiers: uint8 [n_layers, n_ff], the plan's tier code per neuron (0 gpu, 1 ram, 2 flash);
    neuron_order: per layer, every neuron id in the order wanted within a tier (the profile's
    `neuron_order(layer)`; default ascending ids); weights: gate and up as the model holds them
    ("native") or converted ("f16", "f32"; down converted too). Layers are read and written one at a
    time, into a temp directory beside `path` renamed into place (`atomic.atomic_dir`); an existing
    store there is replaced, anything else refused."""
    from tqdm import tqdm

    cfg = model.config
    path = Path(path).absolute()
    if weights not in WEIGHTS:
        raise StoreError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    orders = _store_orders(np.asarray(tiers), neuron_order, cfg.n_layers, cfg.n_ff)
    qtypes = _qtypes(model.weights.layers, weights)
    parts, rb = record_layout(qtypes, cfg.d_model)
    section = cfg.n_ff * rb
    offsets = [layer * (-(-section // FLASH_BLOCK) * FLASH_BLOCK) for layer in range(cfg.n_layers)]
    data_bytes = -(-(offsets[-1] + section) // FLASH_BLOCK) * FLASH_BLOCK
    _check_target(path)
    _check_space(path, data_bytes + cfg.n_layers * cfg.n_ff * 12 + (1 << 20))  # + index arrays, manifest
    try:
        with atomic_dir(path, StoreError) as tmp:
            crc = np.zeros((cfg.n_layers, cfg.n_ff), np.uint32)
            with open(tmp / DATA_FILE, "wb") as f:
                for layer in tqdm(range(cfg.n_layers), desc="store", unit="layer", disable=not progress):
                    records = layer_records(model.weights.layers[layer], weights, orders[layer][0], parts, rb)
                    crc[layer] = [zlib.crc32(r) for r in records]
                    f.write(bytes(offsets[layer] - f.tell()))  # zeros up to the 4096-aligned section start
                    f.write(records)
                    del records
                f.write(bytes(data_bytes - f.tell()))
            arrays = {"order": _write_array(tmp, "order", np.stack([o for o, _ in orders])),
                      "crc32": _write_array(tmp, "crc32", crc)}
            manifest = _manifest(model, weights, qtypes, parts, rb, offsets, [s for _, s in orders], data_bytes,
                                 arrays)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        raise StoreError(f"writing the store at {path} failed ({e.strerror or e}); nothing was left there") from None
    return open_store(path, model)


def _store_orders(tiers: np.ndarray, neuron_order, n_layers: int, n_ff: int) -> list:
    if tiers.shape != (n_layers, n_ff) or tiers.dtype.kind not in "iu":
        raise StoreError(f"the tier array is {tiers.dtype} {tiers.shape} but the model needs integer codes "
                         f"[{n_layers}, {n_ff}]; the plan is for another model, re-run `hetinfer place`")
    if tiers.size and (tiers.min() < 0 or tiers.max() > FLASH):
        raise StoreError("tier codes must be 0 (gpu), 1 (ram) or 2 (flash); re-run `hetinfer place`")
    if neuron_order is None:
        neuron_order = [np.arange(n_ff)] * n_layers
    if len(neuron_order) != n_layers:
        raise StoreError(f"{len(neuron_order)} neuron orders for {n_layers} layers; the profile is for another "
                         "model, re-run `hetinfer profile`")
    orders = []
    for layer, o in enumerate(neuron_order):
        o = np.asarray(o, np.int64)
        if o.shape != (n_ff,) or not np.array_equal(np.sort(o), np.arange(n_ff)):
            raise StoreError(f"layer {layer}'s neuron order is not a permutation of its {n_ff} neurons; the profile "
                             "is for another model, re-run `hetinfer profile`")
        orders.append(store_order(tiers[layer].astype(np.int64), o))
    return orders


def _qtypes(layers, weights: str) -> tuple[str, str, str]:
    """The records' (gate, up, down_t) formats: one set for every layer, so all records share one layout."""
    found = [tuple(q if weights == "native" else weights for q in (L.gate.qtype, L.up.qtype, L.down.qtype))
             for L in layers]
    found = [(gate, up, neuron_down_format(down)) for gate, up, down in found]
    for i, qtypes in enumerate(found):
        if qtypes != found[0]:
            raise StoreError(f"layer {i}'s FFN formats {qtypes} differ from layer 0's {found[0]} (gate, up, down_t); "
                             "a store holds one set: build it with --weights f16 or f32")
    return found[0]


def _check_target(path: Path) -> None:
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    try:
        fmt = json.loads((path / MANIFEST).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != STORE_FORMAT:
        raise StoreError(f"{path} exists and is not a hetinfer store; refusing to replace it, choose another path")


def _check_space(path: Path, need: int) -> None:
    """Fail before writing when the filesystem that will hold `path` has less than `need` bytes free."""
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise StoreError(f"not enough disk space for the store at {path}: it needs {format_size(need)}, "
                         f"{format_size(free)} available; free some space or choose another path")


def _write_array(d: Path, key: str, a: np.ndarray) -> dict:
    """Save `a` in directory d as KEY.<sha256[:16]>.npy; its manifest entry."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    name = f"{key}.{sha[:16]}.npy"
    (d / name).write_bytes(data)
    return {"file": name, "sha256": sha, "dtype": str(a.dtype), "shape": list(a.shape)}


def _manifest(model, weights: str, qtypes, parts, record_bytes: int, offsets: list[int], starts: list,
              data_bytes: int, arrays: dict) -> dict:
    cfg = model.config
    layers = [{"offset": off, "count": cfg.n_ff, "tier_starts": list(s)} for off, s in zip(offsets, starts)]
    counts = np.diff(np.array([s + (cfg.n_ff,) for s in starts]), axis=1).sum(0)
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"path": os.path.abspath(model.path), "fingerprint": model.fingerprint, "config": cfg.to_dict()},
        "weights": weights,
        "qtypes": dict(zip(SEGMENTS, qtypes)),
        "record": {"bytes": record_bytes, **{k: {"offset": at, "bytes": w} for k, (at, w) in zip(SEGMENTS, parts)}},
        "alignment": FLASH_BLOCK,
        "tiers": {name: int(n) for name, n in zip(TIERS, counts)},
        "layers": layers,
        "data": {"file": DATA_FILE, "bytes": data_bytes},
        "arrays": arrays,
    }


def open_store(path: str | os.PathLike, model=None, weights: str | None = None) -> Store:
    """Read and validate a store directory; with `model`, also check it was built for that model
    (fingerprint and config), with `weights`, that it holds weights of that flag. Record contents
    are checked as they are read (`Store.verify`)."""
    d = Path(path).absolute()
    manifest = _read_manifest(d)
    try:
        cfg = ModelConfig.from_dict(manifest["model"]["config"])
        qtypes = tuple(manifest["qtypes"][k] for k in SEGMENTS)
        record = manifest["record"]
        rb = int(record["bytes"])
        parts = [(int(record[k]["offset"]), int(record[k]["bytes"])) for k in SEGMENTS]
        offsets = [int(row["offset"]) for row in manifest["layers"]]
        counts = [int(row["count"]) for row in manifest["layers"]]
        starts = [tuple(int(s) for s in row["tier_starts"]) for row in manifest["layers"]]
        data_file, data_bytes = manifest["data"]["file"], int(manifest["data"]["bytes"])
        specs = {k: manifest["arrays"][k] for k in ("order", "crc32")}
        built_with = str(manifest["weights"])
        fingerprint = str(manifest["model"]["fingerprint"])
        layout = record_layout(qtypes, cfg.d_model)
    except (KeyError, TypeError, ValueError, ArtifactError) as e:  # row_bytes raises a PlacementError
        raise StoreError(f"{d / MANIFEST}: missing or bad field ({e}); {REBUILD}") from None
    L, n_ff = cfg.n_layers, cfg.n_ff
    if layout != (parts, rb):
        raise StoreError(f"{d / MANIFEST}: record layout {parts} of {rb} bytes does not fit {qtypes} rows of "
                         f"{cfg.d_model}; {REBUILD}")
    if len(offsets) != L or counts != [n_ff] * L:
        raise StoreError(f"{d / MANIFEST}: {len(offsets)} layer entries for {L} layers of {n_ff} neurons; {REBUILD}")
    for layer in range(L):
        end = offsets[layer - 1] + n_ff * rb if layer else 0
        s = starts[layer]
        if offsets[layer] % FLASH_BLOCK or offsets[layer] < end or len(s) != 3 or not 0 == s[0] <= s[1] <= s[2] <= n_ff:
            raise StoreError(f"{d / MANIFEST}: layer {layer}'s offset or tier starts are inconsistent; {REBUILD}")
    order = _read_array(d, "order", specs["order"], np.int64, (L, n_ff))
    crc = _read_array(d, "crc32", specs["crc32"], np.uint32, (L, n_ff))
    layers = []
    for layer in range(L):
        position = np.full(n_ff, -1, np.int64)
        position[order[layer]] = np.arange(n_ff)
        if (position < 0).any():
            raise StoreError(f"{d}: layer {layer}'s order is not a permutation of its neurons; {REBUILD}")
        layers.append(StoreLayer(offsets[layer], rb, order[layer], position, starts[layer], crc[layer]))
    _check_data(d / data_file, data_bytes, offsets[-1] + n_ff * rb)
    if model is not None and fingerprint != model.fingerprint:
        raise StoreError(f"{d} was built for model fingerprint {fingerprint} but {model.path} is {model.fingerprint}; "
                         f"{REBUILD} for this model")
    if model is not None and manifest["model"]["config"] != json.loads(json.dumps(model.config.to_dict())):
        raise StoreError(f"{d} was built for another configuration of {model.path}; {REBUILD} for this model")
    if weights is not None and weights != built_with:
        raise StoreError(f"{d} holds {built_with} weights ({'/'.join(qtypes)}) but {weights} were asked for; "
                         f"{REBUILD} with --weights {weights}")
    return Store(str(d), manifest, layers)


def _read_manifest(d: Path) -> dict:
    if not (d / MANIFEST).is_file():
        raise StoreError(f"no store at {d} (no {MANIFEST}); build it with `hetinfer prepare`")
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{d / MANIFEST}: unreadable ({e}); {REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise StoreError(f"{d / MANIFEST}: not a hetinfer store (format is not {STORE_FORMAT!r}); {REBUILD}")
    if manifest.get("version") != STORE_VERSION:
        raise StoreError(f"{d}: store version {manifest.get('version')!r}, this hetinfer reads {STORE_VERSION}; "
                         f"{REBUILD}")
    return manifest


def _read_array(d: Path, key: str, spec, dtype, shape: tuple[int, int]) -> np.ndarray:
    """An index array, checked against the manifest's sha256 and the store's shape."""
    try:
        data = (d / spec["file"]).read_bytes()
    except (OSError, KeyError, TypeError) as e:
        raise StoreError(f"{d}: the {key} array is missing or unreadable ({e}); {REBUILD}") from None
    if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
        raise StoreError(f"{d / spec['file']}: contents do not match the manifest's sha256 (modified or corrupt); "
                         f"{REBUILD}")
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise StoreError(f"{d / spec['file']}: not a NumPy array ({e}); {REBUILD}") from None
    if a.dtype != dtype or a.shape != shape or list(a.shape) != spec.get("shape"):
        raise StoreError(f"{d / spec['file']}: the {key} array is {a.dtype} {a.shape}, the store needs "
                         f"{np.dtype(dtype)} {shape}; {REBUILD}")
    return a


def _check_data(path: Path, want: int, end: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise StoreError(f"{path}: the records file is missing ({e.strerror or e}); {REBUILD}") from None
    if size != want or want < end:
        what = "truncated" if size < want else "of the wrong size"
        raise StoreError(f"{path} is {size} bytes, the manifest says {want} ({what}); {REBUILD}")

