"""`hetinfer` command line: generate, chat, eval, info, plus the subcommands of the other subsystems."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from hetinfer import heap
from hetinfer.argtypes import SEED, THREADS, Parser, float_in, int_in, output_file, text
from hetinfer.atomic import atomic_write_json, check_writable
from hetinfer.config import DEFAULT_KV, KV_DTYPES
from hetinfer.errors import HetinferError

# Modules that contribute subcommands through add_parser(subparsers) -> registers run(args) -> int.
SUBCOMMAND_MODULES: tuple[str, ...] = ("hetinfer.profiler.cli", "hetinfer.placement.cli", "hetinfer.server.cli",
                                       "hetinfer.offload.cli")


def add_model_args(p: argparse.ArgumentParser, session: bool = True) -> None:
    p.add_argument("-m", "--model", help="GGUF file or Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    add_engine_args(p, session)


def add_engine_args(p: argparse.ArgumentParser, session: bool = True) -> None:
    """The flags of the engine that runs a model or a deployment: threads and sparse modes, and for a
    Session (all but eval) its context and weight format."""
    p.add_argument("-t", "--threads", type=THREADS, default=None, help="CPU threads (default: all cores available)")
    if session:
        p.add_argument("--ctx", type=int_in(1), default=None,
                       help="context size in tokens (default 4096, or the context a deployment was prepared for; "
                            "capped at the model's)")
        p.add_argument("--kv", choices=tuple(KV_DTYPES), default=None,
                       help=f"KV-cache element type: f16 holds half the bytes (keys and values rounded to float16, "
                            f"attention still summed in float32), as llama.cpp's default (default {DEFAULT_KV}; "
                            "a deployment's: the one its plan counted)")
        p.add_argument("--weights", choices=("native", "f16", "f32"), default="native",
                       help="weight format the kernels read: native keeps the file's (GGUF block formats stay "
                            "quantized), f16/f32 convert once at load (default native)")
        p.add_argument("--device", metavar="DEVICE",
                       help="where a deployment's GPU-tier neurons run: cuda or cuda:N (default when a CUDA device "
                            "is present), or cpu: the CPU stand-in that runs the GPU side's code on the CPU (for testing)")
    from hetinfer.sparse import add_sparse_args

    add_sparse_args(p)


def add_sampling_args(p: argparse.ArgumentParser, default_temp: float = 0.8) -> None:
    p.add_argument("-n", "--max-tokens", type=int_in(1), default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float_in(0.0), default=default_temp,
                   help=f"sampling temperature, 0 = greedy (default {default_temp})")
    p.add_argument("--top-k", type=int_in(0), default=40,
                   help="sample among the k likeliest tokens, 0 = off (default 40)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus sampling: the likeliest tokens holding this probability, 1 = off (default 0.95)")
    p.add_argument("--min-p", type=float_in(0.0, 1.0, hi_open=True), default=0.05,
                   help="drop tokens less likely than this times the likeliest, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float_in(0.0, lo_open=True), default=1.0,
                   help="divide the logits of the last 64 tokens by this, 1 = off (default 1.0)")
    p.add_argument("--seed", type=SEED, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", type=text, action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="print prompt and generation rates to stderr, and say when -n cut the answer")
    p.add_argument("--stats-json", type=output_file, metavar="PATH",
                   help="write prompt/generation rates and peak RSS as JSON")


def sampling_params(args: argparse.Namespace):
    from hetinfer.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, seed=args.seed, max_tokens=args.max_tokens, stop=list(args.stop),
    )


def open_session(args: argparse.Namespace):
    """A Session for `args.model`, or for `args.deploy` (a deployment from `hetinfer prepare`)."""
    from hetinfer.generate import Session
    from hetinfer.loader import load_model
    from hetinfer.sparse import engine_ffn

    if getattr(args, "stats_json", None):  # before the model loads, not after the text is generated
        check_writable(args.stats_json)
    if args.threads:
        from hetinfer import kernels

        kernels.set_threads(args.threads)
    deploy = getattr(args, "deploy", None)
    if deploy is not None:
        if args.model:
            raise HetinferError(f"give a deployment ({deploy}) or -m MODEL, not both: the deployment names its model")
        return _open_deployment(args, deploy)
    if args.device is not None:
        raise HetinferError(f"--device {args.device} applies to a deployment's GPU tier (hetinfer run/chat/serve DEPLOY "
                            "after `hetinfer prepare --gpu-mem SIZE`); a model given with -m runs on the CPU")
    model = load_model(args.model, weights=args.weights)
    ffn = engine_ffn(model, args.sparsity, args.profile, args.predictors)
    prepare_kernels(getattr(args, "verbose", False), dense_only=ffn is None)
    session = Session(model, n_ctx=args.ctx, ffn=ffn, kv=args.kv or DEFAULT_KV)
    pack_weights(model.transformer, True, getattr(args, "verbose", False))  # sparse modes' prompts read the FFN in full
    heap.freeze()  # the model lives until the command exits
    return session


def _open_deployment(args: argparse.Namespace, path: str):
    from hetinfer.offload import deploy

    if args.predictors or args.profile or args.sparsity not in (None, 0):
        raise HetinferError("a deployment runs its own predictors; --sparsity 0 (every neuron) is the only sparse flag "
                            "it takes")
    dep = deploy.load_deployment(path, weights=None if args.weights == "native" else args.weights)
    prepare_kernels(getattr(args, "verbose", False))
    session = deploy.open_session(dep, n_ctx=args.ctx, every_neuron=args.sparsity == 0, kv=args.kv, device=args.device)
    pack_weights(dep.model.transformer, False, getattr(args, "verbose", False))  # the FFN is the deployment's
    heap.freeze()
    return session


def prepare_kernels(verbose: bool, dense_only: bool = False) -> None:
    """Compile the CPU kernels, or load them from numba's on-disk cache, before the first prompt, so its
    timing is the model's; the first run on a machine compiles for a minute or two, and says so.
    `dense_only`: a dense session loads only the kernels it calls (see `kernels.warmup`)."""
    from hetinfer import kernels

    if kernels.compiled(dense_only):
        seconds = kernels.warmup(dense_only)
    else:
        from tqdm import tqdm

        print("compiling the CPU kernels (once on this machine; up to 2 minutes on 2 cores)...",
              file=sys.stderr, flush=True)
        with tqdm(desc="compile", unit=" step", file=sys.stderr) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            seconds = kernels.warmup(dense_only, progress)
    if verbose:
        print(f"[kernels ready in {seconds:.1f} s]", file=sys.stderr)


def pack_weights(transformer, ffn: bool, verbose: bool) -> None:
    """Pack the weights the dense kernels read in full now (`Transformer.pack`), not during the first prompt:
    a server's first request and the first prompt's reported rate are then the model's own."""
    t0 = time.perf_counter()
    nbytes = transformer.pack(ffn)
    if verbose and nbytes:
        print(f"[weights packed in {time.perf_counter() - t0:.1f} s ({nbytes / 2**20:.0f} MiB)]", file=sys.stderr)


def report(session, args: argparse.Namespace) -> None:
    stats = session.stats.to_dict()
    meter = getattr(session.ffn, "meter", None)
    if meter is not None:
        stats["ffn_density"] = round(meter.overall(), 4)  # fraction of FFN neurons computed so far
    stepped = getattr(session.ffn, "stepped_aside", None)
    if stepped is not None:
        stats["ffn_dense_layers"] = stepped  # layers where the sparse path is slower here: the dense kernel runs
    offload = getattr(session.ffn, "report", None)
    if offload is not None:
        stats.update(offload())
    if args.verbose:
        sparse = f" | FFN density {stats['ffn_density']:.1%}" if "ffn_density" in stats else ""
        if stepped is not None:
            sparse += (f" | {stepped} of {len(session.ffn.dense)} layers stepped aside to the dense FFN "
                       "(the sparse path is slower there on this machine)")
        print(
            f"\n[prompt {stats['prompt_tokens']} tok, {stats['prompt_tok_s']:.1f} tok/s | "
            f"generated {stats['gen_tokens']} tok, {stats['gen_tok_s']:.1f} tok/s | "
            f"peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB{sparse}]",
            file=sys.stderr,
        )
        if offload is not None:
            how = (f"whole flash spans streamed ahead, {stats['span_pieces']} requests each"
                   if stats["flash_reads"] == "spans" else f"window cache hit rate {stats['cache_hit_rate']:.1%}")
            print(f"[flash {stats['flash_bytes_per_token'] / 2**10:.0f} KiB/token in "
                  f"{stats['flash_reads_per_token']:.1f} reads ({stats['flash_io']}) | {how} | "
                  f"per token: predict {stats['predict_s_per_token'] * 1e3:.2f} ms, I/O wait "
                  f"{stats['io_wait_s_per_token'] * 1e3:.2f} ms, FFN compute {stats['compute_s_per_token'] * 1e3:.2f} ms]",
                  file=sys.stderr)
        if session.stats.finish_reason == "length":
            print(f"[answer cut at -n {args.max_tokens} tokens; raise -n for a longer one]", file=sys.stderr)
        if "gpu_s_per_token" in stats:
            print(f"[GPU tier {stats['gpu_neurons_per_token']:.0f} neurons/token, attention of "
                  f"{stats['gpu_attention_layers']} layers | per token: GPU side "
                  f"{stats['gpu_s_per_token'] * 1e3:.2f} ms, CPU side {stats['gpu_cpu_side_s_per_token'] * 1e3:.2f} ms, "
                  f"wall {stats['gpu_wall_s_per_token'] * 1e3:.2f} ms ({stats['gpu_overlap']:.0%} of the shorter side "
                  f"hidden), {stats['transfers_per_token']:.0f} transfers ({stats['transfer_s_per_token'] * 1e3:.2f} ms)]",
                  file=sys.stderr)
    if args.stats_json:
        atomic_write_json(args.stats_json, stats, indent=2)


def cmd_generate(args: argparse.Namespace) -> int:
    session = open_session(args)
    params = sampling_params(args)
    if args.chat:  # one user turn through the model's chat template: what an instruct model answers
        pieces = session.chat([{"role": "user", "content": args.prompt}], params)
    else:
        pieces = session.complete(args.prompt, params)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    report(session, args)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    session = open_session(args)
    session.model.tokenizer.prepare_chat()  # before the first "> ", not after the first line typed
    params = sampling_params(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if hasattr(sys.stdin, "reconfigure"):  # undecodable input reaches the tokenizer's check, not a traceback here
        sys.stdin.reconfigure(errors="surrogateescape")
    print("hetinfer chat: /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = ""
            for piece in session.chat(messages, params):
                reply += piece
                print(piece, end="", flush=True)
            print()
        except HetinferError as e:
            messages.pop()
            print(f"error: {e} (type /reset to start over)", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
        report(session, args)


def cmd_eval(args: argparse.Namespace) -> int:
    from hetinfer.data import parse_source
    from hetinfer.loader import load_model
    from hetinfer.data import MIN_SCORED_TOKENS
    from hetinfer.profiler.evaluate import eval_windows, evaluate, summary_table
    from hetinfer.profiler.runner import FloatWeights
    from hetinfer.sparse import engine_ffn, ffn_mode

    mode = ffn_mode(args.sparsity, args.profile, args.predictors, args.mode)  # before the model loads
    if args.threads:
        from hetinfer import kernels

        kernels.set_threads(args.threads)
    model = load_model(args.model)
    weights = FloatWeights(model)
    ffn = engine_ffn(model, args.sparsity, args.profile, args.predictors, "torch", weights, mode)
    windows = eval_windows([parse_source(s) for s in args.data], model.tokenizer, args.window, args.stride,
                           args.tokens)
    scored = sum(len(w.tokens) - 1 - w.first for w in windows)
    if scored < MIN_SCORED_TOKENS:
        raise HetinferError(f"the evaluation data holds {scored} scorable tokens, fewer than the {MIN_SCORED_TOKENS} "
                            "a perplexity needs; pass a longer text")
    result = evaluate(model, windows, {mode: ffn}, weights, progress=not args.quiet and not args.json)[mode]
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(summary_table({mode: result}))
        print("FFN density per layer: " + " ".join(f"{d:.2f}" for d in result.layer_density))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from hetinfer.info import describe, describe_memory

    if args.deploy and args.model:
        raise HetinferError(f"give a deployment ({args.deploy}) or -m MODEL, not both: the deployment names its model")
    if args.deploy and not args.memory:
        raise HetinferError(f"info takes a deployment ({args.deploy}) only with --memory; for its model: "
                            "hetinfer info -m MODEL")
    if args.memory:
        print(describe_memory(args.deploy or args.model, as_json=args.json, n_ctx=args.ctx, kv=args.kv,
                              tokens=args.tokens))
    else:
        print(describe(args.model, as_json=args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hetinfer.data import DEFAULT_EVAL_DATA, MIN_SCORED_TOKENS
    from hetinfer.sparse import MODES

    ap = Parser(prog="hetinfer", description="Sparse, tiered LLM inference across GPU, RAM and flash.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue a prompt, streaming text to stdout")
    add_model_args(p)
    p.add_argument("-p", "--prompt", type=text, required=True)
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message in the model's chat template and stream the "
                        "answer (for instruct models; without it the prompt is continued as plain text)")
    add_sampling_args(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat with the model's template")
    p.add_argument("deploy", nargs="?", metavar="DEPLOY", help="a deployment from `hetinfer prepare` instead of -m")
    add_model_args(p)
    p.add_argument("--system", type=text, help="system message")
    add_sampling_args(p, default_temp=0.7)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("eval", help="perplexity, top-1 agreement and KL of a sparse FFN mode against dense")
    add_model_args(p, session=False)
    p.add_argument("--data", nargs="+", default=list(DEFAULT_EVAL_DATA), metavar="FILE",
                   help="held-out text (sliding windows) or chat JSONL (one window per prompt); FILE[a:b] as in "
                        "profile (default: the last 20%% of the packaged WikiText-2 text, which the default profile "
                        "does not see)")
    p.add_argument("--mode", choices=MODES,
                   help="default: predictor with --predictors, threshold with --sparsity, else dense; "
                        "oracle keeps each token's (1 - S) largest activations")
    p.add_argument("--tokens", type=int_in(MIN_SCORED_TOKENS), default=4096,
                   help="scored tokens at most (default 4096)")
    p.add_argument("--window", type=int_in(3), default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int_in(1), default=256,
                   help="new tokens scored per window, at most --window (default 256)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("info", help="architecture, tensor types and memory needs of a model")
    p.add_argument("deploy", nargs="?", metavar="DEPLOY",
                   help="with --memory: a deployment from `hetinfer prepare`, measured with its own engine")
    p.add_argument("-m", "--model", help="GGUF file or Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory", action="store_true",
                   help="decode a few tokens and report the resident memory: the model's bytes, the KV cache and "
                        "the runtime's own overhead (libraries, heap), i.e. what a box needs")
    p.add_argument("--ctx", type=int_in(1), help="with --memory: context to size the KV cache for (default: a "
                   "deployment's own, else 512)")
    p.add_argument("--kv", choices=tuple(KV_DTYPES), help=f"with --memory: KV cache element type (default: a "
                   f"deployment's own, else {DEFAULT_KV})")
    p.add_argument("--tokens", type=int_in(1), default=16, help="with --memory: tokens to decode (default 16)")
    p.set_defaults(run=cmd_info)

    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # paths with undecodable bytes print as the bytes they are
        sys.stdout.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        return int(args.run(args) or 0)
    except HetinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
