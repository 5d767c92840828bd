"""The offloading engine against the baselines a user would pick, each run in a memory cgroup (issue 15).

    python benchmarks/offload.py [--quick] [--json] [--only smollm2|7b] [--cache-dir DIR] [--threads 2]

Every configuration runs in a child process inside a cgroup v1 memory cgroup that this benchmark
creates and removes (benchmarks/_cgroup.py; the child joins it before it execs, so everything it
loads is charged; the cgroup's memory.max_usage_in_bytes is the run's peak, page cache included),
with the page cache dropped before each run. Each engine gets its own fixed overhead plus the same
budget for model bytes, limit = overhead + budget. Overhead = the least limit under which the engine's
configuration that runs limited (hetinfer: offloaded, at the quality regime's larger budget; llama.cpp: mmap)
decodes the same prompt twice re-reading from storage no more than would cost it 10% of its uncapped
decode time (found by bisection, to 4 MiB or 2% of the uncapped peak, then confirmed; a limit too small
shows as the pages it evicted being read again, a measure the machine's other load does not move, where
the speed it costs does), minus the model bytes it held (hetinfer: its dense parts, KV cache positions
written, resident neurons and flash buffers; llama.cpp: the GGUF file and its KV cache). The uncapped peak
less the model bytes (the first rule; reported as `overhead_peak_bytes`) also counts the files read
while starting and never touched again (~100 MiB of libraries for hetinfer's runtime): a limit
reclaims them for free, and a configuration that reads through the page cache (llama.cpp mmap,
hetinfer's page-cache baseline) would get them as model bytes the others do not have. Every engine
keeps its KV cache in f16 (llama.cpp's default; `prepare --kv f16`), so the budget buys the same
bytes everywhere. Without cgroups (no root, no cgroup v1) the runs are not limited, the peak is the
child's max RSS, the overhead is the first rule's, and the report says so.

Workload: 2 threads; a prompt of held-out WikiText-2 (the last 30% of ../shared/data/wikitext-2/
valid.txt; the first 70% calibrates the profile) and greedy decoding. The first run (dense hetinfer,
everything in RAM) decodes greedily; every other run is fed the same tokens (teacher-forced, still
computing its own argmax, reported as "top-1 = ref"), so all configurations see the same inputs and
the same active sets. On SmolLM2 the offloaded, layer-cache and naive streaming runs, whose speeds lie
close together, run three times in turns (`Settings.rounds`) and count by their median run; every other
configuration runs once.

Configurations (all but llama.cpp are the same engine, `offload.deploy.open_session`):
  hetinfer offloaded  the deployment's plan: RAM-tier neurons resident, flash neurons read through the
                      window cache (the length prepare picks; 0: look-ahead pools only, or whole flash
                      spans streamed ahead where the plan says so), O_DIRECT; regimes `quality` (default predictors) and
                      `high_sparsity` (predictors trained with --density 0.15: on SmolLM2 this measures
                      the I/O path, not quality)
  naive streaming     all-flash (resident 0), every neuron, no window cache, O_DIRECT reads of whole
                      layers, streamed ahead while earlier layers compute where the pools hold a layer
                      (what AirLLM, with its prefetching, and LLM in a Flash's baseline do)
  layer cache         whole layers' FFN resident for the first layers that fit the budget (less the
                      dense parts and, on SmolLM2, the two pools the rest streams through), the rest
                      streamed, every neuron, no window cache
  page cache          the plan's RAM tier and active sets, no window cache, buffered reads: the
                      kernel's page cache (given what is left of the limit) is the flash cache
  llama.cpp mmap      llama-cpp-python, same GGUF, threads and context, mmap on, mlock off, and its CPU
                      weight repacking off (use_extra_bufts): repacking copies Q4_0 weights into anonymous
                      memory, which no limit below the model can hold; its overhead is measured the same way
  dense RAM           upper bounds, uncapped: dense hetinfer, and llama.cpp as it runs by default (repacking on)
  bound               1 / max(compute s/token of the same active sets with every neuron resident (the
                      same engine, measured, uncapped), ideal flash bytes/token / the disk's best
                      throughput for the read sizes the run used (flash probe, measured in this run))

Models and budgets (model bytes: dense parts, KV cache, RAM-tier neurons, window cache, predictors):
  SmolLM2-135M Q4_1: dense parts + KV cache (context 512, f16) + 25%, and + 50%, of the FFN bytes, the
                     dense parts as `hetinfer place` counts them, the regime's predictors included (so
                     each regime has its own budget, and every configuration of a record gets it), the
                     FFN bytes in the store's format; deployments by `hetinfer prepare --ram BUDGET`.
  7B scale run:      SYNTHETIC. A Llama-2-7B-shaped GGUF (32 layers, d 4096, FFN 11008, Q4_0, random
                     weights, SmolLM2's tokenizer so vocab 49152), written once; budget dense parts +
                     KV cache (context 512) + 1 GiB. Random weights have no activation structure, so
                     the active sets come from `offload.trace` (power-law skew: 20% of neurons serve
                     80% of activations, density 10%, token-to-token reuse rho 0.5), the plan is
                     `hetinfer place --power-law` with the trace's exponent and density (the same
                     frequency array; trace ids relabelled by rank, hottest first), and the trace
                     replaces the predictor. Generated text is meaningless; only speed and bytes are.

Artefacts (profile, predictors, plans, stores, the 7B file) are kept in --cache-dir and reused, but for
SmolLM2's plans: the cost model's check compares a plan's predicted speed with the measured one, so a full
run probes this machine afresh (hetinfer's probe cache set aside) and re-makes them (`Settings.replan`;
not with --quick). On a VM whose speed moves by a third from one hour to the next, a plan priced from
probes of another hour predicts that hour's speed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._cgroup import cgroup_status, drop_page_cache, run_limited  # noqa: E402
from benchmarks._util import llama_cpp_build, machine, table  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CTX = 512  # context every engine is sized for: prompt + generated tokens fit, the KV cache stays small
KV = "f16"  # every engine's KV cache element (llama.cpp's default), so a budget buys the same bytes in each
KEEP = 0.9  # an engine's overhead: the least limit whose reads back from storage cost it at most 1 - KEEP of its speed
CONFIRM_RUNS = 8  # runs after the overhead search's bisection, stepping up until a limit fits twice
WINDOW = 5  # window-cache tokens of the 7B plan (LLM in a Flash's); SmolLM2's: prepare picks them
REGIMES = ("quality", "high_sparsity")
SHARES = (0.25, 0.5)  # of the FFN bytes, beyond the dense parts, for SmolLM2
SPARSE_DENSITY = 0.15  # the high_sparsity regime's predicted density (train-predictors --density)
BIG_RAM_EXTRA = 1 << 30  # the 7B run's budget beyond its dense parts and KV cache
BIG_SHAPE = dict(n_layers=32, d_model=4096, n_ff=11008, n_heads=32)
MiB = 1 << 20


@dataclass
class Settings:
    prompt_tokens: int = 256
    tokens: int = 128  # decoded by hetinfer's configurations and llama.cpp in RAM
    slow_tokens: int = 128  # naive streaming, layer cache and llama.cpp under the limit (the slowest)
    rounds: int = 3  # SmolLM2's offloaded, layer-cache and naive runs, in turns: their medians count (the close ones)
    big_prompt_tokens: int = 32  # the 7B run: every configuration prefills every neuron of 6.7B parameters
    big_tokens: int = 128  # as the SmolLM2 runs: the window cache warms up in its first tokens
    big_slow_tokens: int = 4
    big_search_tokens: int = 16  # the 7B run's overhead search (SmolLM2's decodes `tokens`)
    profile_tokens: int = 50_000  # calibration tokens for SmolLM2's profile
    profile_args: tuple[str, ...] = ()  # further `hetinfer profile` flags
    predictor_args: tuple[str, ...] = ()  # further `hetinfer train-predictors` flags (default: its defaults)
    artefacts: str = "smollm2"  # cache subdirectory of SmolLM2's profile, predictors and deployments
    replan: bool = True  # probe the machine afresh and re-make SmolLM2's plans (the cost model's check)
    threads: int = 2
    timeout_s: float = 600.0


# small profile and predictors, as the tests make, and the plans reused: plumbing, not figures
QUICK = Settings(prompt_tokens=64, tokens=16, slow_tokens=8, rounds=1, big_prompt_tokens=8, big_tokens=4,
                 big_slow_tokens=2, big_search_tokens=2,
                 profile_tokens=2048, profile_args=("--samples", "1024"), predictor_args=("--ranks", "32", "--epochs", "2"),
                 artefacts="smollm2-quick", replan=False)


# ------------------------------------------------------------------------------------------------
# the child: one configuration, one prompt, timed decode
# ------------------------------------------------------------------------------------------------


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if "prepare" in spec:  # the deployments, made here so the parent never maps the model (smollm2_deployments)
        with contextlib.redirect_stdout(sys.stderr):  # the steps' reports; stdout is --json's
            deps = prepare_deployments(**spec["prepare"])
        Path(spec["out"]).write_text(json.dumps([[*key, str(out), window] for key, (out, window) in deps.items()]))
        return
    if spec["engine"] == "llama.cpp":  # nothing of hetinfer's runtime (numba, numpy) is loaded: it is charged
        result = run_llama(spec)
    else:  # hetinfer's CPU runtime, as `hetinfer run` loads it (not torch)
        from hetinfer import kernels

        kernels.set_threads(spec["threads"])
        kernels.warmup(dense_only=spec["config"] == "dense")  # loads the kernels the parent compiled, as run/generate do
        result = run_hetinfer(spec)
    Path(spec["out"]).write_text(json.dumps(result))


def disk_read_bytes() -> int | None:
    """Bytes this process has had read from storage so far (/proc/self/io `read_bytes`: its page faults on
    mapped files and its read calls that missed the page cache, every thread's), None where not counted."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return None


def timed_decode(prefill, step, prompt: list[int], n: int, forced: list[int] | None) -> dict:
    """Prefill `prompt`, then `n` greedy steps (fed `forced[i]` instead of the argmax when given); also the
    bytes read from storage while decoding (`decode_read_bytes`, None where the kernel does not count them)."""
    t0 = time.perf_counter()
    logits = prefill(prompt)
    read0 = disk_read_bytes()
    t1 = time.perf_counter()
    out, agree = [], 0
    for i in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        feed = forced[i] if forced else tok
        agree += tok == feed
        logits = step(feed)
    t2 = time.perf_counter()
    read1 = disk_read_bytes()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": n, "prompt_tokens": len(prompt),
            "tok_s": n / (t2 - t1), "prefill_tok_s": len(prompt) / (t1 - t0), "generated": out,
            "top1_agree": agree / max(n, 1), "decode_read_bytes": None if read0 is None else read1 - read0}


def run_llama(spec: dict) -> dict:
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    if not spec["repack"]:  # keep the weights in the mapped file: CPU repacking copies Q4_0 into anonymous memory
        defaults = capi.llama_model_default_params

        def mapped_params():
            params = defaults()
            params.use_extra_bufts = False
            return params

        capi.llama_model_default_params = mapped_params
    llm = Llama(model_path=spec["model"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                n_ctx=spec["ctx"], use_mmap=True, use_mlock=False, verbose=False)
    logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # noqa: E731

    def prefill(ids: list[int]) -> np.ndarray:
        llm.eval(ids)
        return logits()

    def step(tok: int) -> np.ndarray:
        llm.eval([tok])
        return logits()

    r = timed_decode(prefill, step, spec["prompt"], spec["tokens"], spec["forced"])
    from hetinfer.config import ModelConfig

    cfg = ModelConfig.from_dict(spec["config_dict"])
    r["model_bytes_held"] = os.path.getsize(spec["model"]) + cfg.kv_cache_bytes(spec["ctx"], KV)
    return r


def run_hetinfer(spec: dict) -> dict:
    from hetinfer import heap
    from hetinfer.generate import PREFILL_CHUNK, Session
    from hetinfer.info import component_bytes

    if spec["config"] == "dense":
        from hetinfer.loader import load_model

        model = load_model(spec["model"])
        session = Session(model, n_ctx=spec["ctx"], kv=KV)
    else:
        session, model = offload_session(spec)
    heap.freeze()  # as `hetinfer run` does once the model is loaded
    tr, cache, ffn = model.transformer, session.cache, session.ffn

    def prefill(ids: list[int]) -> np.ndarray:
        for s in range(0, len(ids), PREFILL_CHUNK):
            logits = tr.forward(ids[s : s + PREFILL_CHUNK], cache, ffn)
        if ffn is not None:  # decode's figures only
            ffn.reset_stats()
            reads_before["stats"] = ffn.reader.snapshot()
        return logits

    reads_before = {}
    r = timed_decode(prefill, lambda tok: tr.forward([tok], cache, ffn), spec["prompt"], spec["tokens"],
                     spec["forced"])
    kv = model.config.kv_cache_bytes(cache.pos, cache.dtype)
    if ffn is None:
        r["model_bytes_held"] = os.path.getsize(spec["model"]) + kv
        return r
    parts = component_bytes(model)
    del parts["ffn"]
    r["model_bytes_held"] = sum(parts.values()) + kv + ffn.resident_bytes()
    r["offload"] = ffn.report()
    done = ffn.reader.snapshot() - reads_before["stats"]
    r["read_sizes"] = {str(k): v for k, v in sorted(done.sizes.items())}  # read size (pow2 bucket) -> reads
    r["reader_threads"] = ffn.reader.threads
    r["reader_method"] = ffn.reader.method
    r["reader_io"] = ffn.reader.io
    return r


def offload_session(spec: dict):
    """(Session, Model) of the offloading engine configured as `spec` says."""
    from hetinfer.offload import deploy

    if spec.get("deploy"):
        dep = deploy.load_deployment(spec["deploy"])
    else:
        dep = trace_deployment(spec)
    n_layers, n_ff = dep.model.config.n_layers, dep.model.config.n_ff
    resident = {"plan": None, "flash": np.zeros(n_layers, np.int64), "ram": np.full(n_layers, n_ff, np.int64)}
    res = spec["resident"]
    select = None
    if spec["select"] == "every":
        select = lambda layer, h: None  # noqa: E731
    elif spec["select"] == "trace":
        select = TraceSelector(spec["trace"])
    session = deploy.open_session(
        dep, n_ctx=spec["ctx"], select=select, direct=spec["direct"],
        resident=resident[res] if isinstance(res, str) else np.asarray(res, np.int64),
        capacity=None if spec["capacity"] is None else np.full(n_layers, spec["capacity"], np.int64))
    return session, dep.model


class TraceSelector:
    """The synthetic trace's active sets for decode token t = the t-th call for layer 0 (the engine asks
    for layer 0 once per token; look-ahead asks for layers >= 1 twice, and gets the same set), in the
    plan's labels: trace neuron ids relabelled by frequency rank, hottest first, as `place --power-law` labels them."""

    def __init__(self, trace_cfg: dict):
        from hetinfer.offload.trace import Trace, TraceConfig

        self.trace = Trace(TraceConfig(**trace_cfg))
        order = np.argsort(-self.trace.freq, axis=1, kind="stable")  # [n_layers, n_ff] rank -> trace id
        self.rank = np.empty_like(order)
        np.put_along_axis(self.rank, order, np.arange(order.shape[1])[None], axis=1)  # trace id -> rank
        self.token = -1

    def __call__(self, layer: int, h) -> np.ndarray:
        if layer == 0:
            self.token += 1
        return np.sort(self.rank[layer][self.trace.active(layer, self.token)])


def trace_deployment(spec: dict):
    """The 7B run's Deployment: the random GGUF, its power-law plan and store; no predictors (the trace)."""
    from hetinfer.loader import load_model
    from hetinfer.offload.deploy import Deployment
    from hetinfer.offload.store import open_store
    from hetinfer.placement import load_plan

    model = load_model(spec["model"])
    return Deployment(Path(spec["plan"]).parent, {"window": WINDOW, "ctx": spec["ctx"]}, model,
                      load_plan(spec["plan"]), open_store(spec["store"], model), None)


# ------------------------------------------------------------------------------------------------
# the parent: artefacts, runs under limits, records
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    label: str
    result: dict  # the child's, plus peak_memory_bytes, memory_limit_bytes, wall_s (and failed, when it did)


class Runner:
    """Runs configurations as children in their own memory cgroups, dropping the page cache first."""

    def __init__(self, settings: Settings, cache_dir: Path):
        self.s, self.cache_dir = settings, cache_dir
        self.cgroup_problem = cgroup_status()
        self.drop_method = "none"
        self.runs: list[Run] = []

    def run(self, label: str, spec: dict, limit: int | None, files: list[str], listed: bool = True,
            timeout_s: float | None = None) -> dict:
        """The child's result for `spec` under `limit` bytes (None: uncapped); `files`: the model and
        store files whose cached pages are dropped when the kernel's drop_caches is refused. `listed`:
        the run is a configuration of the report (not a probe of the overhead search)."""
        gc.collect()  # a model this process loaded stays mapped until its reference cycles are collected,
        # and pages mapped here can be neither dropped nor charged to the child: its peak would miss them
        with open("/proc/self/maps") as f:
            mapped = sorted({line.split()[-1] for line in f if line.split()[-1] in files})
        if mapped:
            raise SystemExit(f"the benchmark process still maps {', '.join(mapped)}: its pages would escape the "
                             "children's memory limits; release the model before running configurations")
        self.drop_method = drop_page_cache(files)
        with tempfile.TemporaryDirectory(prefix="hetinfer-bench-") as tmp:
            out = Path(tmp) / "result.json"
            spec_path = Path(tmp) / "spec.json"
            spec_path.write_text(json.dumps({**spec, "out": str(out), "threads": self.s.threads}))
            use = self.cgroup_problem is None
            res = run_limited([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                              label.split()[0], limit if use else None, timeout_s or self.s.timeout_s, use_cgroup=use)
            if res.returncode == 0 and out.exists():
                result = json.loads(out.read_text())
            else:
                why = ("OOM-killed" if res.oom_kills else "timed out" if res.timed_out
                       else f"exit status {res.returncode}")
                result = {"failed": why, "tok_s": None}
                if listed:
                    print(f"  {label}: {why}\n" + "\n".join("    " + x for x in res.output.strip().splitlines()[-8:]),
                          file=sys.stderr)
        result.update(peak_memory_bytes=res.peak_bytes, memory_limit_bytes=limit if use else None,
                      wall_s=res.seconds)
        if listed:
            self.runs.append(Run(label, result))
        tok, reread = result.get("tok_s"), reread_bytes(result)
        print(f"  {label}: {'-' if tok is None else f'{tok:.2f}'} tok/s over {result.get('tokens', '-')} tokens, "
              f"peak {res.peak_bytes / MiB:.0f} MiB" + (f" of {limit / MiB:.0f} MiB" if limit and use else "")
              + ("" if reread is None else f", {reread / 1e6:.1f} MB re-read") + f" ({res.seconds:.0f} s)",
              file=sys.stderr)
        return result


def median_run(results: list[dict]) -> dict:
    """The run of median speed among `results` (a failed one counts as slowest), with every run's tok/s in
    `tok_s_rounds`."""
    speeds = [r.get("tok_s") for r in results]
    ranked = sorted(results, key=lambda r: r.get("tok_s") or -1.0)
    return {**ranked[(len(ranked) - 1) // 2], "tok_s_rounds": speeds}


def peak_overhead(result: dict) -> int:
    """An engine's fixed memory by the first rule: its uncapped peak minus the model bytes it held."""
    if result.get("failed"):
        raise SystemExit(f"the uncapped reference run failed ({result['failed']}), so no limits can be set")
    if result["peak_memory_bytes"] < result["model_bytes_held"]:
        raise SystemExit(f"an uncapped run peaked at {result['peak_memory_bytes'] / MiB:.0f} MiB, below the "
                         f"{result['model_bytes_held'] / MiB:.0f} MiB of model it held: its pages were charged to "
                         "another cgroup (mapped by another process?), so no limit can be derived from it")
    return result["peak_memory_bytes"] - result["model_bytes_held"]


def reread_bytes(result: dict) -> int | None:
    """Bytes a run's decode read from storage beyond its own flash reads (the offloading engine's records and
    spans, as its reader counted them): pages its limit evicted that it needed again. None for a failed run, where
    not counted, or where its flash reads go through the page cache (`fadvise`: which reached the disk is unknown).
    A stream counts its read-ahead as issued, so its own reads can exceed the disk's count by a span or two at
    the ends of the decode: the difference is taken as no re-read at all."""
    if (not result.get("tok_s") or result.get("decode_read_bytes") is None
            or result.get("reader_method", "o_direct") != "o_direct"):
        return None
    own = result.get("offload", {}).get("flash_bytes_per_token", 0.0) * result.get("tokens", 0)
    return max(0, int(result["decode_read_bytes"] - own))


def overhead(runner: Runner, label: str, spec: dict, files: list[str], uncapped: dict, tokens: int,
             lone_read_bytes_per_s: float) -> int:
    """An engine's fixed memory as a limit sees it: the least limit under which `spec` (the configuration that
    will run limited; `tokens` decoded) fits twice, minus the model bytes the `uncapped` run held. Found by
    bisection (to 2% of the uncapped peak or 4 MiB), then run again, a step higher whenever a run does not fit
    (at most CONFIRM_RUNS more runs): near the edge one run re-reads nothing and the next gigabytes (the
    kernel's reclaim picks different pages), and a limit at that edge would leave an engine thrashing in the
    report. Unlike the uncapped peak it leaves out the pages read while starting and never used again, which
    a limit reclaims for free.

    A limit fits when the decode re-reads (`reread_bytes`) at most what the uncapped one did plus what would
    cost (1 - KEEP) of its decode time were every extra byte a lone small read (`lone_read_bytes_per_s`, the
    flash curve's smallest read, one in flight): a limit that is too small makes the engine read its evicted
    pages back, and those reads, unlike its speed, do not move with the machine's other load. Where the kernel
    does not count a process's reads, a limit fits when the decode keeps KEEP of the uncapped speed."""
    first = peak_overhead(uncapped)
    if runner.cgroup_problem:  # no limits to search with
        return first
    held, need = uncapped["model_bytes_held"], KEEP * uncapped["tok_s"]
    base = reread_bytes(uncapped)
    slack = (1 - KEEP) * tokens / uncapped["tok_s"] * lone_read_bytes_per_s
    timeout = 30 + 4 * uncapped["wall_s"]  # a run thrashing its pages is as bad as one that fails

    def fits(at: int, again: bool = False) -> bool:
        r = runner.run(f"{label} at {at / MiB:.0f} MiB (overhead search{', again' if again else ''})",
                       {**spec, "tokens": tokens}, at, files, listed=False, timeout_s=timeout)
        if not r.get("tok_s"):
            return False
        reread = reread_bytes(r)
        if base is None or reread is None:
            return r["tok_s"] >= need
        return reread <= base + slack

    lo, hi = held, uncapped["peak_memory_bytes"]  # lo: no room for the runtime at all; hi: fits, uncapped
    step = max(4 * MiB, hi // 50)
    while hi - lo > step:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    fitted = 1  # runs that fitted at `hi`: the bisection's answer fitted once (or is the uncapped peak)
    for _ in range(CONFIRM_RUNS):
        if fitted == 2 or hi >= uncapped["peak_memory_bytes"]:
            break
        if fits(hi, again=fitted > 0):
            fitted += 1
        else:
            hi, fitted = hi + step, 0
    rule = "re-reads" if base is not None else "speed"
    print(f"  {label}: overhead {(hi - held) / MiB:.0f} MiB by {rule} (uncapped peak less model bytes: "
          f"{first / MiB:.0f} MiB)", file=sys.stderr)
    return hi - held


def lone_read_rate(plan_dir: Path) -> float:
    """bytes/s of the smallest read with one in flight, on the flash curve `plan_dir`'s plan was made with: what
    a page fault costs at worst (`overhead`)."""
    from hetinfer.placement import load_plan

    flash = load_plan(plan_dir).manifest["hardware"]["flash"]
    return float(flash["bytes_per_s"][0][flash["concurrency"].index(min(flash["concurrency"]))])


def prompt_ids(tokenizer, n: int) -> list[int]:
    from hetinfer.data import parse_source, read_text

    ids = tokenizer.encode(read_text(parse_source(f"{DATA}[0.7:]")))
    return ids[:n]


def disk_throughput(flash_dir: Path, runs: list[dict]) -> dict:
    """bytes/s at the best of 1-64 reads in flight for each read size (power-of-two bucket) the runs
    used, from the flash probe measured now on `flash_dir`."""
    from hetinfer.placement.probe import probe_flash

    sizes = sorted({int(k) for r in runs for k in r.get("read_sizes", {})})
    if not sizes:
        return {}
    curve = probe_flash(flash_dir, read_sizes=tuple(sizes), concurrency=(1, 4, 16, 64))
    return {size: max(row) for size, row in zip(curve["read_sizes"], curve["bytes_per_s"])}


def io_seconds(run: dict, throughput: dict) -> float:
    """Seconds per token the run's ideal flash bytes take at the disk's best throughput for the read
    sizes it used (the reads' bytes-weighted harmonic mean over the buckets)."""
    ideal = run.get("offload", {}).get("ideal_flash_bytes_per_token", 0.0)
    sizes = {int(k): v for k, v in run.get("read_sizes", {}).items()}
    if ideal == 0 or not sizes:
        return 0.0
    nbytes = sum(size * n for size, n in sizes.items())
    seconds = sum(size * n / throughput[size] for size, n in sizes.items())
    return ideal * seconds / nbytes


def record(model: str, budget: int, regime: str, runs: dict, bound_run: dict, throughput: dict,
           het_overhead: int, llama_overhead: int, extra: dict) -> dict:
    """One JSON record: the offloaded run of `regime` beside the baselines at the same budget."""
    off = runs["offloaded"]
    stats = off.get("offload", {})
    compute_s = 1.0 / bound_run["tok_s"] if bound_run.get("tok_s") else None
    io_s = io_seconds(off, throughput)
    bound = 1.0 / max(compute_s, io_s) if compute_s else None
    tok = lambda name: runs[name].get("tok_s")  # noqa: E731
    return {
        "model": model, "ram_budget_bytes": budget, "overhead_bytes": het_overhead,
        "llamacpp_overhead_bytes": llama_overhead, "regime": regime,
        "ffn_density": stats.get("ffn_density"), "tok_s": tok("offloaded"),
        "naive_tok_s": tok("naive"), "layer_cache_tok_s": tok("layer_cache"), "page_cache_tok_s": tok("page_cache"),
        "llamacpp_limited_tok_s": tok("llamacpp_limited"), "dense_ram_tok_s": tok("dense_ram"),
        "llamacpp_ram_tok_s": tok("llamacpp_ram"), "bound_tok_s": bound, "bound_compute_s_per_token": compute_s,
        "bound_io_s_per_token": io_s, "flash_bytes_per_token": stats.get("flash_bytes_per_token"),
        "ideal_flash_bytes_per_token": stats.get("ideal_flash_bytes_per_token"),
        "cache_hit_rate": stats.get("cache_hit_rate"), "io_wait_share": stats.get("io_wait_share"),
        "peak_memory_bytes": off["peak_memory_bytes"], "memory_limit_bytes": off["memory_limit_bytes"],
        "top1_agree": off.get("top1_agree"),
        "runs": {name: {**{k: r.get(k) for k in ("tok_s", "tok_s_rounds", "tokens", "prompt_tokens", "prefill_tok_s",
                                                 "peak_memory_bytes", "memory_limit_bytes", "failed", "top1_agree")},
                        "reread_bytes": reread_bytes(r)}
                 for name, r in runs.items()},
        **extra,
    }


# ------------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------------


def smollm2(runner: Runner) -> list[dict]:
    from hetinfer.loader import default_model_path, load_model
    from hetinfer.placement import load_plan
    from hetinfer.placement.cost import flash_io_bytes

    s = runner.s
    path = default_model_path()
    model = load_model(path)
    cfg = model.config
    cache = runner.cache_dir / s.artefacts
    predictors = smollm2_predictors(cache, path, s)
    budgets = {(regime, share): model_budget(model, predictors[regime], share) for regime in REGIMES for share in SHARES}
    deps = smollm2_deployments(cache, path, predictors, budgets, s.replan)
    prompt = prompt_ids(model.tokenizer, s.prompt_tokens)
    # the layer cache's bytes for whole layers: no predictors, and the two pools its flash layers stream through
    layer_cache_dense = model_budget(model, None, 0) + flash_io_bytes(0, streamed=True)
    del model  # its file stays mapped while it lives, and mapped pages escape the children's limits
    files = lambda key: [path, store_path(deps[key][0])]  # noqa: E731
    base = {"model": path, "ctx": CTX, "prompt": prompt, "config_dict": cfg.to_dict()}
    het = lambda key, **kw: {**base, "engine": "hetinfer", "config": "offload", "deploy": str(deps[key][0]),  # noqa: E731
                             "resident": "plan", "capacity": None, "select": "plan", "direct": None,
                             "tokens": s.tokens, **kw}
    llama = lambda n, repack=False: {**base, "engine": "llama.cpp", "tokens": n, "forced": forced,  # noqa: E731
                                     "repack": repack}

    dense_ram = runner.run("SmolLM2 dense RAM (hetinfer)", {**base, "engine": "hetinfer", "config": "dense",
                                                             "tokens": s.tokens, "forced": None}, None, [path])
    forced = dense_ram.get("generated")
    llama_ram = runner.run("SmolLM2 llama.cpp RAM", llama(s.tokens, repack=True), None, [path])
    llama_mapped = runner.run("SmolLM2 llama.cpp mmap uncapped", llama(s.tokens), None, [path])
    all_ram = lambda regime: het((regime, SHARES[-1]), resident="ram", capacity=0, forced=forced)  # noqa: E731
    bounds = {regime: runner.run(f"SmolLM2 {regime} all-RAM (bound)", all_ram(regime), None, files((regime, SHARES[-1])))
              for regime in REGIMES}
    # the limited configurations are the offloading engine, so its offloaded run (reader, stream and their
    # threads, the sparse kernels) at the larger quality budget sets hetinfer's overhead
    key = ("quality", SHARES[-1])
    lone = lone_read_rate(deps[key][0] / "plan")
    offloaded = runner.run("SmolLM2 50% quality offloaded uncapped", het(key, forced=forced), None, files(key))
    het_over = overhead(runner, "SmolLM2 50% quality offloaded", het(key, forced=forced), files(key), offloaded,
                        s.tokens, lone)
    llama_over = overhead(runner, "SmolLM2 llama.cpp mmap", llama(s.tokens), [path], llama_mapped, s.tokens, lone)
    first_rule = {"overhead_peak_bytes": peak_overhead(offloaded),
                  "llamacpp_overhead_peak_bytes": peak_overhead(llama_mapped)}
    smallest = min(budgets, key=budgets.get)
    layer_cache = {key: layer_cache_resident(cfg, store_record_bytes(deps[key][0]), budget - layer_cache_dense)
                   for key, budget in budgets.items()}
    # the configurations within reach of the offloaded one run `rounds` times, in turns, and count by their median
    rounds: dict = {}
    for i in range(s.rounds):
        tag = f" (round {i + 1})" if s.rounds > 1 else ""
        rounds.setdefault("naive", []).append(runner.run(
            f"SmolLM2 naive streaming{tag}", het(smallest, resident="flash", capacity=0, select="every",
                                                 tokens=s.slow_tokens, forced=forced),
            het_over + budgets[smallest], files(smallest)))
        for key, budget in budgets.items():
            name = f"SmolLM2 {key[1]:.0%} {key[0]}"
            rounds.setdefault((key, "offloaded"), []).append(
                runner.run(f"{name} offloaded{tag}", het(key, forced=forced), het_over + budget, files(key)))
            rounds.setdefault((key, "layer_cache"), []).append(runner.run(
                f"{name} layer cache{tag}", het(key, resident=layer_cache[key], capacity=0, select="every",
                                                tokens=s.slow_tokens, forced=forced), het_over + budget, files(key)))
    naive = median_run(rounds["naive"])
    all_runs = {}
    for key, budget in budgets.items():
        name = f"SmolLM2 {key[1]:.0%} {key[0]}"
        runs = {"naive": naive, "dense_ram": dense_ram, "llamacpp_ram": llama_ram,
                "offloaded": median_run(rounds[key, "offloaded"]), "layer_cache": median_run(rounds[key, "layer_cache"])}
        runs["page_cache"] = runner.run(f"{name} page cache", het(key, capacity=0, direct=False, forced=forced),
                                        het_over + budget, files(key))
        runs["llamacpp_limited"] = runner.run(f"{name} llama.cpp mmap", llama(s.slow_tokens), llama_over + budget, [path])
        all_runs[key] = runs
    throughput = disk_throughput(cache / "flash", [r["offloaded"] for r in all_runs.values()])
    records = []
    for (regime, share), runs in all_runs.items():
        plan = load_plan(deps[(regime, share)][0] / "plan")
        extra = {"budget": f"dense + KV + {share:.0%} of FFN", "window": deps[(regime, share)][1],
                 "predicted_tok_s": plan.manifest["predicted"]["tok_s"],
                 "disk_bytes_per_s": {str(k): v for k, v in throughput.items()},
                 "note": "measures the I/O path, not quality" if regime == "high_sparsity" else "", **first_rule}
        records.append(record("SmolLM2-135M-Instruct Q4_1", budgets[(regime, share)], regime, runs, bounds[regime],
                              throughput, het_over, llama_over, extra))
    return records


def model_budget(model, predictors, ffn_share: float) -> int:
    """Model-byte budget: the dense parts as `hetinfer place` counts them (embeddings, attention, norms,
    the predictors, the KV cache at CTX, scratch) plus `ffn_share` of the FFN neurons' bytes (as the
    store and the RAM tier hold them: gate row, up row, neuron-major down column)."""
    from hetinfer.placement.cost import place_dense, predictor_sizes, weight_sizes
    from hetinfer.placement.hardware import Hardware, RamTier

    sizes = weight_sizes(model.config, model.weights, CTX, predictor_sizes(predictors) if predictors else 0, KV)
    dense = place_dense(sizes, Hardware(ram=RamTier(capacity_bytes=1 << 62, bytes_per_s=1.0))).ram_bytes
    return dense + int(ffn_share * model.config.n_ff * int(sizes.neuron_bytes.sum()))


def smollm2_predictors(cache: Path, model_path: str, s: Settings) -> dict:
    """{regime: Predictors}: one profile of the first 70% of valid.txt, then the default predictors
    (quality) and predictors calibrated to --density 0.15 (high_sparsity), each made once."""
    from hetinfer.profiler.artifact import load_profile
    from hetinfer.profiler.predictors import load_predictors

    common = ["-m", model_path, "-t", str(s.threads), "-q"]
    profile = cache / "profile"
    if not _loads(load_profile, profile):
        _hetinfer(["profile", *common, "--data", f"{DATA}[:0.7]", "--tokens", str(s.profile_tokens), *s.profile_args,
                   "-o", str(profile)])
    paths = {"quality": cache / "predictors", "high_sparsity": cache / f"predictors-density{SPARSE_DENSITY}"}
    for regime, path in paths.items():
        if not _loads(load_predictors, path):
            density = ["--density", str(SPARSE_DENSITY)] if regime == "high_sparsity" else []
            _hetinfer(["train-predictors", *common, "--profile", str(profile), *density, *s.predictor_args,
                       "-o", str(path)])
    return {regime: load_predictors(str(path)) for regime, path in paths.items()}


def smollm2_deployments(cache: Path, model_path: str, predictors: dict, budgets: dict, replan: bool) -> dict:
    """{(regime, share): (deployment dir, window)}: `hetinfer prepare --ram BUDGET --profile --predictors`,
    which picks the window-cache length its cost model predicts fastest at that budget. Made in a child
    process: prepare's steps map the model file, and a page this process maps escapes the runs' limits.
    `replan`: the plans are made again, from probes of the machine as it is now (a fresh probe cache)."""
    with tempfile.TemporaryDirectory(prefix="hetinfer-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "deployments.json"
        spec.write_text(json.dumps({"out": str(out), "prepare": {
            "cache": str(cache), "model_path": model_path, "replan": replan,
            "predictors": {regime: p.path for regime, p in predictors.items()},
            "budgets": [[regime, share, budget] for (regime, share), budget in budgets.items()]}}))
        env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "probes")} if replan else None
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)], check=True, env=env)
        return {(regime, share): (Path(path), window) for regime, share, path, window in json.loads(out.read_text())}


def prepare_deployments(cache: str, model_path: str, predictors: dict, budgets: list, replan: bool) -> dict:
    """`smollm2_deployments`' work, in the child: predictors {regime: dir}, budgets [[regime, share, bytes]];
    `replan`: each deployment's plan removed first, and the stores no deployment uses afterwards."""
    from hetinfer.offload.deploy import MANIFEST, PrepareOptions, prepare

    flash = Path(cache) / "flash"
    flash.mkdir(parents=True, exist_ok=True)
    deps = {}
    for regime, share, budget in budgets:
        out = Path(cache) / f"{regime}-{share:.0%}".rstrip("%")
        if replan:
            shutil.rmtree(out / "plan", ignore_errors=True)
        prepare(PrepareOptions(output=str(out), flash_dir=str(flash), model=model_path, ram=budget, ctx=CTX, kv=KV,
                               profile=str(Path(cache) / "profile"), predictors=predictors[regime]))
        deps[(regime, share)] = (out, json.loads((out / MANIFEST).read_text())["window"])
    if replan:
        used = {Path(store_path(out)).parent.resolve() for out, _ in deps.values()}
        for stale in flash.glob("*.store"):
            if stale.resolve() not in used:
                shutil.rmtree(stale)
    return deps


def _loads(load, path: Path) -> bool:
    """Whether the artefact at `path` exists and loads (else it is made, or remade)."""
    from hetinfer.errors import ArtifactError

    try:
        load(str(path))
        return True
    except ArtifactError:
        return False


def _hetinfer(argv: list[str]) -> None:
    """Run `hetinfer ARGV` in a child process: the command maps the model, and a page this process still maps
    when the configurations run escapes their limits (`Runner.run` refuses to go on)."""
    print(f"hetinfer {' '.join(argv)}", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    subprocess.run([sys.executable, "-c", "import sys; from hetinfer.cli import main; sys.exit(main(sys.argv[1:]))",
                    *argv], stdout=sys.stderr, env=env, check=True)  # its report to stderr: stdout is --json's


def store_path(dep: Path) -> str:
    """The records file of deployment `dep`, for dropping its cached pages."""
    from hetinfer.offload.deploy import MANIFEST

    m = json.loads((dep / MANIFEST).read_text())
    store = m["store"] if os.path.isabs(m["store"]) else str(dep / m["store"])
    return str(Path(store) / "neurons.bin")


def store_record_bytes(dep: Path) -> int:
    store = Path(store_path(dep)).parent
    return int(json.loads((store / "store.json").read_text())["record"]["bytes"])


def layer_cache_resident(cfg, record_bytes: int, ffn_budget: int) -> list[int]:
    """Resident neurons per layer for the layer cache: every neuron of the first layers whose
    records fit in `ffn_budget` bytes, none of the others."""
    whole = max(0, ffn_budget) // (cfg.n_ff * record_bytes)
    return [cfg.n_ff if layer < whole else 0 for layer in range(cfg.n_layers)]


# ------------------------------------------------------------------------------------------------
# the 7B scale run (synthetic)
# ------------------------------------------------------------------------------------------------


def scale_artefacts(cache: Path) -> tuple:
    """(GGUF path, model, trace, plan dir, store path, dense bytes): the 7B run's file, trace, plan and
    store, each made once and reused."""
    from hetinfer.loader import default_model_path, load_model
    from hetinfer.offload.trace import Trace, TraceConfig

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "llama2-7b-shape-random-q4_0.gguf"
    if not path.exists():
        print(f"7B: writing {path} (random Q4_0 weights, once)", file=sys.stderr)
        write_random_gguf(path, default_model_path())
    model = load_model(str(path))
    dense = model_budget(model, None, 0)
    trace = Trace(TraceConfig(model.config.n_layers, model.config.n_ff))
    flash = cache / "flash"
    flash.mkdir(exist_ok=True)
    plan_dir = trace_plan(path, trace, dense + BIG_RAM_EXTRA, flash, cache)
    return path, model, trace, plan_dir, trace_store(model, plan_dir, flash), dense


def scale_run(runner: Runner) -> list[dict]:
    s = runner.s
    path, model, trace, plan_dir, store, dense = scale_artefacts(runner.cache_dir / "7b")
    cfg, trace_cfg, budget, flash = model.config, trace.cfg, dense + BIG_RAM_EXTRA, Path(store).parent
    prompt = prompt_ids(model.tokenizer, s.big_prompt_tokens)
    files = [str(path), str(Path(store) / "neurons.bin")]
    base = {"model": str(path), "ctx": CTX, "prompt": prompt, "config_dict": cfg.to_dict()}
    het = lambda **kw: {**base, "engine": "hetinfer", "config": "offload", "plan": str(plan_dir), "store": store,  # noqa: E731
                        "trace": asdict(trace_cfg), "resident": "plan", "capacity": None, "select": "trace",
                        "direct": None, "tokens": s.big_tokens, **kw}
    print(f"7B: budget {budget / MiB:.0f} MiB (dense parts + KV cache {dense / MiB:.0f} MiB + 1 GiB)", file=sys.stderr)
    del model
    runs = {}
    runs["dense_ram"] = runner.run("7B dense RAM (hetinfer)", {**base, "engine": "hetinfer", "config": "dense",
                                                               "tokens": s.big_tokens, "forced": None}, None, files)
    forced = runs["dense_ram"].get("generated")
    llama = lambda n, repack=False: {**base, "engine": "llama.cpp", "tokens": n, "forced": forced,  # noqa: E731
                                     "repack": repack}
    runs["llamacpp_ram"] = runner.run("7B llama.cpp RAM", llama(s.big_tokens, repack=True), None, files)
    llama_mapped = runner.run("7B llama.cpp mmap uncapped", llama(s.big_slow_tokens), None, files)
    all_ram = het(resident="ram", capacity=0, forced=forced)
    bound_run = runner.run("7B trace all-RAM (bound)", all_ram, None, files)
    lone = lone_read_rate(plan_dir)
    offloaded = runner.run("7B trace offloaded uncapped", het(forced=forced), None, files)
    het_over = overhead(runner, "7B trace offloaded", het(forced=forced), files, offloaded, s.big_search_tokens, lone)
    llama_over = overhead(runner, "7B llama.cpp mmap", llama(s.big_slow_tokens), files, llama_mapped, s.big_slow_tokens,
                          lone)
    runs["offloaded"] = runner.run("7B trace offloaded", het(forced=forced), het_over + budget, files)
    runs["page_cache"] = runner.run("7B trace page cache", het(capacity=0, direct=False, forced=forced),
                                    het_over + budget, files)
    runs["naive"] = runner.run("7B naive streaming", het(resident="flash", capacity=0, select="every",
                                                         tokens=s.big_slow_tokens, forced=forced),
                               het_over + budget, files)
    rb = int(json.loads((Path(store) / "store.json").read_text())["record"]["bytes"])
    runs["layer_cache"] = runner.run("7B layer cache", het(resident=layer_cache_resident(cfg, rb, budget - dense),
                                                           capacity=0, select="every", tokens=s.big_slow_tokens,
                                                           forced=forced), het_over + budget, files)
    runs["llamacpp_limited"] = runner.run("7B llama.cpp mmap", llama(s.big_slow_tokens), llama_over + budget, files)
    throughput = disk_throughput(flash, [runs["offloaded"]])
    from hetinfer.placement import load_plan

    extra = {"budget": "dense + KV + 1 GiB", "window": WINDOW, "predicted_tok_s": load_plan(plan_dir).manifest["predicted"]["tok_s"],
             "disk_bytes_per_s": {str(k): v for k, v in throughput.items()},
             "overhead_peak_bytes": peak_overhead(offloaded), "llamacpp_overhead_peak_bytes": peak_overhead(llama_mapped),
             "note": (f"SYNTHETIC: random Q4_0 weights, active sets from offload.trace (density {trace_cfg.density}, "
                      f"{trace_cfg.hot_fraction:.0%} of neurons serve {trace_cfg.hot_share:.0%} of activations, "
                      f"reuse rho {trace_cfg.stay}); the plan from `place --power-law {trace.exponent:.4f}`")}
    return [record("llama2-7b-shape random Q4_0", budget, "high_sparsity (trace)", runs, bound_run, throughput,
                   het_over, llama_over, extra)]


def write_random_gguf(path: Path, tokenizer_from: str, shape: dict = BIG_SHAPE, seed: int = 0) -> None:
    """A Llama-2-7B-shaped GGUF of random Q4_0 weights (norms 1), with the tokenizer section of
    `tokenizer_from` (SmolLM2's: vocab 49152); written tensor by tensor to a temp file, then renamed."""
    import gguf

    Q4_0, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    src = gguf.GGUFReader(tokenizer_from)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    L, d, f, heads = (shape[k] for k in ("n_layers", "d_model", "n_ff", "n_heads"))
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(path.stem)
    w.add_block_count(L)
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)
    tensors = [("token_embd.weight", vocab, d), ("output_norm.weight", 0, d), ("output.weight", vocab, d)]
    for i in range(L):
        tensors += [(f"blk.{i}.attn_norm.weight", 0, d), (f"blk.{i}.ffn_norm.weight", 0, d)]
        tensors += [(f"blk.{i}.attn_{k}.weight", d, d) for k in ("q", "k", "v", "output")]
        tensors += [(f"blk.{i}.ffn_gate.weight", f, d), (f"blk.{i}.ffn_up.weight", f, d), (f"blk.{i}.ffn_down.weight", d, f)]
    for name, rows, cols in tensors:
        if rows:
            w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18, raw_dtype=Q4_0)
        else:
            w.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4, raw_dtype=F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, rows, cols in tensors:
        if not rows:
            w.write_tensor_data(np.ones(cols, np.float32))
            continue
        blocks = np.frombuffer(rng.bytes(rows * cols // 32 * 18), np.uint8).reshape(rows, cols // 32, 18).copy()
        # scale d: weights d * (q - 8) with q uniform on 0..15 have std ~4.6 d; 1/sqrt(cols) keeps activations O(1)
        blocks[:, :, :2] = np.frombuffer(np.float16(1 / (4.6 * np.sqrt(cols))).tobytes(), np.uint8)
        w.write_tensor_data(blocks.reshape(rows, -1))
    w.close()
    os.replace(tmp, path)


def trace_plan(model_path: Path, trace, budget: int, flash: Path, cache: Path) -> Path:
    """`hetinfer place --power-law` with the trace's exponent and density (made once per budget, exponent and the
    disk's read curve, which place probes once per device and caches)."""
    from hetinfer.errors import ArtifactError
    from hetinfer.placement import load_plan
    from hetinfer.placement.probe import flash_tier

    disk = flash_tier(str(flash)).bytes_per_s
    key = hashlib.sha256(f"{budget} {trace.exponent!r} {trace.cfg.density} {CTX} {KV} {WINDOW} {disk}".encode()).hexdigest()[:12]
    out = cache / f"plan-{key}"
    try:
        load_plan(out)
        return out
    except (ArtifactError, OSError):
        pass
    argv = ["place", "-m", str(model_path), "--power-law", repr(trace.exponent), "--sparsity", repr(1.0 - trace.cfg.density),
            "--ram", str(budget), "--gpu-mem", "0", "--flash-dir", str(flash), "--ctx", str(CTX), "--kv", KV, "--window", str(WINDOW),
            "-o", str(out)]
    _hetinfer(argv)
    return out


def trace_store(model, plan_dir: Path, flash: Path) -> str:
    """The store of `plan_dir`'s tiers, neurons in rank order (hottest first), made once."""
    from hetinfer.errors import ArtifactError
    from hetinfer.offload.store import build_store, open_store
    from hetinfer.placement import load_plan

    plan = load_plan(plan_dir)
    path = flash / f"7b.{hashlib.sha256(plan.tiers.tobytes()).hexdigest()[:16]}.store"
    try:
        open_store(path, model)
    except ArtifactError:
        print(f"7B: writing the store {path}", file=sys.stderr)
        build_store(model, path, plan.tiers)
    return str(path)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def runs_table(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        r, o = run.result, run.result.get("offload", {})
        f = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
        rows.append([run.label, r.get("failed") or f(r.get("tokens"), "{}"), f(r.get("prefill_tok_s"), "{:.1f}"),
                     f(r.get("tok_s"), "{:.2f}"), f(o.get("ffn_density"), "{:.1%}"),
                     f(o.get("flash_bytes_per_token") and o["flash_bytes_per_token"] / MiB, "{:.2f}"),
                     f(o.get("cache_hit_rate"), "{:.1%}"), f(o.get("io_wait_share"), "{:.0%}"),
                     f(r["peak_memory_bytes"] / MiB, "{:.0f}"), f(r["memory_limit_bytes"] and r["memory_limit_bytes"] / MiB, "{:.0f}"),
                     f(reread_bytes(r), "{:,}"), f(r.get("top1_agree"), "{:.0%}")])
    return table(["configuration", "tokens", "prefill tok/s", "decode tok/s", "FFN density", "flash MiB/token",
                  "hit rate", "I/O wait", "peak MiB", "limit MiB", "re-read bytes", "top-1 = ref"], rows)


def records_table(records: list[dict]) -> str:
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)  # noqa: E731
    ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}x"  # noqa: E731
    rows = []
    for r in records:
        rows.append([r["model"], f(r["ram_budget_bytes"] / MiB, "{:.0f}"), r["regime"], r["window"], f(r["tok_s"]),
                     ratio(r["tok_s"], r["naive_tok_s"]), ratio(r["tok_s"], r["layer_cache_tok_s"]),
                     ratio(r["tok_s"], r["page_cache_tok_s"]), ratio(r["tok_s"], r["llamacpp_limited_tok_s"]),
                     f(r["dense_ram_tok_s"]), f(r["bound_tok_s"]), ratio(r["tok_s"], r["bound_tok_s"]),
                     ratio(r["flash_bytes_per_token"], r["ideal_flash_bytes_per_token"]), f(r["predicted_tok_s"])])
    return table(["model", "budget MiB", "regime", "window", "tok/s", "vs naive", "vs layer cache", "vs page cache",
                  "vs llama.cpp mmap", "dense RAM tok/s", "bound tok/s", "of bound", "flash / ideal bytes",
                  "predicted tok/s"], rows)


def targets(records: list[dict], runs: list[Run]) -> list[str]:
    """The issue's targets, each with the measured value and whether it is met."""
    out = []
    check = lambda ok, text: out.append(f"[{'x' if ok else ' '}] {text}")  # noqa: E731
    over = [r.label for r in runs if r.result["memory_limit_bytes"] and r.result["peak_memory_bytes"] > r.result["memory_limit_bytes"]]
    failed = [f"{r.label} ({r.result['failed']})" for r in runs if r.result.get("failed")]
    check(not over and not failed, "every configuration: peak <= limit, none failed"
          + (f"; over: {', '.join(over)}" if over else "") + (f"; failed: {', '.join(failed)}" if failed else ""))
    x = lambda a, b: a / b if a and b else 0.0  # noqa: E731
    for r in records:
        name = f"{r['model']}, {r['budget']}, {r['regime']}"
        for base in ("layer_cache", "page_cache"):
            check(x(r["tok_s"], r[f"{base}_tok_s"]) >= 1, f"{name}: not slower than {base.replace('_', ' ')} "
                  f"({x(r['tok_s'], r[f'{base}_tok_s']):.2f}x)")
        check(x(r["tok_s"], r["bound_tok_s"]) >= 0.6, f"{name}: >= 60% of bound ({x(r['tok_s'], r['bound_tok_s']):.0%})")
        if r["predicted_tok_s"] and r["model"].startswith("SmolLM2"):
            err = x(r["predicted_tok_s"], r["tok_s"]) - 1
            check(abs(err) <= 0.25, f"{name}: cost model within 25% ({r['predicted_tok_s']:.1f} predicted, {err:+.0%})")
        if r["model"].startswith("SmolLM2") and r["regime"] == "quality":
            need = 1.8 if "50%" in r["budget"] else 1.2
            check(x(r["tok_s"], r["naive_tok_s"]) >= need, f"{name}: >= {need}x naive ({x(r['tok_s'], r['naive_tok_s']):.2f}x)")
            check(x(r["tok_s"], r["llamacpp_limited_tok_s"]) > 1,
                  f"{name}: faster than llama.cpp mmap ({x(r['tok_s'], r['llamacpp_limited_tok_s']):.2f}x)")
        if "7b" in r["model"]:
            for base, need in (("naive", 8), ("layer_cache", 4), ("llamacpp_limited", 4)):
                check(x(r["tok_s"], r[f"{base}_tok_s"]) >= need,
                      f"{name}: >= {need}x {base.replace('_', ' ')} ({x(r['tok_s'], r[f'{base}_tok_s']):.2f}x)")
            ratio = x(r["flash_bytes_per_token"], r["ideal_flash_bytes_per_token"])
            check(0 < ratio <= 1.3, f"{name}: flash bytes <= 1.3x ideal ({ratio:.2f}x)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer tokens everywhere (development; not for figures)")
    p.add_argument("--json", action="store_true", help="print the records as JSON instead of tables")
    p.add_argument("--only", choices=("smollm2", "7b"), help="run one model's part only")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hetinfer" / "bench-offload",
                   help="where artefacts are kept between runs (stores need a real disk: O_DIRECT)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args.child)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the benchmark's prompt and calibration text)", file=sys.stderr)
        return
    settings = QUICK if args.quick else Settings()
    settings.threads = args.threads
    t0 = time.perf_counter()
    from hetinfer import kernels

    kernels.warmup()  # compiled here if the cache is cold, so every child only loads them
    runner = Runner(settings, args.cache_dir)
    print(f"machine: {machine()}", file=sys.stderr)
    if runner.cgroup_problem:
        print(f"NO MEMORY LIMITS: {runner.cgroup_problem}; runs are unlimited and peaks are max RSS", file=sys.stderr)
    records = smollm2(runner) if args.only != "7b" else []
    if args.only != "smollm2":
        records += scale_run(runner)
    elapsed = time.perf_counter() - t0
    if args.json:
        print(json.dumps(records, indent=1))
        return
    print(f"machine: {machine()}")
    print(f"llama.cpp: {llama_cpp_build()}")
    limits = (f"cgroup v1 memory limits (overhead + budget), page cache dropped before each run ({runner.drop_method})"
              if runner.cgroup_problem is None else f"NO MEMORY LIMITS ({runner.cgroup_problem})")
    print(f"{limits}; {settings.threads} threads; greedy on held-out WikiText-2; {elapsed / 60:.1f} min in all")
    print(runs_table(runner.runs))
    print("peak = limit: the page cache (the mapped model, buffered reads) filled what the limit left; cgroup v1 "
          "counts it and the kernel reclaims it before anything is killed")
    print("re-read bytes: read from storage while decoding beyond the run's own flash reads, pages its limit evicted "
          "that it needed again (-: its flash reads go through the page cache, or the kernel counts no reads)")
    print()
    print(records_table(records))
    print()
    for r in records:
        print(f"{r['model']} {r['budget']} {r['regime']}: overhead hetinfer {r['overhead_bytes'] / MiB:.0f} MiB "
              f"({r['overhead_peak_bytes'] / MiB:.0f} by uncapped peak), llama.cpp {r['llamacpp_overhead_bytes'] / MiB:.0f} "
              f"MiB ({r['llamacpp_overhead_peak_bytes'] / MiB:.0f}); bound = 1 / max(compute "
              f"{1e3 * (r['bound_compute_s_per_token'] or 0):.1f} ms, I/O {1e3 * r['bound_io_s_per_token']:.1f} ms)"
              + (f"; {r['note']}" if r["note"] else ""))
    print("\ntargets (issue 15):")
    print("\n".join(targets(records, runner.runs)))


if __name__ == "__main__":
    main()
