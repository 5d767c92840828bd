"""Placement core: byte sizes, the cost model, the ILP against brute force, and capacity
properties over random profiles and budgets (hypothesis)."""
import dataclasses
import itertools
import time

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetinfer.config import ModelConfig
from hetinfer.placement import ilp, synth
from hetinfer.offload.reader import plan_reads
from hetinfer.placement.cost import (FLASH, FLASH_IO_BYTES, FLASH_MAX_READ, FLASH_POOL_BYTES, GPU, RAM,
                                     PlacementError, WeightFormats, build_problem, evaluate, miss_reads, model_sizes,
                                     overlapped, span_seconds, streams_flash,
                                     place_dense, row_bytes, violations, weight_sizes)
from hetinfer.placement.hardware import ASSUMED_FLASH, FLASH_BLOCK, STREAM_PIECES, FlashTier, GpuTier, Hardware, RamTier

LLAMA2_70B = ModelConfig(arch="llama", n_layers=80, d_model=8192, n_ff=28672, n_heads=64, n_kv_heads=8, head_dim=128,
                         vocab_size=32000, context_length=4096, name="llama-2-70b")


def tiny_config(n_layers: int, n_ff: int) -> ModelConfig:
    return ModelConfig(arch="llama", n_layers=n_layers, d_model=64, n_ff=n_ff, n_heads=2, n_kv_heads=1, head_dim=32,
                       vocab_size=64, context_length=16)


def flash(capacity: int) -> FlashTier:
    return FlashTier(capacity, "/nvme", method="assumed", **ASSUMED_FLASH)


def tiny_problem(freq, gpu_neurons=None, ram_neurons=0.0, flash_neurons=None, sync=2e-6, ram_bw=1e9, gpu_bw=2e10,
                 window_tokens=2, flash_tier: FlashTier | None = None):
    """A problem whose tiers hold the dense parts plus the given number of neurons' bytes each
    (GPU: None = no GPU; negative = less than the dense parts, so attention spills to RAM)."""
    freq = np.asarray(freq, dtype=np.float64)
    cfg = tiny_config(*freq.shape)
    sizes = model_sizes(cfg, WeightFormats.uniform("q8_0"), 16)
    b = int(sizes.neuron_bytes[0])
    gpu = None
    if gpu_neurons is not None:
        dense_gpu = sizes.scratch_bytes + sizes.gpu_decode_bytes + sizes.head_bytes + cfg.n_layers * (int(sizes.layer_bytes[0]) + sizes.kv_bytes)
        gpu = GpuTier(int(dense_gpu + gpu_neurons * b), gpu_bw, 1e10, sync)
    fl = None if flash_neurons is None else flash(int(flash_neurons * sizes.record_bytes[0]))
    if fl is not None and flash_tier is not None:
        fl = dataclasses.replace(flash_tier, capacity_bytes=fl.capacity_bytes)
    ram = place_dense(sizes, Hardware(ram=RamTier(1 << 40, ram_bw), gpu=gpu, flash=fl), window_tokens).ram_bytes + int(ram_neurons * b)
    return build_problem(freq, cfg, sizes, Hardware(ram=RamTier(ram, ram_bw), gpu=gpu, flash=fl), window_tokens)


# ------------------------------------------------------------------------------------------ sizes


def test_row_bytes_follow_the_stored_formats():
    assert row_bytes(8192, "q4_0") == 256 * 18
    assert row_bytes(8192, "q4_1") == 256 * 20
    assert row_bytes(8192, "q8_0") == 256 * 34
    assert row_bytes(8192, "f16") == 16384 and row_bytes(8192, "bf16") == 16384 and row_bytes(8192, "f32") == 32768
    with pytest.raises(PlacementError, match="multiple of 32"):
        row_bytes(100, "q4_0")


def test_llama2_70b_byte_sizes():
    s = model_sizes(LLAMA2_70B, WeightFormats.uniform("q4_0"), 4096)
    # gate and up rows in q4_0; the neuron-major down copy is requantized to q8_0 (kernels.transpose_down)
    assert s.neuron_bytes[0] == 2 * 256 * 18 + 256 * 34
    q, kv = 8192, 1024
    assert s.layer_bytes[0] == (q + 2 * kv) * 256 * 18 + 8192 * (q // 32) * 18 + 2 * 8192 * 4
    assert s.kv_bytes == 2 * 4096 * 8 * 128 * 4
    assert s.embed_bytes == 32000 * 256 * 18 and s.head_bytes == 32000 * 256 * 18 + 8192 * 4
    f16 = model_sizes(LLAMA2_70B, WeightFormats.uniform("f16"), 4096)
    assert f16.neuron_bytes[0] == 3 * 8192 * 2


def test_weight_sizes_of_a_loaded_model_match_its_tensors(model):
    c = model.config
    s = weight_sizes(c, model.weights, 256)
    L = model.weights.layers[3]
    assert s.neuron_bytes[3] == L.gate.row_bytes + L.up.row_bytes + row_bytes(c.d_model, "q8_0")
    assert s.layer_bytes[3] == L.wq.nbytes + L.wk.nbytes + L.wv.nbytes + L.wo.nbytes + 2 * 4 * c.d_model
    assert s.embed_bytes == model.weights.embed.nbytes and s.tied == c.tied_embeddings


# ----------------------------------------------------------------------------------------- dense


def test_dense_parts_fill_the_gpu_head_first_then_layers_in_order():
    cfg = tiny_config(4, 32)
    s = model_sizes(cfg, WeightFormats.uniform("q8_0"), 16)
    per_layer = int(s.layer_bytes[0]) + s.kv_bytes
    reserved = s.scratch_bytes + s.gpu_decode_bytes  # activations + the GPU kernels' decoded rows
    gpu = GpuTier(reserved + s.head_bytes + 2 * per_layer + per_layer // 2, 1e11, 1e10, 1e-5)
    d = place_dense(s, Hardware(ram=RamTier(1 << 30, 1e10), gpu=gpu))
    assert d.head_on_gpu and d.attn_on_gpu.tolist() == [True, True, False, False]
    assert d.gpu_bytes == reserved + s.head_bytes + 2 * per_layer
    assert d.ram_bytes == s.embed_bytes + s.scratch_bytes + 2 * per_layer  # tied-less head is on the GPU


def test_predictors_are_dense_parts_on_the_device_of_their_layers_attention():
    cfg = tiny_config(4, 32)
    bare = model_sizes(cfg, WeightFormats.uniform("q8_0"), 16)
    s = model_sizes(cfg, WeightFormats.uniform("q8_0"), 16, predictor_bytes=[1000, 2000, 3000, 4000])
    assert s.predictor_bytes.tolist() == (s.layer_bytes - bare.layer_bytes).tolist() == [1000, 2000, 3000, 4000]
    per_layer = s.layer_bytes + s.kv_bytes
    gpu = GpuTier(s.scratch_bytes + s.gpu_decode_bytes + s.head_bytes + int(per_layer[:2].sum()), 1e11, 1e10, 1e-5)
    d = place_dense(s, Hardware(ram=RamTier(1 << 30, 1e10), gpu=gpu))
    assert d.attn_on_gpu.tolist() == [True, True, False, False]
    assert d.predictor_seconds == pytest.approx(3000 / 1e11 + 7000 / 1e10)
    assert d.seconds - place_dense(bare, Hardware(ram=RamTier(1 << 30, 1e10), gpu=gpu)).seconds == pytest.approx(
        d.predictor_seconds)


def test_fixed_per_layer_work_is_charged_once_per_layer():
    cfg = ModelConfig(arch="llama", n_layers=4, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, head_dim=64,
                      vocab_size=1000, context_length=128)
    s = model_sizes(cfg, WeightFormats.uniform("q4_0"), 128)
    bare = place_dense(s, Hardware(ram=RamTier(1 << 30, 1e10)))
    fixed = place_dense(s, Hardware(ram=RamTier(1 << 30, 1e10, layer_seconds=5e-5)))
    assert bare.fixed_seconds == 0 and fixed.fixed_seconds == pytest.approx(4 * 5e-5)
    assert fixed.seconds - bare.seconds == pytest.approx(4 * 5e-5)


def test_attention_is_priced_at_the_mean_position_of_the_planned_context():
    """A token attends over the KV cache: n_ctx / 2 positions at ram.position_seconds each per CPU layer, and the
    cache's bytes to that position at the GPU's rate per GPU layer; the rest of a token does not depend on n_ctx."""
    cfg = ModelConfig(arch="llama", n_layers=4, d_model=256, n_ff=512, n_heads=4, n_kv_heads=2, head_dim=64,
                      vocab_size=1000, context_length=4096)
    ram = RamTier(1 << 30, 1e10, layer_seconds=5e-5, position_seconds=1e-7)
    short, long = (place_dense(model_sizes(cfg, WeightFormats.uniform("q4_0"), n), Hardware(ram=ram))
                   for n in (128, 4096))
    assert short.attention_seconds == pytest.approx(4 * 64 * 1e-7)
    assert long.attention_seconds == pytest.approx(4 * 2048 * 1e-7)
    assert long.seconds - short.seconds == pytest.approx(long.attention_seconds - short.attention_seconds)
    s = model_sizes(cfg, WeightFormats.uniform("q4_0"), 4096)
    per_layer = int(s.layer_bytes[0]) + s.kv_bytes
    gpu = GpuTier(s.scratch_bytes + s.gpu_decode_bytes + s.head_bytes + 2 * per_layer, 1e11, 1e10, 1e-5)
    split = place_dense(s, Hardware(ram=ram, gpu=gpu))
    assert split.attn_on_gpu.tolist() == [True, True, False, False]
    assert split.attention_seconds == pytest.approx(2 * s.kv_bytes / 2 / 1e11 + 2 * 2048 * 1e-7)


def test_a_flash_tier_adds_the_engines_io_buffers_and_per_layer_work():
    """With flash the offloading engine runs: FLASH_IO_BYTES more RAM (and two look-ahead pools without a
    window cache), and per layer its own work plus the look-ahead's second evaluation of the next layer's
    predictor."""
    s = model_sizes(tiny_config(4, 32), WeightFormats.uniform("q8_0"), 16, predictor_bytes=[1000, 2000, 3000, 4000])
    ram = RamTier(1 << 30, 1e10, layer_seconds=5e-5, offload_layer_seconds=2e-4)
    bare = place_dense(s, Hardware(ram=ram))
    tiered = place_dense(s, Hardware(ram=ram, flash=flash(1 << 30)))
    assert bare.io_bytes == 0 and bare.offload_seconds == 0
    assert tiered.io_bytes == FLASH_IO_BYTES and tiered.ram_bytes - bare.ram_bytes == FLASH_IO_BYTES
    assert tiered.offload_seconds == pytest.approx(4 * 2e-4 + 9000 / 1e10)  # layers 1-3's predictors again
    assert tiered.seconds - bare.seconds == pytest.approx(tiered.offload_seconds)
    no_window = place_dense(s, Hardware(ram=ram, flash=flash(1 << 30)), window_tokens=0)
    assert no_window.io_bytes == FLASH_IO_BYTES + 2 * FLASH_POOL_BYTES == no_window.ram_bytes - bare.ram_bytes
    with pytest.raises(PlacementError, match="flash I/O buffers"):
        place_dense(s, Hardware(ram=RamTier(tiered.ram_bytes - 1, 1e10), flash=flash(1 << 30)))


def test_too_small_ram_names_the_minimum():
    s = model_sizes(LLAMA2_70B, WeightFormats.uniform("q4_0"), 4096)
    need = place_dense(s, Hardware(ram=RamTier(1 << 50, 1e10))).ram_bytes
    place_dense(s, Hardware(ram=RamTier(need, 1e10)))  # exactly enough is enough
    with pytest.raises(PlacementError, match=r"need at least .* of RAM.*raise --ram") as e:
        place_dense(s, Hardware(ram=RamTier(need - 1, 1e10)))
    from hetinfer.placement.hardware import format_size
    assert format_size(need) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ cost


def test_neuron_costs_follow_the_model():
    freq = np.array([[0.9, 0.5, 0.1, 0.0]])
    p = tiny_problem(freq, gpu_neurons=1, ram_neurons=4, flash_neurons=10)
    b = float(p.sizes.neuron_bytes[0])
    assert b == 3 * 68 and p.sizes.record_bytes[0] == 208  # q8_0 rows of 64, the record padded to 8 bytes
    np.testing.assert_allclose(p.seconds[GPU][0], freq[0] * b / p.hw.gpu.bytes_per_s)
    np.testing.assert_allclose(p.seconds[RAM][0], freq[0] * b / p.hw.ram.bytes_per_s)
    # GPU and RAM have room for 5 neurons of the 4: a miss is priced as the coldest neuron's, alone on flash
    miss = freq[0] * (1 - freq[0]) ** 2
    assert p.miss_seconds[0] == pytest.approx(miss_reads(miss.min(), 208, p.hw.flash)[0])
    np.testing.assert_allclose(p.seconds[FLASH][0], miss * p.miss_seconds[0] + p.seconds[RAM][0])
    np.testing.assert_allclose(p.window[0], (1 - (1 - freq[0]) ** 2) * 208)  # window slots hold records


FLAT = FlashTier(1 << 40, "/nvme", read_sizes=[4096, 1 << 20], concurrency=[1], bytes_per_s=[[1e9], [1e9]],
                 method="assumed")  # no cost per request: only touching spans are worth joining


@pytest.mark.parametrize("record", [1336, 208, 4096, 9000])
def test_miss_reads_hand_cases(record):
    nvme = flash(1 << 40)
    pad = FLASH_BLOCK - np.gcd(record, FLASH_BLOCK)  # a request's expected alignment padding
    # isolated misses: one padded record per request
    seconds, nbytes, reads = miss_reads(1e-9, record, nvme)
    assert nbytes == pytest.approx(record + pad) and reads == pytest.approx(1.0)
    assert seconds == pytest.approx(nvme.read_seconds(record + pad))
    # every record missing: the whole span, in FLASH_MAX_READ pieces
    seconds, nbytes, reads = miss_reads(1.0, record, nvme)
    assert nbytes == record and reads == pytest.approx(record / FLASH_MAX_READ)
    assert seconds == pytest.approx(record * nvme.read_seconds(FLASH_MAX_READ) / FLASH_MAX_READ)


def test_miss_reads_at_half_density_on_a_flat_curve():
    """1336-byte records, half missing, no per-request cost: gaps of up to 3 records (< 4 KiB) are joined
    and no longer ones; by hand: E[gap | gap <= 3] = (1/2 + 2/4 + 3/8) / (1 + 1/2 + 1/4 + 1/8) = 11/15,
    a miss opens a request with probability 1/16."""
    seconds, nbytes, reads = miss_reads(0.5, 1336, FLAT)
    want = 1336 * (1 + 15 / 16 * 11 / 15) + 4088 / 16
    assert nbytes == pytest.approx(want) and reads == pytest.approx(1 / 16)
    assert seconds == pytest.approx(want / 1e9)
    assert miss_reads(0.5, 4096, FLAT)[1:] == pytest.approx((4096, 0.5))  # whole blocks: adjacent ones only


@pytest.mark.parametrize("q", [0.01, 0.05, 0.2, 0.6])
@pytest.mark.parametrize("record", [1336, 9000])
def test_miss_reads_predict_the_readers_plans(q, record):
    """The closed form against `offload.reader.plan_reads` on random miss sets of a long packed section: time
    and bytes per miss within 10%; the request count more loosely, since the model splits requests of the
    mean size at max_read where the reader splits each one (more pieces where sizes straddle it)."""
    nvme = flash(1 << 40)
    rng = np.random.default_rng(0)
    n = 400_000 if record < 4096 else 100_000
    positions = np.flatnonzero(rng.random(n) < q)
    plan = np.array(plan_reads(positions, record, 0, nvme, FLASH_MAX_READ))
    seconds, nbytes, reads = miss_reads(q, record, nvme)
    assert nvme.read_seconds(plan[:, 1]).sum() / len(positions) == pytest.approx(seconds, rel=0.1)
    assert plan[:, 1].sum() / len(positions) == pytest.approx(nbytes, rel=0.1)
    assert len(plan) / len(positions) == pytest.approx(reads, rel=0.4)


def test_predicted_speed_prices_each_layers_reads_at_its_own_miss_density():
    freq = np.stack([np.linspace(0.05, 0.95, 64)] * 2)
    p = tiny_problem(freq, ram_neurons=32, flash_neurons=200)
    tiers = np.full(freq.shape, FLASH, dtype=np.uint8)
    tiers[0, 32:] = RAM  # layer 0: its cold half on flash; layer 1: all of it
    u = evaluate(p, tiers)
    on = tiers == FLASH
    misses = np.where(on, p.misses, 0).sum(axis=1)
    assert u.misses == pytest.approx(misses)
    for layer, n in enumerate(on.sum(axis=1)):
        want = misses[layer] * np.array(miss_reads(misses[layer] / n, p.sizes.record_bytes[layer], p.hw.flash))
        assert [u.read_seconds[layer], u.read_bytes[layer], u.reads[layer]] == pytest.approx(want)
    assert u.seconds == pytest.approx(p.dense.seconds + sum(p.seconds[t][tiers == t].sum() for t in (RAM, FLASH)))
    assert u.predicted_seconds == pytest.approx(u.seconds + (u.read_seconds - misses * p.miss_seconds).sum())


def test_overlapped_reads_hide_the_measured_share_of_the_smaller_part():
    assert overlapped(3.0, 2.0, 0.0) == 5.0  # reads add to compute
    assert overlapped(3.0, 2.0, 1.0) == 3.0 and overlapped(2.0, 3.0, 1.0) == 3.0  # a token takes the larger
    assert overlapped(3.0, 2.0, 0.75) == pytest.approx(3.5) == 0.25 * 5.0 + 0.75 * 3.0


@pytest.mark.parametrize("overlap", [0.0, 0.6, 1.0])
def test_predicted_speed_hides_reads_behind_compute_by_the_measured_overlap(overlap):
    freq = np.stack([np.linspace(0.05, 0.95, 64)] * 2)
    base = tiny_problem(freq, ram_neurons=32, flash_neurons=200)
    p = tiny_problem(freq, ram_neurons=32, flash_neurons=200,
                     flash_tier=dataclasses.replace(base.hw.flash, overlap=overlap))
    tiers = np.full(freq.shape, FLASH, dtype=np.uint8)
    tiers[0, 32:] = RAM
    additive, u = evaluate(base, tiers), evaluate(p, tiers)
    read = p.read_seconds[tiers == FLASH].sum()
    assert read > 0 and read == pytest.approx((p.misses * p.miss_seconds[:, None])[tiers == FLASH].sum())
    compute = additive.seconds - read
    assert u.seconds == pytest.approx(compute + read - overlap * min(compute, read))
    hidden = overlap * min(compute, additive.read_seconds.sum())
    assert u.predicted_seconds == pytest.approx(additive.predicted_seconds - hidden)
    assert u.hidden_seconds == pytest.approx(hidden)
    assert (u.read_seconds == additive.read_seconds).all() and (u.used == additive.used).all()


def test_window_cache_bytes_are_split_per_layer_and_add_up():
    freq = np.random.default_rng(3).uniform(0, 1, (3, 40))
    p = tiny_problem(freq, ram_neurons=60, flash_neurons=200)
    tiers = np.where(np.random.default_rng(4).random(freq.shape) < 0.6, FLASH, RAM).astype(np.uint8)
    tiers[2] = RAM  # a layer without flash neurons reserves nothing
    u = evaluate(p, tiers)
    want = [int(np.ceil(p.window[layer][tiers[layer] == FLASH].sum())) for layer in range(3)]
    assert u.layer_window_bytes.tolist() == want and want[2] == 0 and u.window_bytes == sum(want)
    assert u.used[RAM] == p.dense.ram_bytes + p.sizes.neuron_bytes[0] * (tiers == RAM).sum() + sum(want)


def test_evaluate_charges_sync_only_to_layers_on_both_devices():
    freq = np.full((3, 8), 0.5)
    p = tiny_problem(freq, gpu_neurons=100, ram_neurons=100)
    tiers = np.array([[GPU] * 8, [GPU] * 4 + [RAM] * 4, [RAM] * 8], dtype=np.uint8)
    u = evaluate(p, tiers)
    assert u.split.tolist() == [False, True, True]  # attention is on the GPU: an all-RAM FFN is split too
    want = p.dense.seconds + p.seconds[GPU][0, :4].sum() * 3 + p.seconds[RAM][0, :4].sum() * 3 + 2 * p.sync_s
    assert u.seconds == pytest.approx(want)


# ------------------------------------------------------------------------------------------- ILP


def test_group_size_keeps_the_70b_model_under_20k_binaries():
    g = ilp.group_size_for(80, 28672, 3, 20000)
    assert 80 * -(-28672 // g) * 3 <= 20000 < 80 * -(-28672 // (g - 1)) * 3


def _brute_force(p, prefix: bool):
    """Best time per token over every neuron -> tier assignment that fits (and keeps hot-before-cold if `prefix`)."""
    best = np.inf
    L, F = p.freq.shape
    caps = np.array([p.hw.capacity(n) for n in ("gpu", "ram", "flash")])
    for combo in itertools.product(p.tiers, repeat=L * F):
        tiers = np.array(combo, dtype=np.uint8).reshape(L, F)
        if prefix:
            ok = not violations(p, tiers)
        else:
            ok = (evaluate(p, tiers).used <= caps).all()
        if ok:
            best = min(best, evaluate(p, tiers).seconds)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_ilp_equals_exact_optimum_on_enumerable_instances(seed):
    rng = np.random.default_rng(seed)
    freq = np.round(rng.uniform(0, 1, (2, 4)) ** 2, 3)
    p = tiny_problem(freq, gpu_neurons=rng.integers(0, 4) - (seed % 3 == 0) * 20, ram_neurons=rng.uniform(0, 5),
                     flash_neurons=8, sync=10 ** rng.uniform(-7, -5))
    best = _brute_force(p, prefix=True)
    if best == np.inf:
        with pytest.raises(PlacementError, match="do not fit"):
            ilp.solve(p, group_size=1, mip_gap=0.0, time_limit=30)
        return
    sol = ilp.solve(p, group_size=1, mip_gap=0.0, time_limit=30)
    assert sol.status == "optimal"
    assert sol.ilp_seconds == pytest.approx(best, rel=1e-9)
    assert sol.greedy_seconds is None or sol.seconds <= sol.greedy_seconds


@pytest.mark.parametrize("seed", range(4))
def test_ilp_prices_the_overlap_of_reads_and_compute_exactly(seed):
    """With a measured overlap the time per token is not a sum over neurons; the ILP still finds the optimum."""
    rng = np.random.default_rng(50 + seed)
    freq = np.round(rng.uniform(0, 1, (2, 4)) ** 2, 3)
    nvme = flash(1 << 40)  # slowed down so that reads and compute take comparable time, either the longer
    slow = dataclasses.replace(nvme, bytes_per_s=[[v * 5e-4 for v in row] for row in nvme.bytes_per_s],
                               overlap=float(rng.uniform(0.3, 1.0)))
    p = tiny_problem(freq, ram_neurons=rng.uniform(3, 6), flash_neurons=8, ram_bw=2e8, flash_tier=slow, window_tokens=1)
    best = _brute_force(p, prefix=True)
    sol = ilp.solve(p, group_size=1, mip_gap=0.0, time_limit=30)
    assert sol.status == "optimal" and sol.ilp_seconds == pytest.approx(best, rel=1e-9)
    assert sol.seconds == pytest.approx(evaluate(p, sol.tiers).seconds)


@pytest.mark.parametrize("seed", range(4))
def test_hot_before_cold_loses_nothing_with_gpu_and_ram(seed):
    rng = np.random.default_rng(100 + seed)
    freq = np.round(rng.uniform(0, 1, (2, 4)), 3)
    p = tiny_problem(freq, gpu_neurons=rng.integers(1, 7), ram_neurons=8, sync=10 ** rng.uniform(-7, -5))
    sol = ilp.solve(p, group_size=1, mip_gap=0.0, time_limit=30)
    assert sol.seconds == pytest.approx(_brute_force(p, prefix=False), rel=1e-9)


def test_ilp_avoids_sync_costs_that_greedy_pays():
    # flat profile: greedy spreads the GPU over every layer (all split), the ILP fills whole layers
    p = tiny_problem(np.full((4, 64), 0.3), gpu_neurons=128, ram_neurons=256, sync=2e-4)
    sol = ilp.solve(p, time_limit=30)
    g = evaluate(p, ilp.greedy(p))
    assert sol.chosen == "ilp" and sol.seconds < sol.greedy_seconds == pytest.approx(g.seconds)
    assert evaluate(p, sol.tiers).split.sum() < g.split.sum()


def test_layers_with_cpu_attention_use_the_gpu_only_when_it_pays():
    freq = np.tile(synth.power_law(1, 64, 1.0, 0.7), (3, 1))
    p = tiny_problem(freq, gpu_neurons=-1, ram_neurons=400, sync=5e-6, ram_bw=2e8)
    assert not p.dense.attn_on_gpu.all() and (p.min_gpu[~p.dense.attn_on_gpu] > 1).all()
    sol = ilp.solve(p, group_size=1, mip_gap=0.0, time_limit=30)
    assert not violations(p, sol.tiers)
    for layer in np.flatnonzero(~p.dense.attn_on_gpu):
        n = (sol.tiers[layer] == GPU).sum()
        assert n == 0 or n >= p.min_gpu[layer]


def test_greedy_promotes_by_activation_across_layers_not_by_rank():
    # always-active neurons cost no extra RAM to promote (the window holds them anyway); they must
    # not make every layer look alike: the hot layer gets the RAM, the cold one stays on flash
    freq = np.array([[1.0, 0.6, 0.5, 0.4, 0.3, 0.2], [1.0, 0.05, 0.04, 0.03, 0.02, 0.01]])
    p = tiny_problem(freq, ram_neurons=6, flash_neurons=20)  # the window takes 5.4 neurons' worth of RAM
    tiers = ilp.greedy(p)
    assert tiers[0].tolist() == [RAM, RAM, RAM, FLASH, FLASH, FLASH]
    assert tiers[1].tolist() == [RAM] + [FLASH] * 5


def test_no_room_for_the_neurons_is_an_error():
    p = tiny_problem(np.full((2, 16), 0.5), gpu_neurons=2, ram_neurons=3)
    with pytest.raises(PlacementError, match="do not fit.*--flash-dir"):
        ilp.solve(p, time_limit=10)


def test_a_solver_that_overruns_its_time_limit_is_killed_and_its_warm_start_used(tmp_path, monkeypatch):
    # CBC's presolve can run for many minutes on an infeasible group model without checking its
    # clock; this stand-in for it never returns at all
    hang = tmp_path / "cbc"
    hang.write_text("#!/usr/bin/env python3\nimport time\ntime.sleep(600)\n")
    hang.chmod(0o755)
    monkeypatch.setattr(ilp.pulp.PULP_CBC_CMD, "pulp_cbc_path", str(hang))
    monkeypatch.setattr(ilp, "KILL_GRACE", 0.5)
    p = tiny_problem(np.full((4, 64), 0.3), gpu_neurons=128, ram_neurons=256, sync=2e-4)
    start = time.perf_counter()
    sol = ilp.solve(p, group_size=2, time_limit=1.0)
    assert time.perf_counter() - start < 5
    assert sol.status == "killed" and sol.ilp_seconds is not None  # the greedy start stands in for CBC's answer
    assert not violations(p, sol.tiers) and sol.seconds <= sol.greedy_seconds
    assert not [c for c in psutil.Process().children(recursive=True) if str(hang) in " ".join(c.cmdline())]


# ------------------------------------------------------------------------------------ properties

profiles = st.sampled_from(["flat", "power", "uniform", "binary"])


@st.composite
def instances(draw):
    L, F = draw(st.integers(1, 3)), draw(st.sampled_from([8, 32, 96]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = draw(profiles)
    if kind == "flat":
        freq = np.full((L, F), draw(st.floats(0, 1)))
    elif kind == "power":
        freq = synth.power_law(L, F, draw(st.floats(0, 2)), draw(st.floats(0.3, 0.99)))
        freq = np.stack([rng.permutation(r) for r in freq])
    elif kind == "uniform":
        freq = rng.uniform(0, 1, (L, F)) ** draw(st.floats(1, 4))
    else:  # always or never active
        freq = (rng.uniform(0, 1, (L, F)) < draw(st.floats(0, 0.5))).astype(float)
    n = L * F  # budgets in neurons beyond the dense parts
    gpu = draw(st.one_of(st.none(), st.floats(-3, 1.2 * n)))
    ram = draw(st.floats(0, 1.2 * n))
    flash_n = draw(st.one_of(st.none(), st.floats(0, 1.5 * n)))
    roomy = draw(st.booleans())
    if roomy:  # roomy enough that some placement surely fits: RAM holds all, or the window (in slots of
        # 208-byte records, each layer's rounded up), counted here in 204-byte neurons
        window = (1 - (1 - freq) ** 2).sum() * 208 / 204
        ram, flash_n = (max(ram, n), None) if flash_n is None else (max(ram, window + L), max(flash_n, n))
    p = tiny_problem(freq, gpu_neurons=gpu, ram_neurons=ram, flash_neurons=flash_n,
                     sync=10 ** draw(st.floats(-7, -3)), ram_bw=10 ** draw(st.floats(8, 11)),
                     gpu_bw=10 ** draw(st.floats(10, 12)))
    return p, roomy


def _used_bytes(p, tiers):
    """Bytes per tier counted from scratch (not through cost.evaluate)."""
    b, record = p.sizes.neuron_bytes[:, None], p.sizes.record_bytes[:, None]
    window = sum(int(np.ceil(sum(p.window[layer, i] for i in np.flatnonzero(tiers[layer] == FLASH))))
                 for layer in range(len(tiers)))  # each layer's rounded up
    return {"gpu": p.dense.gpu_bytes + int((b * (tiers == GPU)).sum()),
            "ram": p.dense.ram_bytes + int((b * (tiers == RAM)).sum()) + window,
            "flash": int((record * (tiers == FLASH)).sum())}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_no_plan_exceeds_a_capacity_and_none_is_worse_than_greedy(instance):
    p, roomy = instance
    greedy = ilp.greedy(p)
    try:
        sol = ilp.solve(p, max_binaries=300, time_limit=5)
    except PlacementError:
        assert greedy is None  # the ILP found nothing either, or greedy would have been returned
        assert not roomy
        return
    assert sol.tiers.shape == p.freq.shape and set(np.unique(sol.tiers)) <= set(p.tiers)
    used = _used_bytes(p, sol.tiers)
    for name, u in used.items():
        assert u <= p.hw.capacity(name) or (name == "gpu" and u == 0)
    assert not violations(p, sol.tiers)
    assert sol.seconds == pytest.approx(evaluate(p, sol.tiers).seconds)
    if greedy is not None:
        assert not violations(p, greedy)
        assert sol.seconds <= evaluate(p, greedy).seconds * (1 + 1e-12)


# ------------------------------------------------------------------------------------- synthesis


def test_power_law_hits_the_target_density_and_decreases():
    f = synth.power_law(2, 4096, 1.2, 0.9)
    assert f.shape == (2, 4096) and f.mean() == pytest.approx(0.1, rel=1e-3)
    assert (np.diff(f[0]) <= 0).all() and f.max() <= 1
    assert synth.power_law(1, 100, 0.0, 0.75)[0] == pytest.approx(np.full(100, 0.25))


def test_rescale_keeps_each_layers_curve():
    src = np.stack([np.linspace(1, 0, 100), np.full(100, 0.2)])
    out = synth.rescale(src, 4, 1000)
    assert out.shape == (4, 1000)
    assert out[0].max() == 1.0 and out[0].min() == 0.0 and out[0].mean() == pytest.approx(0.5, abs=1e-3)
    assert out[3] == pytest.approx(np.full(1000, 0.2))


# This VM's flash probe (virtio disk, O_DIRECT, 2026-12-06): IOPS-bound, 4 KiB reads ~100 MB/s at best.
PROBED = FlashTier(1 << 40, "/flash", read_sizes=[4096, 16384, 65536, 262144, 1048576], concurrency=[1, 4, 16, 32],
                   bytes_per_s=[[5.2e7, 1.07e8, 9.5e7, 9.6e7], [2.5e8, 4.0e8, 5.5e8, 6.2e8], [6.5e8, 1.05e9, 1.36e9, 1.33e9],
                                [1.04e9, 1.21e9, 1.77e9, 1.51e9], [1.8e9, 1.68e9, 2.05e9, 1.72e9]], method="o_direct")


def test_span_seconds_is_stream_pieces_requests_at_once():
    for nbytes in (1 << 20, 3 << 19, 4 << 20):
        assert span_seconds(nbytes, PROBED) == pytest.approx(STREAM_PIECES * PROBED.read_seconds(nbytes / STREAM_PIECES))


def test_streams_flash_where_the_reader_would_read_the_span_anyway():
    n, rb = np.array([1400, 0, 1200]), np.array([1336, 1336, 1336])  # SmolLM2's records, a layer all in RAM
    assert streams_flash(0, 0.8, n, rb, PROBED)  # dense sets: the span costs what merged reads cost
    assert streams_flash(0, 0.1, n, rb, PROBED)  # 10%: on this IOPS-bound disk the gaps are merged anyway
    assert not streams_flash(0, 1e-4, n, rb, PROBED)  # a record now and then: reading the span wastes time
    assert not streams_flash(1, 0.8, n, rb, PROBED)  # a window cache keeps records across tokens
    assert not streams_flash(0, 0.8, n * 2, rb, PROBED)  # 3.6 MB spans do not fit a look-ahead pool
    assert not streams_flash(0, 0.8, np.zeros(3, np.int64), rb, PROBED)  # no flash tier


def test_a_streamed_plan_gathers_its_flash_neurons_into_few_layers_spread_apart():
    """Each layer with flash neurons costs a streaming engine ram.stream_layer_seconds: with every neuron computed
    (all layers alike) the ILP fills as few layers as the flash neurons need, and spread_streamed spaces them
    evenly over the cycle, so each layer's span is read while the layers before it compute."""
    freq = np.ones((8, 8192))
    p = tiny_problem(freq, ram_neurons=5.5 * 8192 - FLASH_IO_BYTES / 204, flash_neurons=10**6, window_tokens=0,
                     flash_tier=PROBED)  # streaming frees FLASH_IO_BYTES: RAM for 5.5 layers' neurons
    assert p.streamed
    spread = ilp.solve(p, group_size=256)
    assert (spread.tiers == FLASH).any(axis=1).all()  # free to spread: every layer streams a share
    p.hw.ram.stream_layer_seconds = 1e-3
    sol = ilp.solve(p, group_size=256)
    n_flash = (sol.tiers == FLASH).sum(axis=1)
    streamed = np.flatnonzero(n_flash)
    assert len(streamed) == 3 and sorted(n_flash[streamed])[1] >= 8000  # 2.5 layers' worth: two whole, one half
    assert streamed.tolist() == [1, 4, 6]  # evenly apart among 8
    u = evaluate(p, sol.tiers)
    assert u.stream_seconds == pytest.approx(3e-3) and u.seconds < evaluate(p, spread.tiers).seconds
    p.hw.ram.stream_layer_seconds = 0.0
    assert evaluate(p, sol.tiers).seconds == pytest.approx(u.seconds - 3e-3)


def test_spread_streamed_moves_only_interchangeable_layers():
    """Layers the cost model prices differently keep their rows: only identical layers trade places."""
    freq = np.ones((8, 8192))
    freq[0] = 0.5  # layer 0 differs from the rest
    p = tiny_problem(freq, ram_neurons=8192, flash_neurons=10**6, window_tokens=0, flash_tier=PROBED)
    assert p.streamed
    tiers = np.full(freq.shape, RAM, dtype=np.uint8)
    tiers[[0, 5, 6, 7], 100:] = FLASH  # layer 0 and the last three stream
    out = ilp.spread_streamed(p, tiers)
    assert (out[0] == tiers[0]).all()
    assert np.flatnonzero((out[1:] == FLASH).any(axis=1)).tolist() == [1, 3, 5]  # of layers 1-7: evenly apart
    assert evaluate(p, out).seconds == pytest.approx(evaluate(p, tiers).seconds)


def test_a_streamed_plan_prices_whole_span_reads():
    """Streaming is decided before the solve: a window-0 problem on an IOPS-bound disk whose layers fit a pool
    holds only the two pools as I/O buffers, does none of the records engine's work, and reads every flash record
    every token at its share of the span; the plan's prediction prices each layer's actual span."""
    freq = np.full((2, 4096), 0.95)
    p = tiny_problem(freq, ram_neurons=1024, flash_neurons=10_000, window_tokens=0, flash_tier=PROBED)
    assert p.streamed and p.dense.io_bytes == 2 * FLASH_POOL_BYTES and p.dense.offload_seconds == 0
    assert (p.misses == 1).all()
    tiers = np.full(freq.shape, FLASH, dtype=np.uint8)
    tiers[0, :1024] = RAM
    u = evaluate(p, tiers)
    assert u.streamed
    for layer, n in enumerate((3072, 4096)):
        span = n * int(p.sizes.record_bytes[layer])
        assert [u.read_seconds[layer], u.read_bytes[layer], u.reads[layer]] == pytest.approx(
            [span_seconds(span, p.hw.flash), span, STREAM_PIECES])
    assert u.predicted_seconds == pytest.approx(u.seconds + (u.read_seconds - np.array([3072, 4096]) * p.miss_seconds).sum())
    records = tiny_problem(freq, ram_neurons=1024, flash_neurons=10_000, window_tokens=2, flash_tier=PROBED)
    assert not records.streamed and records.dense.io_bytes == FLASH_IO_BYTES and not evaluate(records, tiers).streamed
