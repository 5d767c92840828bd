"""`hetinfer serve`: the OpenAI-compatible server. Also runs as `python -m hetinfer.server.cli ARGS`."""
from __future__ import annotations

import argparse
import os
import sys

from hetinfer.argtypes import SIZE, Parser, Size, int_in
from hetinfer.cli import add_model_args, open_session
from hetinfer.errors import HetinferError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, models, health)")
    p.add_argument("path", nargs="?", metavar="MODEL|DEPLOY", help="model to serve (same as -m)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("HETINFER_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every request (default: $HETINFER_API_KEY); "
                        "a key given here shows in the process list, $HETINFER_API_KEY or --api-key-file do not")
    p.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file (its first line)")
    p.add_argument("--max-queue", type=int_in(1), default=16,
                   help="requests that may wait behind the running one; more are answered 429 (default 16)")
    p.add_argument("--max-tokens", type=int_in(1), default=512,
                   help="max_tokens of requests that give none (default 512, capped by the context)")
    p.add_argument("--memory-budget", type=SIZE, metavar="SIZE",
                   help="refuse to start if the model would need more RAM than SIZE (e.g. 2GiB, 512MB)")
    p.add_argument("--max-body", type=Size(lo=1024), metavar="SIZE", default="1MiB",
                   help="largest request body accepted; larger ones are answered 413 unread (default 1MiB, "
                        "about 250k tokens of English)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="without an API key, requests must address the server by localhost or an IP address "
                        "(against DNS rebinding); also accept this host name (repeatable)")
    p.add_argument("--name", help="model id clients ask for (default: the model's file name without .gguf)")
    p.add_argument("--verbose", action="store_true", help="print where the model lives (bytes and activations per tier)")
    p.set_defaults(run=run)


def model_id(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def run(args: argparse.Namespace) -> int:
    if args.path and args.model and args.path != args.model:
        raise HetinferError(f"two models given ({args.path} and -m {args.model}); give one")
    from hetinfer.offload.deploy import is_deployment

    args.model = args.path or args.model
    if is_deployment(args.model):
        args.deploy, args.model = args.model, None
    api_key = read_api_key(args)
    try:
        from hetinfer.server.app import create_app, describe_placement, placement_summary, serve
    except ImportError as e:
        raise HetinferError(f"`hetinfer serve` needs FastAPI and uvicorn ({e}); run `pip install 'hetinfer[serve]'`") from None
    from hetinfer.placement.hardware import format_size
    from hetinfer.tiers import RAM, TIERS

    session = open_session(args)
    session.model.tokenizer.prepare_chat()  # the first chat request's template and plain-text tokenizer, made now
    summary = placement_summary(session)
    ram = summary["tiers"][TIERS[RAM]]["bytes"]
    if args.memory_budget is not None and ram > args.memory_budget:
        raise HetinferError(
            f"the model needs {format_size(ram)} of RAM with a {session.n_ctx}-token context, more than the budget "
            f"{format_size(args.memory_budget)}; lower --ctx or serve a smaller model"
        )
    if args.host not in LOOPBACK and not api_key:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    name = args.name or model_id(session.model.path)
    app = create_app(session, name, api_key=api_key, max_queue=args.max_queue, default_max_tokens=args.max_tokens,
                     max_body=args.max_body, allowed_hosts={args.host, *args.allow_host})
    print(f"hetinfer: serving {name} at http://{args.host}:{args.port}/v1 (context {session.n_ctx} tokens, "
          f"queue {args.max_queue}{', API key required' if api_key else ''})", file=sys.stderr)
    if args.verbose:
        print(describe_placement(summary), file=sys.stderr)
    serve(app, args.host, args.port)
    return 0


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, else --api-key or $HETINFER_API_KEY (None: no key)."""
    if not args.api_key_file:
        return args.api_key or None
    try:
        with open(args.api_key_file, encoding="utf-8") as fh:
            key = fh.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise HetinferError(f"cannot read the API key file {args.api_key_file}: {e}; give a readable text file") from None
    if not key:
        raise HetinferError(f"the API key file {args.api_key_file} is empty; write the key on its first line")
    return key


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="hetinfer")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except HetinferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
