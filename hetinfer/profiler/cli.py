"""Subcommands of the offline tools: `profile`, `train-predictors` (registered by hetinfer.cli; `eval`,
which runs the engine's FFN modes, is hetinfer.cli's own)."""
from __future__ import annotations

import argparse
import time

from hetinfer.argtypes import SEED, THREADS, IntList, float_in, int_in, output_dir, output_file
from hetinfer.data import DEFAULT_PROFILE_DATA


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file or Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("-t", "--threads", type=THREADS, default=None, help="CPU threads (default: all cores available)")


def _open_model(args: argparse.Namespace):
    import torch

    from hetinfer import kernels
    from hetinfer.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
        kernels.set_threads(args.threads)
    return load_model(args.model)


def _sources(specs: list[str]):
    from hetinfer.data import parse_source

    return [parse_source(s) for s in specs]


def cmd_profile(args: argparse.Namespace) -> int:
    from hetinfer.data import calibration_sequences
    from hetinfer.profiler.collect import ProfileOptions, profile_sequences

    model = _open_model(args)
    sequences, sources = calibration_sequences(_sources(args.data), model.tokenizer, args.tokens, args.seq_len)
    opts = ProfileOptions(samples=args.samples, dtype=args.dtype, seed=args.seed)
    t0 = time.perf_counter()
    profile = profile_sequences(model, sequences, opts, sources, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    profile.manifest["seconds"] = round(seconds, 1)
    profile.save(args.output)
    if args.plot:
        from hetinfer.profiler.plot import plot_profile

        plot_profile(profile, args.plot)
    s = profile.manifest["summary"]
    parts = ", ".join(f"{x['kind']} {x['tokens']}" for x in sources)
    print(f"profiled {profile.tokens} tokens ({parts}) "
          f"in {seconds:.0f} s -> {profile.path}")
    print("achieved sparsity per level: " + ", ".join(f"{k}:{v:.3f}" for k, v in s["achieved_sparsity"].items()))
    print("share of active neuron-tokens held by the 20% most frequently active neurons: "
          + ", ".join(f"{float(k):.0%} sparsity {v:.1%}" for k, v in s["top20_share"].items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hetinfer.profiler.artifact import load_profile
    from hetinfer.profiler.train import TrainOptions, report_table, train_predictors

    model = _open_model(args)
    profile = load_profile(args.profile, model)
    opts = TrainOptions(sparsity=args.sparsity, recall=args.recall, density=args.density, ranks=args.ranks,
                        max_param_ratio=args.max_param_ratio, max_flops_ratio=args.max_flops_ratio,
                        epochs=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    predictors, reports = train_predictors(model, profile, opts, progress=not args.quiet)
    predictors.manifest["seconds"] = round(time.perf_counter() - t0, 1)
    predictors.save(args.output)
    print(report_table(reports))
    print(f"trained in {time.perf_counter() - t0:.0f} s -> {predictors.path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="activation statistics of every FFN neuron on calibration text")
    _model_args(p)
    p.add_argument("--data", nargs="+", default=list(DEFAULT_PROFILE_DATA), metavar="FILE",
                   help="plain text or chat JSONL (MT-Bench `turns` or `messages`); FILE[a:b] takes a fraction, "
                        "e.g. valid.txt[:0.7]; several files share the token budget equally (default: the packaged "
                        "calibration set, the first 80%% of 486 KB of WikiText-2 and the 80 MT-Bench questions)")
    p.add_argument("-o", "--output", type=output_dir, required=True, metavar="PROFILE",
                   help="profile directory to write")
    p.add_argument("--tokens", type=int_in(1), default=100_000, help="calibration tokens (default 100000)")
    p.add_argument("--seq-len", type=int_in(2), default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--samples", type=int_in(64), default=8192,
                   help="tokens whose FFN inputs are stored for predictor training (default 8192; "
                        "n_layers * d_model * 2 bytes each)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="GEMM precision (default bfloat16; float32 is exact and ~5x slower)")
    p.add_argument("--plot", type=output_file, metavar="PNG",
                   help="also draw frequency and sparsity-vs-threshold curves")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("train-predictors", help="per-layer low-rank activation predictors from a profile")
    _model_args(p)
    p.add_argument("--profile", required=True, help="profile directory from `hetinfer profile`")
    p.add_argument("-o", "--output", type=output_dir, required=True, metavar="PREDICTORS",
                   help="predictors directory to write")
    p.add_argument("--sparsity", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=0.5,
                   help="profiled level whose threshold defines an active neuron; 1 - S is the density budget (default 0.5)")
    p.add_argument("--recall", type=float_in(0.0, 1.0, lo_open=True), default=0.95,
                   help="recall of activation mass to calibrate for (default 0.95)")
    p.add_argument("--density", type=float_in(0.0, 1.0, lo_open=True), default=None,
                   help="calibrate each layer to this predicted density instead (then --recall is the rank target)")
    p.add_argument("--ranks", type=IntList(1), default=(16, 32, 64, 128),
                   help="candidate ranks, smallest first (default 16,32,64,128)")
    p.add_argument("--max-param-ratio", type=float_in(0.0, lo_open=True), default=0.15,
                   help="predictor/FFN parameter cap (default 0.15)")
    p.add_argument("--max-flops-ratio", type=float_in(0.0, lo_open=True), default=0.10,
                   help="cap on predictor FLOPs / FFN FLOPs skipped at the density budget (default 0.10)")
    p.add_argument("--epochs", type=int_in(1), default=10, help="training epochs per rank (default 10)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)

