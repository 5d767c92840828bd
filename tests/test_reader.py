"""Flash reader: records read into rows against plain file reads, read planning on hand cases, the
O_DIRECT fallback, counters."""
from __future__ import annotations

import errno
import mmap
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hetinfer.offload.reader import DEFAULT_MERGE_GAP, FlashReader, FlashReadError, best_threads, plan_reads
from hetinfer.offload.uring import open_ring
from hetinfer.placement.hardware import ASSUMED_FLASH, FLASH_BLOCK, FlashTier

RB = 1336  # SmolLM2 Q4_1's record: gate and up rows (360 B each) + q8_0 down column (612 B) + pad
BASE = 3 * FLASH_BLOCK
N = 2000  # records; the file ends with the last one, mid-block
NVME = FlashTier(1 << 40, "/nvme", method="assumed", **ASSUMED_FLASH)


def flat_curve_to_64k() -> FlashTier:
    """Every read up to 64 KiB costs 40.96 us; larger ones stream at 1.6 GB/s (so a merged read of
    T bytes costs no more than two 4 KiB reads while T <= 128 KiB)."""
    return FlashTier(1 << 30, "/x", [4096, 65536], [1], [[1e8], [1.6e9]], "assumed")


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> tuple[str, bytes]:
    data = np.random.default_rng(0).integers(0, 256, BASE + N * RB, dtype=np.uint8).tobytes()
    path = tmp_path_factory.mktemp("reader") / "records.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        return str(path), f.read()


def expected(data: bytes, positions, rb: int = RB, base: int = BASE) -> np.ndarray:
    """uint8 [n, rb]: the records as plain reads of the file returned them."""
    rows = [np.frombuffer(data[base + p * rb:base + (p + 1) * rb], np.uint8) for p in positions]
    return np.stack(rows) if rows else np.zeros((0, rb), np.uint8)


def position_sets(rng: np.random.Generator) -> list[np.ndarray]:
    sets = [np.zeros(0, np.int64), np.arange(N), np.array([N - 1]), np.array([0, N - 1]),
            np.array([2, 3, 4, 5])]  # records 2..5 straddle 4 KiB boundaries
    for density in (0.01, 0.05, 0.3, 0.8):
        s = np.sort(rng.choice(N, max(1, int(density * N)), replace=False))
        sets.append(np.union1d(s, [N - 1]) if density == 0.05 else s)
    return sets


def needs_uring(reader: FlashReader, io: str) -> None:
    """Skip where the test asks for io_uring reads and this kernel or filesystem does not give them."""
    if io == "auto" and reader.io != "uring":
        pytest.skip(f"no io_uring reads here (method {reader.method}): open_ring() refused, or no O_DIRECT")


@pytest.mark.parametrize("direct,io", [(None, "threads"), (None, "auto"), (False, "auto")],
                         ids=["o_direct_threads", "o_direct_uring", "page_cache"])
@pytest.mark.parametrize("how", ["sync", "submit"])
@pytest.mark.parametrize("limits", [(1 << 20, 64 << 20), (8192, 16384)], ids=["one_round", "rounds"])
def test_read_into_matches_file(records_file, direct, io, how, limits):
    path, data = records_file
    max_read, staging = limits  # small limits: requests split mid-record, calls read in rounds
    rng = np.random.default_rng(1)
    with FlashReader(path, NVME, direct=direct, max_read=max_read, staging_bytes=staging, io=io) as reader:
        if direct is None and reader.method != "o_direct":
            pytest.skip(f"{path}: this filesystem refuses O_DIRECT")
        assert reader.method == ("o_direct" if direct is None else "page_cache")
        if direct is None:
            needs_uring(reader, io)
            assert reader.io == ("threads" if io == "threads" else "uring")
        else:
            assert reader.io == "threads"  # buffered reads keep the pool
        for positions in position_sets(rng):
            dst = np.zeros((len(positions) + 7, RB), np.uint8)
            rows = rng.permutation(len(dst))[:len(positions)]
            if how == "sync":
                reader.read_into(BASE, RB, positions, dst, rows)
            else:
                assert reader.submit(BASE, RB, positions, dst, rows).result() is None
            np.testing.assert_array_equal(dst[rows], expected(data, positions))
            untouched = np.setdiff1d(np.arange(len(dst)), rows)
            assert not dst[untouched].any()


def test_read_into_strided_rows_and_other_record_sizes(tmp_path):
    """Rows that are not back to back (a wider buffer's columns), records of 8 bytes and of more than
    a block, a section base that is not the file's start."""
    data = np.random.default_rng(2).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    rng = np.random.default_rng(3)
    with FlashReader(str(path), None, threads=3, max_read=16384) as reader:
        for rb, base in ((8, 4096), (5000, 8192), (4096, 0)):
            n = (len(data) - base) // rb
            positions = np.sort(rng.choice(n, n // 3, replace=False))
            wide = np.zeros((len(positions), rb + 24), np.uint8)
            dst = wide[:, 8:8 + rb]
            reader.read_into(base, rb, positions, dst, np.arange(len(positions)))
            np.testing.assert_array_equal(dst, expected(data, positions, rb, base))


def test_read_span_any_alignment(records_file):
    path, data = records_file
    with FlashReader(path, NVME, max_read=8192) as reader:
        for offset, nbytes in ((0, len(data)), (1, 1), (4095, 4098), (12345, 54321), (len(data) - 7, 7), (5, 0)):
            span = reader.read_span(offset, nbytes)
            assert span.dtype == np.uint8 and span.shape == (nbytes,)
            assert span.tobytes() == data[offset:offset + nbytes]
        with pytest.raises(FlashReadError, match="not inside the file"):
            reader.read_span(len(data) - 7, 8)


# ------------------------------------------------------------------------------------ planning


def covers(plan: list[tuple[int, int]], positions: np.ndarray, rb: int, base: int, max_read: int,
           align: int = FLASH_BLOCK) -> None:
    """The plan's invariants: aligned, ascending, disjoint, capped, and every record's bytes inside."""
    off = np.array([o for o, _ in plan], dtype=np.int64)
    size = np.array([s for _, s in plan], dtype=np.int64)
    assert (off % align == 0).all() and (size % align == 0).all()
    assert (size > 0).all() and (size <= max_read).all()
    assert (off[1:] >= off[:-1] + size[:-1]).all()
    covered = np.zeros(int(off[-1] + size[-1]) if len(plan) else 0, dtype=bool)
    for o, s in plan:
        covered[o:o + s] = True
    for p in positions:
        assert covered[base + p * rb:base + (p + 1) * rb].all(), p


def test_plan_small_gap_merged_large_gap_not():
    rb = FLASH_BLOCK  # one block per record: gaps are easy to count
    assert plan_reads(np.array([0, 3]), rb, 0, None, 1 << 20) == [(0, 4 * rb)]  # 8 KiB gap <= 16 KiB
    gap_blocks = DEFAULT_MERGE_GAP // rb + 1
    assert plan_reads(np.array([0, 1 + gap_blocks]), rb, 0, None, 1 << 20) == [(0, rb), ((1 + gap_blocks) * rb, rb)]
    # on a curve: two 4 KiB reads cost 81.92 us, a merged read of T bytes max(40.96 us, T / 1.6 GB/s), and its
    # gap of G bytes G / 1.6 GB/s more (join_pays)
    curve = flat_curve_to_64k()
    assert plan_reads(np.array([0, 15]), rb, 0, curve, 1 << 20) == [(0, 16 * rb)]  # 40.96 + 35.84 us: cheaper
    assert plan_reads(np.array([0, 17]), rb, 0, curve, 1 << 20) == [(0, rb), (17 * rb, rb)]  # 46.08 + 40.96: dearer
    assert plan_reads(np.array([0, 30]), rb, 0, curve, 1 << 20) == [(0, rb), (30 * rb, rb)]  # cheaper than two
    # reads without the gap's second charge, not with it


def test_plan_adjacent_records_are_one_request_aligned_out():
    # records 5..9 of 1336 bytes at base 4096 span bytes [10776, 17456): blocks 2..4
    assert plan_reads(np.arange(5, 10), RB, 4096, None, 1 << 20) == [(8192, 12288)]
    assert plan_reads(np.zeros(0, np.int64), RB, 4096, NVME, 1 << 20) == []


def test_plan_splits_at_max_read():
    rb, max_read = 1336, 64 << 10
    positions = np.arange(1000)  # 1.27 MiB in one run
    plan = plan_reads(positions, rb, 0, NVME, max_read)
    covers(plan, positions, rb, 0, max_read)
    span = -(-1000 * rb // FLASH_BLOCK) * FLASH_BLOCK
    assert len(plan) == -(-span // max_read)
    assert plan[0][0] == 0 and plan[-1][0] + plan[-1][1] == span
    assert all(o + s == o2 for (o, s), (o2, _) in zip(plan, plan[1:]))  # pieces of one span, back to back


def test_plan_dense_sets_become_whole_span_reads():
    rng = np.random.default_rng(4)
    span = -(-20000 * RB // FLASH_BLOCK) * FLASH_BLOCK
    for density in (0.5, 0.8, 1.0):
        positions = np.sort(rng.choice(20000, int(density * 20000), replace=False))
        plan = plan_reads(positions, RB, 0, NVME, 1 << 20)
        covers(plan, positions, RB, 0, 1 << 20)
        sizes = [s for _, s in plan]
        # all but a few gaps merged (reads past 1 MiB stream at one rate on this curve, so two long
        # runs gain nothing from merging), then split only at the cap
        assert len(plan) <= 1.2 * span / (1 << 20) and np.median(sizes) > (1 << 19)
        if density == 1.0:
            assert len(plan) == -(-span // (1 << 20))
    sparse = np.sort(rng.choice(20000, 200, replace=False))  # ~130 KB apart: one read per record
    assert len(plan_reads(sparse, RB, 0, NVME, 1 << 20)) > 150


def test_plan_covers_random_sets():
    rng = np.random.default_rng(5)
    for _ in range(40):
        rb = int(rng.choice([8, 1336, 4096, 9000]))
        base = int(rng.integers(0, 4)) * FLASH_BLOCK
        n = int(rng.integers(1, 3000))
        positions = np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
        curve = [None, NVME, flat_curve_to_64k()][int(rng.integers(3))]
        max_read = int(rng.choice([4096, 16384, 1 << 20]))
        align = int(rng.choice([512, 2048, FLASH_BLOCK]))
        covers(plan_reads(positions, rb, base, curve, max_read, align), positions, rb, base, max_read, align)


def test_plan_finer_alignment_reads_fewer_bytes_in_as_many_requests():
    # lone 9000-byte records: 4 KiB blocks read 12 or 16 KiB of each, 512-byte blocks 9216 or 9728
    positions = np.arange(0, 20000, 400)
    page = plan_reads(positions, 9000, 0, NVME, 1 << 20)
    fine = plan_reads(positions, 9000, 0, NVME, 1 << 20, align=512)
    covers(fine, positions, 9000, 0, 1 << 20, 512)
    assert len(fine) == len(page) == len(positions)
    assert {s for _, s in fine} <= {9216, 9728} and {s for _, s in page} <= {12288, 16384}


def test_plan_rejects_unaligned_max_read():
    with pytest.raises(ValueError, match="max_read"):
        plan_reads(np.arange(3), RB, 0, None, 5000)


def test_threads_from_the_curve():
    assert best_threads(None) == 8
    assert best_threads(NVME) == 32  # the assumed NVMe is fastest at 32 in flight for 4 KiB reads
    curve = FlashTier(1, "/x", [4096, 1 << 20], [1, 4, 16], [[1e8, 3e8, 2e8], [1e9, 1e9, 1e9]], "fadvise")
    assert best_threads(curve) == 4


# ---------------------------------------------------------------------- fallback, errors, counters


def test_fadvise_fallback_prints_one_notice(monkeypatch, capsys):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    data = np.random.default_rng(6).integers(0, 256, BASE + 300 * RB, dtype=np.uint8).tobytes()
    path = shm / f"hetinfer-reader-test-{os.getpid()}.bin"
    path.write_bytes(data)
    try:
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            direct_ok = True
        except OSError:
            direct_ok = False
        if direct_ok:  # tmpfs serves O_DIRECT since Linux 6.6: refuse it as older kernels do
            real_open = os.open

            def refusing_open(p, flags, *args, **kwargs):
                if flags & os.O_DIRECT:
                    raise OSError(errno.EINVAL, "Invalid argument", str(p))
                return real_open(p, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refusing_open)
        with pytest.raises(FlashReadError, match="refuses O_DIRECT"):
            FlashReader(str(path), direct=True)
        capsys.readouterr()
        with FlashReader(str(path), NVME) as reader:
            assert reader.method == "fadvise"
            positions = np.arange(0, 300, 7)
            for _ in range(3):
                dst = np.zeros((len(positions), RB), np.uint8)
                reader.read_into(BASE, RB, positions, dst, np.arange(len(positions)))
                np.testing.assert_array_equal(dst, expected(data, positions))
            assert reader.read_span(10, 100).tobytes() == data[10:110]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refuses O_DIRECT" in err[0] and str(path) in err[0]
    finally:
        path.unlink()


def test_counters_add_up(records_file):
    path, data = records_file
    rng = np.random.default_rng(7)
    with FlashReader(path, NVME, threads=4, max_read=16384) as reader:
        live = reader.stats  # the object the engine reads fields of before and after a call
        assert live.requests == 0 and live.wait_s == 0
        requests, nbytes, asked = 0, 0, 0
        for positions in position_sets(rng):
            before = reader.snapshot()
            dst = np.zeros((len(positions), RB), np.uint8)
            if len(positions) % 2:
                reader.submit(BASE, RB, positions, dst, np.arange(len(positions))).result()
            else:
                reader.read_into(BASE, RB, positions, dst, np.arange(len(positions)))
            plan = plan_reads(positions, RB, BASE, NVME, 16384, reader.align)
            delta = reader.snapshot() - before
            read = sum(min(o + s, len(data)) - o for o, s in plan)  # a read past the file's end is short
            assert (delta.requests, delta.bytes, delta.requested_bytes) == (len(plan), read, len(positions) * RB)
            assert delta.sizes == Counter(1 << (s - 1).bit_length() for _, s in plan)  # sizes up to a power of 2
            requests, nbytes, asked = requests + len(plan), nbytes + read, asked + len(positions) * RB
        before = reader.snapshot()
        reader.read_span(100, 40000)  # blocks [0, 40960) (4 KiB; 40448 with 512 B) in 16 KiB pieces
        span = -(-40100 // reader.align) * reader.align
        delta = reader.snapshot() - before
        assert (delta.requests, delta.bytes, delta.requested_bytes) == (3, span, 40000)
        assert dict(delta.sizes) == {16384: 2, 8192: 1}
        total = reader.snapshot()
        assert (total.requests, total.bytes, total.requested_bytes) == (requests + 3, nbytes + span, asked + 40000)
        assert total.wait_s > 0
        assert (live.requests, live.bytes, live.requested_bytes, live.sizes) == \
            (total.requests, total.bytes, total.requested_bytes, total.sizes)


def test_bad_calls_and_broken_files(records_file, tmp_path):
    path, data = records_file
    with pytest.raises(FlashReadError, match="cannot open"):
        FlashReader(str(tmp_path / "missing.bin"))
    reader = FlashReader(path, NVME)
    dst = np.zeros((4, RB), np.uint8)
    with pytest.raises(FlashReadError, match="past the end of the file") as e:
        reader.read_into(BASE, RB, np.array([N - 1, N]), dst, np.arange(2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="strictly increasing"):
        reader.read_into(BASE, RB, np.array([3, 2]), dst, np.arange(2))
    for bad in (np.zeros((4, RB + 1), np.uint8), np.zeros((4, 2 * RB), np.uint8)[:, ::2], dst.astype(np.int8)):
        with pytest.raises(ValueError, match="dst must be"):
            reader.read_into(BASE, RB, np.array([1]), bad, np.arange(1))
    with pytest.raises(ValueError, match="dst_rows"):
        reader.read_into(BASE, RB, np.array([1]), dst, np.array([4]))
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read_into(BASE, RB, np.array([1]), dst, np.arange(1))


@pytest.mark.parametrize("io", ["threads", "auto"])
def test_file_truncated_after_open(tmp_path, io):
    data = np.random.default_rng(8).integers(0, 256, BASE + 100 * RB, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    with FlashReader(str(path), NVME, io=io) as reader:
        if io == "auto":
            needs_uring(reader, io)
        os.truncate(path, BASE + 50 * RB)
        dst = np.zeros((1, RB), np.uint8)
        with pytest.raises(FlashReadError, match="truncated"):
            reader.read_into(BASE, RB, np.array([90]), dst, np.arange(1))
        future = reader.submit(BASE, RB, np.array([95]), dst, np.arange(1))
        with pytest.raises(FlashReadError, match="truncated"):
            future.result()
        reader.read_into(BASE, RB, np.array([10]), dst, np.arange(1))  # what is still there reads
        np.testing.assert_array_equal(dst, expected(data, [10]))


def test_uring_reads_more_requests_than_its_depth(records_file):
    """A ring of 8 entries reading 300 requests: queue and completion slots wrap around many times."""
    path, data = records_file
    ring = open_ring(8)
    if ring is None:
        pytest.skip("io_uring is not available here")
    fd = os.open(path, os.O_RDONLY)
    try:
        rng = np.random.default_rng(4)
        off = np.sort(rng.choice(len(data) // 512, 300, replace=False)).astype(np.int64) * 512
        size = rng.integers(1, 9, 300).astype(np.int64) * 512
        at = np.cumsum(size) - size
        buf = mmap.mmap(-1, int(size.sum()))
        address = np.frombuffer(buf, np.uint8).ctypes.data
        got, short = ring.read(fd, address, off, size, at)
        want = [data[o:o + n] for o, n in zip(off.tolist(), size.tolist())]
        assert got == sum(map(len, want))
        assert [(c.index, c.got) for c in short] == [(i, len(w)) for i, w in enumerate(want) if len(w) < size[i]]
        for o, n, a, w in zip(off.tolist(), size.tolist(), at.tolist(), want):
            assert buf[a:a + len(w)] == w
        buf.close()  # nothing holds on to the buffer after the reads
    finally:
        ring.close()
        os.close(fd)


def test_uring_read_errors_name_the_file_and_offset(records_file, tmp_path):
    path, data = records_file
    with FlashReader(path, NVME) as reader:
        needs_uring(reader, "auto")
        good = reader._fd
        reader._fd = os.open(tmp_path / "w.bin", os.O_WRONLY | os.O_CREAT)  # the kernel refuses to read it: EBADF
        try:
            with pytest.raises(FlashReadError, match=r"reading \d+ bytes at offset \d+ failed: Bad file descriptor; "
                                                     "check the disk") as e:
                reader.read_into(BASE, RB, np.array([5, 900]), np.zeros((2, RB), np.uint8), np.arange(2))
            assert path in str(e.value) and "\n" not in str(e.value)
            future = reader.submit(BASE, RB, np.array([5]), np.zeros((1, RB), np.uint8), np.arange(1))
            with pytest.raises(FlashReadError, match="failed: Bad file descriptor"):
                future.result()  # a look-ahead read's error, raised where the engine waits for it
        finally:
            os.close(reader._fd)
            reader._fd = good
    ring = open_ring()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:  # O_DIRECT at file offsets that are not aligned: the kernel's EINVAL comes back per request
        buf = mmap.mmap(-1, 8192)
        got, short = ring.read(fd, np.frombuffer(buf, np.uint8).ctypes.data, np.array([100, 4096, 4196]),
                               np.array([512, 512, 512]), np.array([0, 1024, 2048]))
        assert got == 512 and buf[1024:1536] == data[4096:4608]
        assert [(c.index, c.got, c.errno) for c in short] == [(0, 0, errno.EINVAL), (2, 0, errno.EINVAL)]
    finally:
        ring.close()
        os.close(fd)


def test_io_choice(records_file):
    path, _ = records_file
    with pytest.raises(ValueError, match="io must be one of auto, uring, threads"):
        FlashReader(path, NVME, io="aio")
    with pytest.raises(FlashReadError, match="io_uring reads are not available here .the file is not read with "
                                             "O_DIRECT.; use io='threads'"):
        FlashReader(path, NVME, direct=False, io="uring")
    with FlashReader(path, NVME, io="threads") as reader:
        assert reader.io == "threads"


def test_reads_a_built_store_like_the_store_does(tmp_path):
    """On a store built from a random model (labelled: random weights), the flash tier's records read
    by the reader pass the store's checksums and equal Store.read_records."""
    from test_store import build, random_model

    store, _, _ = build(tmp_path, random_model(n_ff=192))
    rng = np.random.default_rng(9)
    with FlashReader(store.data_path, NVME, max_read=8192) as reader:
        for layer, lay in enumerate(store.layers):
            flash = lay.tier_starts[2]
            n_ff = len(lay.order)
            positions = np.sort(rng.choice(np.arange(flash, n_ff), (n_ff - flash) // 2, replace=False))
            dst = np.zeros((len(positions), store.record_bytes), np.uint8)
            reader.read_into(lay.offset, store.record_bytes, positions, dst, np.arange(len(positions)))
            store.verify(layer, positions, dst)
            np.testing.assert_array_equal(dst, store.read_records(layer, 0, n_ff)[positions])


def test_reads_at_the_finest_alignment_the_file_accepts(records_file):
    path, data = records_file
    with FlashReader(path, NVME, direct=False) as reader:
        assert reader.align == FLASH_BLOCK  # buffered reads move whole pages
    with FlashReader(path, NVME) as reader:
        if reader.method != "o_direct":
            pytest.skip(f"{path}: this filesystem refuses O_DIRECT")
        assert reader.align in (512, 1024, 2048, FLASH_BLOCK)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:  # a read of one unit at an offset of one unit is accepted; half a unit is refused
            buf = mmap.mmap(-1, FLASH_BLOCK)
            assert os.preadv(fd, [memoryview(buf)[:reader.align]], reader.align) == reader.align
            if reader.align > 512:
                with pytest.raises(OSError):
                    os.preadv(fd, [memoryview(buf)[:reader.align // 2]], reader.align // 2)
        finally:
            os.close(fd)
        positions = np.array([3, 40, 41, 300])
        dst = np.zeros((4, RB), np.uint8)
        reader.read_into(BASE, RB, positions, dst, np.arange(4))
        np.testing.assert_array_equal(dst, expected(data, positions))


def test_read_span_into_reads_straight_into_the_buffer(records_file):
    """Aligned spans land byte for byte in the page-aligned buffer (the last one past the end of the file
    rounded up to the alignment), one request each; misaligned calls and spans past the file refuse."""
    path, data = records_file
    with FlashReader(path, NVME) as reader:
        a = reader.align
        end = -(-len(data) // a) * a
        buf = mmap.mmap(-1, end)
        for offset, nbytes in ((0, a), (a, 5 * a), (BASE, end - BASE), (0, end)):
            before = reader.snapshot()
            reader.read_span_into(offset, nbytes, buf)
            got = np.frombuffer(buf, np.uint8, min(nbytes, len(data) - offset))
            assert got.tobytes() == data[offset:offset + len(got)]
            done = reader.snapshot() - before
            assert done.bytes == len(got) and done.requests == 1 and sum(done.sizes.values()) == 1
        with pytest.raises(ValueError, match="multiples"):
            reader.read_span_into(1, a, buf)
        with pytest.raises(ValueError, match="multiples"):
            reader.read_span_into(0, 2 * end, buf)
        with pytest.raises(ValueError, match="multiples"):
            reader.read_span_into(0, a, buf, at=end)
        reader.read_span_into(BASE, 2 * a, buf, at=a)  # a piece of a span, into its place in the buffer
        assert bytes(buf[a:3 * a]) == data[BASE:BASE + 2 * a]
        with pytest.raises(FlashReadError, match="not inside the file"):
            reader.read_span_into(end, a, buf)
