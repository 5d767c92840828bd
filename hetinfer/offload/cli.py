"""`hetinfer prepare` (model -> deployment) and `hetinfer run DEPLOY` (generate from one).

`hetinfer chat DEPLOY` and `hetinfer serve DEPLOY` take a deployment where they take a model
(`hetinfer.cli.open_session` opens either)."""
from __future__ import annotations

import argparse

from hetinfer.argtypes import SIZE, THREADS, int_in, output_dir, text
from hetinfer.config import DEFAULT_KV, KV_DTYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="profile, train predictors, place and build the flash store of a model in one command",
        description="Prepare a model to run in less memory than it needs: profile its FFN activations, train "
                    "per-layer predictors, place every neuron on RAM or flash within --ram, and write the flash "
                    "store. Steps whose output already exists and is valid are skipped, so an interrupted run "
                    "continues where it stopped. Then: hetinfer run DEPLOY -p ..., hetinfer chat DEPLOY.")
    p.add_argument("-m", "--model", help="GGUF file or Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", type=output_dir, required=True, metavar="DEPLOY",
                   help="deployment directory to write")
    p.add_argument("--flash-dir", required=True, metavar="DIR",
                   help="directory on the disk that serves the flash-tier neurons (the store is written there)")
    p.add_argument("--ram", type=SIZE, metavar="SIZE",
                   help="RAM for model data: dense parts, RAM-tier neurons, the window cache and the KV cache; "
                        "not the runtime's own overhead (Python, torch, numba: see README). Default: what is free now")
    p.add_argument("--gpu-mem", type=SIZE, metavar="SIZE", help="GPU memory for hot neurons (default: none)")
    p.add_argument("--ctx", type=int_in(1), default=4096, help="context the KV cache is sized for (default 4096)")
    p.add_argument("--kv", choices=tuple(KV_DTYPES), default=DEFAULT_KV,
                   help=f"KV cache element type the plan reserves RAM for and the engine uses (default {DEFAULT_KV})")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help="calibration text or chat JSONL for the profile (default: the small set shipped with hetinfer)")
    p.add_argument("--tokens", type=int_in(1), default=100_000, help="calibration tokens for the profile (default 100000)")
    p.add_argument("--profile", metavar="PROFILE", help="use this profile instead of profiling")
    p.add_argument("--predictors", metavar="DIR", help="use these predictors instead of training them")
    p.add_argument("--neurons", choices=("auto", "predicted", "every"), default="auto",
                   help="which FFN neurons a token computes: `predicted` by the predictors, `every` one (no "
                        "predictors: exact output, and their RAM holds neurons instead), or `auto`: plan both "
                        "and keep the one predicted faster (default)")
    p.add_argument("--window", type=int_in(0), default=None,
                   help="tokens a flash neuron stays in the RAM window cache (default: the one of 0, 1, 2, 5 "
                        "whose plan is predicted fastest)")
    p.add_argument("--weights", choices=("native", "f32"), default="native",
                   help="format of the stored neurons: native as in the model file, f32 for the exact float engine")
    p.add_argument("-t", "--threads", type=THREADS, default=None, help="CPU threads (default: all cores available)")
    p.set_defaults(run=cmd_prepare)

    from hetinfer.cli import add_engine_args, add_sampling_args, cmd_generate

    p = subparsers.add_parser("run", help="generate from a deployment made by `hetinfer prepare`")
    p.add_argument("deploy", metavar="DEPLOY", help="deployment directory")
    p.add_argument("-p", "--prompt", type=text, required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message in the chat template")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(run=cmd_generate, model=None)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hetinfer.offload.deploy import PrepareOptions, prepare

    path = prepare(PrepareOptions(
        output=args.output, flash_dir=args.flash_dir, model=args.model, ram=args.ram, gpu_mem=args.gpu_mem,
        ctx=args.ctx, kv=args.kv, data=args.data or [], tokens=args.tokens, profile=args.profile,
        predictors=args.predictors, window=args.window, weights=args.weights, threads=args.threads,
        every_neuron={"auto": None, "predicted": False, "every": True}[args.neurons]))
    print(f"deployment ready: {path.parent}\n  hetinfer run {path.parent} -p \"...\"   or   hetinfer chat {path.parent}")
    return 0
