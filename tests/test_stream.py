"""SpanStream: whole flash spans read ahead in layer order, cyclically, into a ring of pools."""
from __future__ import annotations

import numpy as np
import pytest

from hetinfer.offload.reader import FlashReader, FlashReadError
from hetinfer.offload.stream import Span, SpanStream
from hetinfer.placement.hardware import FLASH_BLOCK

RB = 1336


@pytest.fixture()
def spans_file(tmp_path) -> tuple[str, bytes, dict[int, Span]]:
    """Five layers' flash spans of different lengths, starting mid-block, with other bytes between them."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 64 * FLASH_BLOCK, dtype=np.uint8).tobytes()
    path = tmp_path / "records.bin"
    path.write_bytes(data)
    spans = {layer: Span(start, n, RB) for layer, (start, n) in
             enumerate([(100, 7), (3 * FLASH_BLOCK + 1000, 30), (20 * FLASH_BLOCK, 1), (30 * FLASH_BLOCK + 7, 50),
                        (64 * FLASH_BLOCK - 9 * RB, 9)])}
    return str(path), data, spans


def expected(data: bytes, s: Span) -> bytes:
    return data[s.start:s.start + s.n * s.record_bytes]


@pytest.mark.parametrize("n_pools", [1, 2, 3])
def test_cycles_through_the_layers_in_order_and_restarts_out_of_order(spans_file, n_pools):
    path, data, spans = spans_file
    with FlashReader(path, None, threads=2) as reader:
        stream = SpanStream(reader, spans, n_pools, 20 * FLASH_BLOCK)
        order = [0, 1, 2, 3, 4] * 3 + [3, 4, 0, 2, 2, 1]  # three tokens, then layers out of the cycle's order
        for layer in order:
            got = stream.get(layer)
            assert got.shape == (spans[layer].n, RB) and got.tobytes() == expected(data, spans[layer])
            stream.release(layer)
        assert stream.nbytes == n_pools * 20 * FLASH_BLOCK
        stream.drain()


def test_refuses_a_span_larger_than_a_pool(spans_file):
    path, _, spans = spans_file
    with FlashReader(path, None) as reader, pytest.raises(ValueError, match="more than a pool"):
        SpanStream(reader, spans, 2, 8 * FLASH_BLOCK)


def test_one_layer_uses_one_pool(spans_file):
    path, data, spans = spans_file
    with FlashReader(path, None) as reader:
        stream = SpanStream(reader, {2: spans[2]}, 2, 20 * FLASH_BLOCK)
        for _ in range(3):
            assert stream.get(2).tobytes() == expected(data, spans[2])
            stream.release(2)
        assert len(stream.pools) == 1


def test_a_failed_read_raises_on_the_engines_thread_and_close_stops_the_readers(spans_file, tmp_path):
    path, data, spans = spans_file
    short = tmp_path / "short.bin"
    short.write_bytes(data[: 28 * FLASH_BLOCK])  # layers 3 and 4 now lie past the end of the file
    with FlashReader(str(short), None) as reader:
        stream = SpanStream(reader, spans, 2, 20 * FLASH_BLOCK)
        for layer in (0, 1, 2):
            assert stream.get(layer).tobytes() == expected(data, spans[layer])
            stream.release(layer)
        with pytest.raises(FlashReadError, match="not inside the file"):
            stream.get(3)
        with pytest.raises(FlashReadError):  # read again, fails again
            stream.get(3)
        stream.close()
        assert not any(t.is_alive() for t in stream._threads)
