"""The flash store: records computed on in place equal the model's own matrices, store order and
alignment, the real SmolLM2 store, and every bad input refused with nothing left behind.
Unit tests use random-weight models (test_profiler.tiny_model with its FFN requantized)."""
import hashlib
import json
import os
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from hetinfer import kernels
from hetinfer.offload.store import (DATA_FILE, MANIFEST, STORE_FORMAT, STORE_VERSION, StoreError, build_store,
                                    open_store)
from hetinfer.tensors import FORMATS, QTensor, quantize
from test_profiler import tiny_model


def random_model(qtype="q4_1", seed=0, n_layers=3, n_ff=96):
    """A random model whose FFN matrices are stored as `qtype` (d_model 64)."""
    m = tiny_model(seed=seed, n_layers=n_layers, n_ff=n_ff)
    for layer in m.weights.layers:
        layer.gate, layer.up, layer.down = (quantize(W.dequantize(), qtype) for W in (layer.gate, layer.up, layer.down))
    return m


def random_plan(model, seed=0):
    """(tiers uint8 [L, n_ff] with every tier present, a random neuron order per layer)."""
    rng = np.random.default_rng(seed)
    L, n_ff = model.config.n_layers, model.config.n_ff
    tiers = rng.choice(3, size=(L, n_ff), p=[0.2, 0.3, 0.5]).astype(np.uint8)
    return tiers, [rng.permutation(n_ff) for _ in range(L)]


def build(tmp_path, model, weights="native", name="store"):
    tiers, order = random_plan(model)
    return build_store(model, tmp_path / name, tiers, order, weights=weights, progress=False), tiers, order


def same_ffn(store, model, layer, weights, rng, records=None):
    """sparse_ffn over the store's views of `records` (default: the whole layer) equals it over the
    model's matrices (converted as `weights`, down by transpose_down) for random row sets, bit for bit."""
    L = model.weights.layers[layer]
    Wg, Wu = kernels.convert(L.gate, weights), kernels.convert(L.up, weights)
    Wd_t = kernels.transpose_down(kernels.convert(L.down, weights))
    Bg, Bu, Bd = store.views(store.read_records(layer, 0, model.config.n_ff) if records is None else records)
    order = store.layers[layer].order
    for n in (1, 7, model.config.n_ff):
        positions = rng.choice(model.config.n_ff, n, replace=False)
        x = torch.from_numpy(rng.standard_normal((1, model.config.d_model)).astype(np.float32))
        y, h = kernels.sparse_ffn(Bg, Bu, Bd, positions, x, "silu", return_act=True)
        y0, h0 = kernels.sparse_ffn(Wg, Wu, Wd_t, order[positions], x, "silu", return_act=True)
        assert torch.equal(y, y0) and torch.equal(h, h0)


@pytest.mark.parametrize("qtype", FORMATS)
def test_records_compute_like_the_models_matrices(tmp_path, qtype):
    m = random_model(qtype)
    store, _, _ = build(tmp_path, m)
    down_t = qtype if qtype in ("f32", "f16", "bf16") else "q8_0"
    assert store.qtypes == (qtype, qtype, down_t) and store.weights == "native"
    rng = np.random.default_rng(1)
    for layer in range(m.config.n_layers):
        same_ffn(store, m, layer, "native", rng)


def test_f32_mode_stores_float32_gate_up_and_down(tmp_path):
    m = random_model("q4_0")
    store, _, _ = build(tmp_path, m, weights="f32")
    assert store.qtypes == ("f32",) * 3 and store.record_bytes == 3 * 64 * 4
    same_ffn(store, m, 1, "f32", np.random.default_rng(2))
    with pytest.raises(StoreError, match="holds f32 weights .* native were asked for"):
        open_store(store.path, m, weights="native")


def test_views_read_records_in_place_at_any_row_stride(tmp_path):
    """Records inside a wider buffer (the engine's RAM tier + cache slots) are computed on where they lie."""
    m = random_model("q8_0")
    store, _, _ = build(tmp_path, m)
    n_ff, rb = m.config.n_ff, store.record_bytes
    buf = np.zeros((n_ff, rb + 40), np.uint8)
    buf[:, :rb] = store.read_records(2, 0, n_ff)
    records = buf[:, :rb]
    gate, up, down_t = store.views(records)
    assert np.shares_memory(kernels._u8(gate), buf) and np.shares_memory(kernels._u8(down_t), buf)
    same_ffn(store, m, 2, "native", np.random.default_rng(3), records)
    with pytest.raises(ValueError, match="contiguous rows"):
        store.views(np.zeros((n_ff, 2 * rb), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match=f"uint8 \\[n, {rb}\\]"):
        store.views(buf)


def test_store_order_follows_tiers_then_the_given_order(tmp_path):
    m = random_model("q4_1")
    store, tiers, order = build(tmp_path, m)
    n_ff = m.config.n_ff
    for layer, lay in enumerate(store.layers):
        t = tiers[layer][lay.order]
        starts = [0, int((tiers[layer] == 0).sum()), int((tiers[layer] <= 1).sum())]
        assert list(lay.tier_starts) == starts and np.all(np.diff(t.astype(int)) >= 0)
        for k, (lo, hi) in enumerate(zip(starts, starts[1:] + [n_ff])):
            want = [i for i in order[layer] if tiers[layer][i] == k]  # the given order, restricted to the tier
            assert lay.order[lo:hi].tolist() == want
        assert np.array_equal(lay.position[lay.order], np.arange(n_ff))
    counts = {name: int((tiers == k).sum()) for k, name in enumerate(("gpu", "ram", "flash"))}
    assert store.manifest["tiers"] == counts


def test_default_order_is_ascending_ids_within_tiers(tmp_path):
    m = random_model("f16", n_layers=1)
    tiers = np.array([[2, 0, 1, 0] * 24], np.uint8)
    store = build_store(m, tmp_path / "s", tiers, progress=False)
    ids = np.arange(96)
    assert store.layers[0].order.tolist() == [*ids[1::2], *ids[2::4], *ids[0::4]]


def test_sections_are_aligned_and_records_packed(tmp_path):
    m = random_model("q4_1")  # 96 records of 152 bytes: sections not a multiple of 4096
    store, _, _ = build(tmp_path, m)
    rb = store.record_bytes
    assert rb == 152  # gate 40 + up 40 + down_t (q8_0) 68 = 148, padded to a multiple of 8
    offsets = [lay.offset for lay in store.layers]
    assert offsets == [0, 16384, 32768]  # 96 * 152 = 14592 bytes per section, each section 4096-aligned
    size = os.path.getsize(store.data_path)
    assert size == store.manifest["data"]["bytes"] == 49152  # the last section padded to 4096 too
    raw = np.fromfile(store.data_path, np.uint8)
    for layer, lay in enumerate(store.layers):
        section = raw[lay.offset : lay.offset + 96 * rb].reshape(96, rb)
        assert np.array_equal(section, store.read_records(layer, 0, 96))  # back to back, nothing between
        assert np.array_equal(section[37:40], store.read_records(layer, 37, 40))
        assert not raw[lay.offset + 96 * rb : lay.offset + 16384].any()
        assert not section[:, 148:].any()  # record pad is zeros


def test_rebuild_replaces_an_existing_store(tmp_path):
    m = random_model("q4_0")
    first, _, _ = build(tmp_path, m)
    tiers = np.full((3, 96), 2, np.uint8)
    second = build_store(m, first.path, tiers, progress=False)
    assert second.layers[0].tier_starts == (0, 0, 0)
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert len(os.listdir(first.path)) == 4  # manifest, records, order and crc32 arrays: no stale ones


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def store_dir(tmp_path):
    m = random_model("q4_1")
    store, _, _ = build(tmp_path, m)
    return m, store


def edit_manifest(store, **changes):
    path = os.path.join(store.path, MANIFEST)
    manifest = json.load(open(path))
    manifest.update(changes)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_truncated_records_file_refused(store_dir):
    m, store = store_dir
    os.truncate(store.data_path, os.path.getsize(store.data_path) - 4096)
    with pytest.raises(StoreError, match=r"neurons\.bin is \d+ bytes, the manifest says \d+ \(truncated\).*prepare"):
        open_store(store.path, m)


def test_flipped_bit_caught_at_first_read_naming_the_layer(store_dir):
    m, store = store_dir
    lay = store.layers[1]
    p = 40
    good = store.read_records(1, 0, 96)
    with open(store.data_path, "r+b") as f:
        f.seek(lay.offset + p * store.record_bytes + 17)
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x08]))
    reopened = open_store(store.path, m)  # sizes are right: opening does not read records
    reopened.read_records(0, 0, 96)
    with pytest.raises(StoreError, match=f"layer 1, position {p} \\(neuron {lay.order[p]}\\) fails its checksum.*rebu"):
        reopened.read_records(1, 30, 50)
    bad = good.copy()
    bad[5, 0] ^= 1
    with pytest.raises(StoreError, match="layer 1, position 5"):
        reopened.verify(1, np.arange(96), bad)
    reopened.verify(1, np.arange(96), good)
    reopened.verify(1, np.arange(96), bad)  # verified records are not checked again (a bitmap per layer)


def test_wrong_model_refused(store_dir):
    m, store = store_dir
    with pytest.raises(StoreError, match="built for model fingerprint tiny000000000000 but tiny-1 is tiny000000000001"):
        open_store(store.path, random_model(seed=1))
    same_file_other_shape = random_model(n_ff=128)  # tiny_model's fingerprint depends only on the seed
    with pytest.raises(StoreError, match="another configuration"):
        open_store(store.path, same_file_other_shape)


@pytest.mark.parametrize("change, match", [
    ({"version": 2}, "store version 2, this hetinfer reads 1"),
    ({"format": "hetinfer.plan"}, "not a hetinfer store"),
    ({"record": {"bytes": 152}}, "missing or bad field"),
    ({"layers": []}, "0 layer entries for 3 layers"),
])
def test_bad_manifest_refused(store_dir, change, match):
    m, store = store_dir
    edit_manifest(store, **change)
    with pytest.raises(StoreError, match=match):
        open_store(store.path, m)


def test_missing_store_refused(tmp_path, store_dir):
    with pytest.raises(StoreError, match="no store at .*nowhere.*hetinfer prepare"):
        open_store(tmp_path / "nowhere")
    m, store = store_dir
    os.remove(os.path.join(store.path, MANIFEST))
    with pytest.raises(StoreError, match=f"no {MANIFEST}"):
        open_store(store.path)


def test_bad_index_arrays_refused(store_dir):
    m, store = store_dir
    spec = store.manifest["arrays"]["order"]
    path = os.path.join(store.path, spec["file"])
    order = np.load(path)
    np.save(path, order[::-1].copy())  # the right shape, other contents
    with pytest.raises(StoreError, match="do not match the manifest's sha256"):
        open_store(store.path)
    np.save(path, order[:2])  # a consistent manifest for an array of the wrong shape
    edit_manifest(store, arrays={**store.manifest["arrays"], "order": {
        **spec, "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(), "shape": [2, 96]}})
    with pytest.raises(StoreError, match=r"the order array is int64 \(2, 96\), the store needs int64 \(3, 96\)"):
        open_store(store.path)


def leftovers(d):
    return sorted(os.listdir(d))


def test_no_disk_space_refused_before_writing(tmp_path, monkeypatch):
    m = random_model("q4_1")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - 1000, 1000))
    tiers, _ = random_plan(m)
    with pytest.raises(StoreError, match=r"not enough disk space .*: it needs 1\.\d\d MiB, 1000 B available"):
        build_store(m, tmp_path / "store", tiers, progress=False)
    assert leftovers(tmp_path) == []


def test_unwritable_directory_refused(tmp_path):
    m = random_model("q4_1")
    tiers, _ = random_plan(m)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot write .*file/store: a part of it is a file, not a directory; give another path"):
        build_store(m, tmp_path / "file" / "store", tiers, progress=False)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(StoreError, match="Permission denied"):
            build_store(m, ro / "store", tiers, progress=False)
        assert leftovers(ro) == []
    assert leftovers(tmp_path) == ["file"]


def test_refuses_to_replace_what_is_not_a_store(tmp_path):
    m = random_model("q4_1")
    tiers, _ = random_plan(m)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a hetinfer store; refusing to replace it"):
        build_store(m, tmp_path / "data", tiers, progress=False)
    assert leftovers(tmp_path / "data") == ["keep.txt"]


class UnreadableWeight(QTensor):
    """A weight whose bytes cannot be read (as an mmapped model file on a failing disk)."""

    def dequantize(self, rows=None):
        raise OSError(5, "Input/output error")


def test_failed_build_leaves_nothing_behind(store_dir, tmp_path):
    """A failure in the middle of writing (layer 2 unreadable) leaves no new directory and no temp files,
    and an existing store at the target intact."""
    m, old = store_dir
    bad = random_model("q4_1")
    down = bad.weights.layers[2].down
    bad.weights.layers[2].down = UnreadableWeight(down.qtype, down.shape, down.data)
    tiers, _ = random_plan(bad)
    with pytest.raises(StoreError, match="writing the store at .* failed \\(Input/output error\\)"):
        build_store(bad, tmp_path / "new", tiers, progress=False)
    with pytest.raises(StoreError, match="Input/output error"):
        build_store(bad, old.path, tiers, progress=False)
    assert leftovers(tmp_path) == ["store"]
    kept = open_store(old.path, m)
    assert np.array_equal(kept.layers[1].order, old.layers[1].order)
    kept.read_records(2, 0, 96)


@pytest.mark.parametrize("tiers, order, match", [
    (np.zeros((3, 95), np.uint8), None, r"tier array is uint8 \(3, 95\) but the model needs"),
    (np.full((3, 96), 3, np.uint8), None, "tier codes must be 0"),
    (np.zeros((3, 96), np.uint8), [np.arange(96)] * 2, "2 neuron orders for 3 layers"),
    (np.zeros((3, 96), np.uint8), [np.arange(96)] * 2 + [np.zeros(96, int)], "layer 2's neuron order is not a perm"),
])
def test_bad_plan_or_order_refused(tmp_path, tiers, order, match):
    with pytest.raises(StoreError, match=match):
        build_store(random_model("q4_1"), tmp_path / "store", tiers, order, progress=False)
    assert leftovers(tmp_path) == []


def test_one_format_set_per_store(tmp_path):
    """Layers stored in different formats cannot share one record layout unless converted."""
    m = random_model("q4_1")
    L1 = m.weights.layers[1]
    L1.gate, L1.up = (quantize(W.dequantize(), "q8_0") for W in (L1.gate, L1.up))
    tiers, _ = random_plan(m)
    with pytest.raises(StoreError, match=r"layer 1's FFN formats \('q8_0', 'q8_0', 'q8_0'\) differ .* --weights f16"):
        build_store(m, tmp_path / "store", tiers, progress=False)
    with pytest.raises(StoreError, match="weights must be one of native, f16, f32"):
        build_store(m, tmp_path / "store", tiers, weights="q8_0", progress=False)
    assert leftovers(tmp_path) == []
    store = build_store(m, tmp_path / "store", tiers, weights="f16", progress=False)
    assert store.qtypes == ("f16",) * 3
    same_ffn(store, m, 1, "f16", np.random.default_rng(4))


def test_manifest_fields(store_dir):
    m, store = store_dir
    man = store.manifest
    assert (man["format"], man["version"]) == (STORE_FORMAT, STORE_VERSION)
    assert man["model"]["fingerprint"] == m.fingerprint and man["model"]["config"]["n_ff"] == 96
    assert man["qtypes"] == {"gate": "q4_1", "up": "q4_1", "down_t": "q8_0"}
    assert man["record"] == {"bytes": 152, "gate": {"offset": 0, "bytes": 40}, "up": {"offset": 40, "bytes": 40},
                             "down_t": {"offset": 80, "bytes": 68}}
    assert man["data"] == {"file": DATA_FILE, "bytes": 3 * 16384}
    assert [row["offset"] for row in man["layers"]] == [0, 16384, 32768]


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_store(tmp_path, model):
    """The real model's store: its size from the model's shape (Q4_1 gate/up rows of 360 bytes, q8_0
    down columns of 612, record 1336 bytes), and layer 5 computes like the model's own matrices."""
    cfg = model.config
    tiers, order = random_plan(model)
    store = build_store(model, tmp_path / "store", tiers, order, progress=False)
    assert store.qtypes == ("q4_1", "q4_1", "q8_0") and store.record_bytes == 1336
    section = -(-cfg.n_ff * 1336 // 4096) * 4096
    assert os.path.getsize(store.data_path) == cfg.n_layers * section
    assert [lay.offset for lay in store.layers] == [i * section for i in range(cfg.n_layers)]
    same_ffn(store, model, 5, "native", np.random.default_rng(5))
    ram = store.layers[5].tier_starts
    assert store.read_records(5, ram[1], ram[2]).shape == (ram[2] - ram[1], 1336)
