"""OpenAI-compatible HTTP API over one Session: chat and text completions (streamed or not),
the model list, and /health with the queue and where the model lives.

Generation is synchronous CPU work, so one worker thread owns the Session and runs jobs one at a
time in arrival order from a bounded queue; a full queue answers 429 at once. Each job sends its
text pieces back to the event loop; a client that disconnects sets the job's cancel flag and the
worker stops at the next token.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

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


class Job:
    """One request's generation: inputs, a cancel flag, and the events the worker sends back."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.cancelled = threading.Event()
        self._events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value) -> None:
        """From the worker thread: ("text", piece), then ("done", Stats) or ("error", exception)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))

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
        self.waiting: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: Job | None = None
        self.outcomes: Counter[str] = Counter()  # finished jobs by finish reason (OUTCOMES)
        self._thread = threading.Thread(target=self._work, name="hetinfer-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel the running and waiting jobs and end the worker."""
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        if self.running is not None:
            self.running.cancel()
        self.waiting.put(None)
        self._thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        job = Job(prompt_ids, params)
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting; retry later",
                           type="server_busy", code="queue_full") from None
        return job

    def _work(self) -> None:
        while (job := self.waiting.get()) is not None:
            if job.cancelled.is_set():  # its client left while it waited
                self.outcomes["cancelled"] += 1
                continue
            self.running = job
            try:
                for piece in self.session.stream(job.prompt_ids, job.params, job.cancelled.is_set):
                    job.emit("text", piece)
                self.outcomes[self.session.stats.finish_reason] += 1
                job.emit("done", self.session.stats)
            except Exception as e:  # noqa: BLE001 - the request fails, the worker keeps serving
                self.outcomes["error"] += 1
                job.emit("error", e)
            finally:
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


def create_app(session: Session, model_id: str, api_key: str | None = None, max_queue: int = 16,
               default_max_tokens: int = 512) -> FastAPI:
    """The FastAPI app serving `session` under the name `model_id`."""
    worker = RequestWorker(session, max_queue)
    tok = session.model.tokenizer

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="hetinfer", lifespan=lifespan)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

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
            "status": "ok", "model": model_id, "path": session.model.path, "fingerprint": session.model.fingerprint,
            "context_length": session.n_ctx,
            "queue": {"running": int(worker.running is not None), "waiting": worker.waiting.qsize(), "max": max_queue},
            "requests": {k: worker.outcomes[k] for k in OUTCOMES},
            "placement": placement_summary(session),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        ids = tok.encode(tok.render_chat([m.as_template_dict() for m in body.messages], add_generation_prompt=True))
        return await generate(body, request, ids, body.max_completion_tokens or body.max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        return await generate(body, request, tok.encode(body.text), body.max_tokens, chat=False)

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


def _chat_choice(text: str | None, finish: str | None, stream: bool) -> dict:
    if stream:
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _completion_choice(text: str | None, finish: str | None, stream: bool) -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


def _usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.gen_tokens,
            "total_tokens": stats.prompt_tokens + stats.gen_tokens}


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
    """The whole text and stats of a job; cancels it if the client disconnects first."""

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
            else:
                return "".join(pieces), value
    finally:
        watcher.cancel()
        job.cancel()
