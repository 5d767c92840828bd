"""SpanStream: whole flash spans read ahead in layer order, cyclically, into a ring of pools."""
from __future__ import annotations

import numpy as np
import pytest

from hetinfer.offload.reader import FlashReader, FlashReadError
from hetinfer.offload.stream import FEWER_PIECES_GAIN, PIECE_CHOICES, PieceTuner, Span, SpanStream
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
    """The same bytes whatever the piece count, including while the tuner changes it between cycles."""
    path, data, spans = spans_file
    with FlashReader(path, None, threads=2) as reader:
        stream = SpanStream(reader, spans, n_pools, 20 * FLASH_BLOCK, PieceTuner(cycles=1, retune=2))
        order = [0, 1, 2, 3, 4] * 9 + [3, 4, 0, 2, 2, 1]  # nine tokens, then layers out of the cycle's order
        used = set()
        for layer in order:
            got = stream.get(layer)
            assert got.shape == (spans[layer].n, RB) and got.tobytes() == expected(data, spans[layer])
            used.add(stream.tuner.pieces)
            stream.release(layer)
        assert used == set(PIECE_CHOICES)
        assert stream.nbytes == n_pools * 20 * FLASH_BLOCK
        stream.drain()


def test_reads_each_span_in_the_tuners_pieces(spans_file):
    path, _, spans = spans_file
    for pieces in PIECE_CHOICES:
        with FlashReader(path, None, threads=2) as reader:
            tuner = PieceTuner(choices=(pieces,))
            stream = SpanStream(reader, {3: spans[3]}, 1, 20 * FLASH_BLOCK, tuner)  # 17 blocks
            stream.get(3)
            assert reader.stats.requests == pieces


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(tuner: PieceTuner, clock: FakeClock, seconds: dict[int, float], cycles: int) -> list[int]:
    """`cycles` decode cycles, each taking `seconds[pieces]` at the tuner's current choice; the choices seen."""
    seen = []
    for _ in range(cycles):
        seen.append(tuner.pieces)
        tuner.cycle()
        clock.now += seconds[tuner.pieces]
    return seen


@pytest.mark.parametrize("fastest", PIECE_CHOICES)
def test_the_tuner_settles_on_the_fastest_choice_and_times_them_again_later(fastest):
    clock = FakeClock()
    tuner = PieceTuner(cycles=3, retune=20, clock=clock)
    seconds = {c: 0.010 if c == fastest else 0.015 for c in PIECE_CHOICES}
    _run(tuner, clock, seconds, 25)
    assert tuner.settled and tuner.pieces == fastest
    assert all(len(t) == 3 for t in tuner.times.values())
    assert tuner.choices[0] == max(PIECE_CHOICES)  # the count the cost model prices is tried first
    seen = _run(tuner, clock, seconds, 45)  # past `retune`: every choice is timed again, then the same one kept
    assert set(seen) == set(PIECE_CHOICES) and tuner.settled and seen[-1] == fastest


def test_the_tuner_keeps_the_first_choice_unless_another_is_clearly_faster():
    clock = FakeClock()
    close = PieceTuner(cycles=3, clock=clock)
    _run(close, clock, {c: 0.010 * (1 - 0.9 * FEWER_PIECES_GAIN) if c == 1 else 0.010 for c in PIECE_CHOICES}, 25)
    assert close.settled and close.pieces == PIECE_CHOICES[0]
    clear = PieceTuner(cycles=3, clock=clock)
    _run(clear, clock, {c: 0.010 * (1 - 1.1 * FEWER_PIECES_GAIN) if c == 1 else 0.010 for c in PIECE_CHOICES}, 25)
    assert clear.settled and clear.pieces == 1


def test_the_choices_take_turns_so_a_machine_speeding_up_favours_none():
    """Timed one after another, the choice tried last would look fastest on a machine that is getting faster
    (another tenant's load ending); in turns, back and forth, each sees the same trend."""
    clock = FakeClock()
    tuner = PieceTuner(cycles=4, clock=clock)
    seen = []
    for i in range(40):
        seen.append(tuner.pieces)
        tuner.cycle()
        clock.now += 0.020 * (1 - 0.015 * min(i, 30))  # every choice equally fast, the machine 45% faster by the end
    assert tuner.settled and tuner.pieces == PIECE_CHOICES[0]
    assert seen[:9] == [4, 4, 2, 2, 1, 1, 1, 2, 2]  # each timed once in turn, then back (not the cycle after a change)


def test_the_tuner_times_only_whole_decode_cycles():
    """A cycle with a prompt pass or a restart in it is not timed, nor the first after a change of choice
    (its first spans were queued the old way), so a long prompt cannot make a choice look slow."""
    clock = FakeClock()
    tuner = PieceTuner(choices=(4, 1), cycles=2, retune=100, clock=clock)
    tuner.cycle()
    clock.now += 5.0
    tuner.untimed()  # a prompt in this cycle
    tuner.cycle()
    clock.now += 0.020
    tuner.cycle()
    assert tuner.times[4] == pytest.approx([0.020]) and tuner.pieces == 1
    clock.now += 9.0  # the first cycle after the change: not timed
    tuner.cycle()
    clock.now += 0.010
    tuner.cycle()
    assert tuner.times[1] == pytest.approx([0.010]) and tuner.pieces == 1  # the next round starts with it
    clock.now += 0.010
    tuner.cycle()
    assert tuner.pieces == 4
    clock.now += 9.0
    tuner.cycle()
    clock.now += 0.020
    tuner.cycle()
    assert tuner.times[4] == pytest.approx([0.020, 0.020]) and tuner.times[1] == pytest.approx([0.010, 0.010])
    assert tuner.settled and tuner.pieces == 1


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
