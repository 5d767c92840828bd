"""OpenAI-compatible HTTP API over one Session: chat and text completions (streamed or not),
the model list, and /health with the queue and where the model lives.

Generation is synchronous CPU work, so one worker thread owns the Session and runs jobs one at a
time in arrival order from a bounded queue; a full queue answers 429 at once. Each job sends its
text pieces back to the event loop; a client that disconnects cancels its job: a waiting job ends
at once, the running one at the next token. Every job ends exactly once (done or error), so no
handler waits for a job nobody runs; at shutdown every job is cancelled (waiting ones answered 503).
Tokenization and the chat template run in threads, off the event loop; bodies over a size limit
are refused before they are read.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from collections import Counter, deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hetinfer.errors import HetinferError
from hetinfer.generate import Session, Stats
from hetinfer.info import component_bytes
from hetinfer.sampling import SamplingParams
from hetinfer.server.schemas import ChatRequest, CompletionRequest, error_body
from hetinfer.tiers import RAM, TIERS

OUTCOMES = ("stop", "length", "cancelled", "error")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type, param, code)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry later", type="server_error", code="shutting_down")


class Job:
    """One request's generation: inputs, a cancel flag, and the events its worker sends back:
    ("text", piece) as generated, then exactly one end, ("done", Stats) or ("error", exception)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, worker: "RequestWorker"):
        self.prompt_ids, self.params = prompt_ids, params
        self.cancelled = threading.Event()
        self.shutdown = False  # cancelled because the server is stopping
        self.ended = False
        self._worker = worker
        self._events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def cancel(self) -> None:
        self._worker.cancel(self)

    def emit(self, kind: str, value) -> None:
        """From any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is waiting for this job any more
            pass

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        while True:
            kind, value = await self._events.get()
            yield kind, value
            if kind != "text":
                return


class RequestWorker:
    """The Session and the single thread that runs its requests; at most `max_queue` jobs wait behind the running one."""

    def __init__(self, session: Session, max_queue: int):
        self.session = session
        self.max_queue = max_queue
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.closed = False  # shutting down: no new jobs
        self.outcomes: Counter[str] = Counter()  # finished jobs by finish reason (OUTCOMES)
        self._lock = threading.Condition()  # guards the fields above; the worker waits on it for jobs
        self._thread = threading.Thread(target=self._work, name="hetinfer-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        with self._lock:
            if self.closed:
                raise shutting_down()
            if len(self.waiting) >= self.max_queue:
                raise ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                               type="server_busy", code="queue_full")
            job = Job(prompt_ids, params, self)
            self.waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job, shutdown: bool = False) -> None:
        """Stop `job`: a waiting one ends now (finish reason "cancelled"), the running one at its next token."""
        with self._lock:
            if job.ended:
                return
            job.shutdown |= shutdown
            job.cancelled.set()
            if job not in self.waiting:
                return  # running: the session stops at the next token
            self.waiting.remove(job)
        self._end(job, "done", Stats(finish_reason="cancelled"))

    def cancel_all(self) -> None:
        """Refuse new jobs and cancel every waiting and running one (the server is stopping)."""
        with self._lock:
            self.closed = True
            jobs = [*self.waiting, *([self.running] if self.running else [])]
            self._lock.notify()
        for job in jobs:
            self.cancel(job, shutdown=True)

    def stop(self) -> None:
        """Cancel every job and end the worker."""
        self.cancel_all()
        self._thread.join(timeout=10)

    def _end(self, job: Job, kind: str, value) -> None:
        with self._lock:
            job.ended = True
            self.outcomes[value.finish_reason if kind == "done" else "error"] += 1
        job.emit(kind, value)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self.waiting and not self.closed:
                    self._lock.wait()
                if not self.waiting:
                    return
                job = self.running = self.waiting.popleft()
            try:
                for piece in self.session.stream(job.prompt_ids, job.params, job.cancelled.is_set):
                    job.emit("text", piece)
                self._end(job, "done", self.session.stats)
            except Exception as e:  # noqa: BLE001 - the request fails, the worker keeps serving
                self._end(job, "error", e)
            finally:
                with self._lock:
                    self.running = None


def placement_summary(session: Session) -> dict:
    """Bytes and share of expected FFN activations per tier (`hetinfer.tiers.TIERS`: gpu, ram, flash).

    An engine passed as the Session's `ffn` reports its own placement through a
    `placement_summary()` method returning this structure; the dense engine keeps everything,
    KV cache included, in CPU RAM and computes every activation there.
    """
    engine_summary = getattr(session.ffn, "placement_summary", None)
    if engine_summary is not None:
        return engine_summary()
    parts = component_bytes(session.model)
    parts["kv_cache"] = session.model.config.kv_cache_bytes(session.n_ctx, session.cache.dtype)
    tiers = {t: {"bytes": 0, "activation_share": 0.0, "components": {}} for t in TIERS}
    tiers[TIERS[RAM]] = {"bytes": sum(parts.values()), "activation_share": 1.0, "components": parts}
    return {"engine": "dense", "tiers": tiers}


def describe_placement(summary: dict) -> str:
    """The placement as a few lines of text, like the PROCESSOR column of `ollama ps`."""
    total = sum(t["bytes"] for t in summary["tiers"].values()) or 1
    lines = [f"placement ({summary['engine']} engine):"]
    for name, t in summary["tiers"].items():
        lines.append(f"  {name:<6}{t['bytes'] / 2**20:10.1f} MiB  {t['bytes'] / total:6.1%} of bytes  "
                     f"{t['activation_share']:6.1%} of activations")
    return "\n".join(lines)


class BearerAuth:
    """ASGI middleware: every HTTP request needs `Authorization: Bearer KEY`, else 401."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                body = error_body("invalid or missing API key: send the header `Authorization: Bearer KEY`",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 without being read, when its
    Content-Length says so, or as soon as the bytes read pass the limit (a chunked body). The body is
    read here and handed on whole; later receive calls (a disconnect) go to the client."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending all of it
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        body = error_body(f"the request body is larger than this server's limit of {self.limit} bytes; "
                          "send a shorter prompt, or start the server with a larger --max-body",
                          code="request_too_large")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


class HostCheck:
    """ASGI middleware against DNS rebinding, for a server without an API key: a web page whose own host
    name the attacker points at this machine's address reaches the server under that name, with the
    page allowed to read the answers. Requests must name the server by an IP address, `localhost` (or
    a name under .localhost), or a name in `allowed`; others are answered 400."""

    def __init__(self, app, allowed: set[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not host_allowed(dict(scope["headers"]).get(b"host", b""), self.allowed):
            body = error_body("this server answers only requests addressed to localhost, an IP address or a name "
                              "given with --allow-host (protection against DNS rebinding); use one of those, or "
                              "start the server with --api-key", code="invalid_host")
            await JSONResponse(body, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def host_allowed(header: bytes, allowed: set[str]) -> bool:
    """Whether a Host header (`name`, `name:port`, `[v6]:port`) names an IP, localhost or an allowed name."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in ("", "localhost") or host.endswith(".localhost") or host in allowed


def create_app(session: Session, model_id: str, api_key: str | None = None, max_queue: int = 16,
               default_max_tokens: int = 512, max_body: int = 1 << 20, allowed_hosts: set[str] = frozenset()) -> FastAPI:
    """The FastAPI app serving `session` under the name `model_id`; `app.state.worker` runs the jobs.
    Without `api_key`, requests must address the server by IP, localhost or one of `allowed_hosts`."""
    worker = RequestWorker(session, max_queue)
    tok = session.model.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="hetinfer", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(BodyLimit, limit=max_body)  # the last added runs first: host, key, then the body
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    else:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body, status_code=e.status, headers=headers)

    @app.exception_handler(HetinferError)
    async def _hetinfer_error(request: Request, e: HetinferError) -> JSONResponse:
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}"),
                                status_code=400)
        loc = [str(p) for p in err["loc"][1:]]  # drop "body"
        where = ".".join(loc)
        return JSONResponse(error_body(f"{where}: {err['msg']}" if where else err["msg"], param=loc[0] if loc else None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {e!r}", type="server_error"), status_code=500)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_id!r}", param="model",
                           code="model_not_found")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(os.path.getmtime(session.model.path)),
                "owned_by": "hetinfer"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok", "model": model_id, "fingerprint": session.model.fingerprint,
            "path": session.model.path if api_key else os.path.basename(session.model.path),  # no key: no absolute path
            "context_length": session.n_ctx,
            "queue": {"running": int(worker.running is not None), "waiting": len(worker.waiting), "max": max_queue},
            "requests": {k: worker.outcomes[k] for k in OUTCOMES},
            "placement": placement_summary(session),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        ids = await asyncio.to_thread(tok.encode_chat, [m.as_template_dict() for m in body.messages])
        return await generate(body, request, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        return await generate(body, request, await asyncio.to_thread(tok.encode, body.text), body.max_tokens, chat=False)

    async def generate(body, request: Request, ids: list[int], max_tokens: int | None, chat: bool):
        prompt_field = "messages" if chat else "prompt"
        if max_tokens is None:
            max_tokens = max(1, min(default_max_tokens, session.n_ctx - len(ids)))
        try:
            session.check_fits(len(ids), max_tokens)
        except HetinferError as e:
            too_long = len(ids) >= session.n_ctx
            raise ApiError(400, str(e), param=prompt_field if too_long or not ids else "max_tokens",
                           code="context_length_exceeded" if ids else None) from None
        job = worker.submit(ids, body.sampling_params(max_tokens))
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_id, "system_fingerprint": session.model.fingerprint}
        choice = _chat_choice if chat else _completion_choice
        if body.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} if chat else None
            return StreamingResponse(_sse(job, head, choice, first, body.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, stats = await _collect(job, request)
        head["object"] = "chat.completion" if chat else "text_completion"
        return {**head, "choices": [choice(text, stats.finish_reason, stream=False)], "usage": _usage(stats)}

    return app


class _Server(uvicorn.Server):
    """uvicorn's server that cancels every request as shutdown begins (waiting ones answered 503, the
    running one stopped at its next token), so its graceful wait finds them ended instead of
    cancelling their tasks when the wait runs out (a traceback each, and a handler that never ends)."""

    def __init__(self, config: uvicorn.Config, cancel_all: Callable[[], None]):
        super().__init__(config)
        self.cancel_all = cancel_all

    async def shutdown(self, sockets=None) -> None:
        self.cancel_all()
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run `app` (from create_app) on host:port until SIGINT or SIGTERM."""
    _Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5), app.state.worker.cancel_all).run()


def _chat_choice(text: str | None, finish: str | None, stream: bool) -> dict:
    if stream:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _completion_choice(text: str | None, finish: str | None, stream: bool) -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def _usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.gen_tokens,
            "total_tokens": stats.prompt_tokens + stats.gen_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}



def _event(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _sse(job: Job, head: dict, choice: Callable, first: dict | None, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with [DONE]."""
    try:
        if first is not None:
            yield _event({**head, "choices": [first]})
        async for kind, value in job.events():
            if kind == "text":
                yield _event({**head, "choices": [choice(value, None, stream=True)]})
            elif kind == "done" and job.shutdown and value.finish_reason == "cancelled":
                yield _event(shutting_down().body)
            elif kind == "done":
                yield _event({**head, "choices": [choice(None, value.finish_reason, stream=True)]})
                if include_usage:
                    yield _event({**head, "choices": [], "usage": _usage(value)})
            else:
                yield _event(error_body(str(value), type="server_error"))
        yield _event("[DONE]")
    finally:
        job.cancel()  # the client went away (or all is sent): stop at the next token


async def _collect(job: Job, request: Request) -> tuple[str, Stats]:
    """The whole text and stats of a job; cancels it if the client disconnects first (a waiting job
    then ends at once, and this returns to nobody)."""

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    pieces: list[str] = []
    try:
        async for kind, value in job.events():
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise value
            elif job.shutdown and value.finish_reason == "cancelled":
                raise shutting_down()
            else:
                return "".join(pieces), value
    finally:
        watcher.cancel()
        job.cancel()
