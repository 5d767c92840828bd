"""Serving benchmark: concurrent streaming chat clients against `hetinfer serve` on loopback.

Starts the server (or targets --url), sends a bounded number of requests from --clients threads
with the official openai client, and reports time to first token, inter-token latency
(p50/p95/p99), throughput and failed requests. Exits 1 if any request failed.

    python benchmarks/serve.py --clients 4 --requests 16 --max-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai

TOPICS = ["the sea", "mountains", "a library", "the moon", "bread", "rain", "a bicycle", "winter", "music", "a garden",
          "trains", "coffee", "the desert", "a lighthouse", "snow", "bees"]


def start_server(model: str | None, ctx: int, max_queue: int, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hetinfer.server.cli", "--port", str(port), "--ctx", str(ctx), "--max-queue",
           str(max_queue), *([model] if model else [])]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    log.seek(0)
    raise SystemExit(f"the server did not start:\n{log.read()[-3000:]}")


def one_request(client: openai.OpenAI, model: str, i: int, max_tokens: int) -> dict:
    """Stream one chat completion; times of the first and each later content chunk."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage
    return {"ttft": stamps[0] - t0, "itl": list(np.diff(stamps)), "tokens": usage.completion_tokens,
            "seconds": time.perf_counter() - t0}


def percentiles(xs: list[float]) -> dict:
    p = np.percentile(xs, [50, 95, 99]) if xs else [float("nan")] * 3
    return {"p50_ms": 1000 * p[0], "p95_ms": 1000 * p[1], "p99_ms": 1000 * p[2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    ap.add_argument("-m", "--model", help="model file for the started server (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--api-key", default=os.environ.get("HETINFER_API_KEY", "none"))
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--requests", type=int, default=16, help="requests in all (default 16)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer at most (default 32)")
    ap.add_argument("--ctx", type=int, default=1024, help="context of the started server (default 1024)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()

    load = os.getloadavg()[0]  # the machine may be shared: record how busy it was
    proc = None
    log = tempfile.TemporaryFile("w+")
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.ctx, max(args.clients, 1), log)
    try:
        client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        one_request(client, model, 0, 2)  # warm-up: first-call overheads are not serving latency
        results, failures = [], []
        lock = threading.Lock()

        def run(i: int) -> None:
            try:
                r = one_request(client, model, i, args.max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    failures.append(repr(e))
                return
            with lock:
                results.append(r)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(run, range(args.requests)))
        wall = time.perf_counter() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    tokens = sum(r["tokens"] for r in results)
    out = {
        "model": model, "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "completed": len(results), "failed": len(failures), "wall_s": wall,
        "ttft": percentiles([r["ttft"] for r in results]),
        "inter_token": percentiles([x for r in results for x in r["itl"]]),
        "throughput_tok_s": tokens / wall, "requests_per_s": len(results) / wall, "completion_tokens": tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_1m_at_start": load,
        "python": platform.python_version(),
    }
    print(f"{out['completed']}/{args.requests} requests ok, {out['failed']} failed, {args.clients} clients, "
          f"max_tokens {args.max_tokens}, {wall:.1f} s (load average {load:.1f} at start)")
    for name in ("ttft", "inter_token"):
        print(f"  {name:<12}" + "  ".join(f"{k[:-3]} {v:8.1f} ms" for k, v in out[name].items()))
    print(f"  throughput  {out['throughput_tok_s']:.1f} tok/s, {out['requests_per_s']:.2f} req/s")
    for f in failures[:5]:
        print(f"  failure: {f}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
