"""The HTTP API of `dimoo serve`: OpenAI's images and chat endpoints on the continuous-batching `Scheduler`.

Request bodies are generated from the task dataclasses of `dimoo_npu.settings.requests` (their fields, types and
help), with only OpenAI's wire names added (``n``, ``size``, ``response_format``, ``model``, chat ``messages`` and
``stream``); values are then resolved and checked by `dimoo_npu.settings.requests` as for ``dimoo t2i``, so a seeded
request gives what the command gives. Every error is OpenAI's JSON body ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad value, 401 without the API key (checked before the body is read, on every route but
/health and /ready), 404 for a model name this server does not serve, 408 for a body not sent within the timeout,
413 for a body over the limit (however it is sent), 422 for a malformed body or an unknown field (on every
endpoint), 429 (with Retry-After) when the queue or the token budget is full, 503 while the model loads or the
server drains; never a traceback or a path of the server's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import logging
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

from dimoo_npu.serve.metrics import Metrics
from dimoo_npu.serve.scheduler import Job, NotAccepting, QueueFull, Scheduler, TooMuchWork
from dimoo_npu.settings import requests
from dimoo_npu.utils.errors import DimooError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MODEL_ALIASES = ("dimoo",)  # accepted as `model` besides the id /v1/models lists (the README's client sends "dimoo")
OPEN_ROUTES = ("/health", "/ready")  # the only routes answered without the API key (probes of a load balancer)


@dataclass
class ServeConfig:
    """What `dimoo serve` was started with."""

    checkpoint: str
    lora: str | None = None  # LoRA adapter folder merged into the weights at load
    device: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    compile: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    max_n: int = 4
    max_steps: int = 1024
    max_concurrent_tokens: int | None = None  # None: `default_token_limit` of the checkpoint
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    grace_s: float = 30.0
    # The server's layer over the checkpoint's generation_defaults, under each request's own values: the chat
    # answers' kv_cache / parallel_threshold / fast (`dimoo serve --kv-cache --parallel-threshold --fast`).
    understand_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantize: str | None = None  # w8a8 | w8a16: quantize a float checkpoint while it loads

    @property
    def model_id(self) -> str:
        """The name `/v1/models` lists: a hub repo id as given, a checkpoint folder by its name (not its path)."""
        path = Path(self.checkpoint)
        return path.name if path.is_dir() else self.checkpoint

    def token_limit(self) -> int:
        return self.max_concurrent_tokens or default_token_limit(self.checkpoint, self.max_batch)


def default_token_limit(checkpoint: str, max_batch: int) -> int:
    """One sequence at the length cap per batch row: what ``--max-batch`` rows could hold without guidance (a
    guided row counts each copy), so the tokens of all work in flight are bounded by the checkpoint's cap.
    Reads config.json and DIMOO_MAX_LENGTH (an InputError names a bad value)."""
    from dimoo_npu.files.hub_cache import resolve_checkpoint
    from dimoo_npu.modeling.config import DiMOOConfig
    from dimoo_npu.tokens.lengths import length_cap

    return max_batch * length_cap(DiMOOConfig.from_json(resolve_checkpoint(checkpoint)).max_sequence_length)


# ---- request bodies, generated from dimoo_npu.settings.requests ----

# Fields of the task dataclasses that the wire names replace or that do not travel in a body.
_NOT_ON_THE_WIRE = {
    "output",
    "width",
    "height",
    "image",
    "ref_image",
    "mask",
    "question",
    "mask_h_ratio",
    "mask_w_ratio",
}


def _fields_of(*classes: type[requests.Request], skip: set[str] = _NOT_ON_THE_WIRE) -> dict[str, Any]:
    """Pydantic fields (type | None, default None, the dataclass's help) of every field of the classes."""
    fields: dict[str, Any] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name in fields:
                continue
            kind = requests.field_type(cls, f.name)
            required = f.metadata.get("required", False)
            default = ... if required else None
            fields[f.name] = (kind if required else kind | None, Field(default, description=f.metadata["help"]))
    return fields


_STRICT = ConfigDict(extra="forbid", strict=True)  # JSON bodies: "2" and true are not numbers (forms send strings)
_WIRE = {
    "model": (str | None, Field(None, description=f"the id /v1/models lists, or an alias: {', '.join(MODEL_ALIASES)}")),
    "n": (int, Field(1, ge=1, description="number of images (seeds seed, seed + 1, ...)")),
    "size": (
        str | None,
        Field(None, pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$", description="WxH, multiples of 16 pixels"),
    ),
    "response_format": (Literal["b64_json"], Field("b64_json", description="PNG as base64 (URLs are not served)")),
}
ImageGenerationBody = create_model(
    "ImageGenerationBody", __config__=_STRICT, **_fields_of(requests.TextToImageRequest), **_WIRE
)
PAINT_TASKS = ("inpaint", "outpaint")
_UPLOADS = ("image", "mask")
_BOX = {"mask_h_ratio", "mask_w_ratio"}
EditForm = create_model(  # unknown form fields are refused by the endpoint (this model's fields + the uploads)
    "EditForm",
    **_fields_of(requests.EditRequest, requests.InpaintRequest, skip=_NOT_ON_THE_WIRE - _BOX | {"edit_type"}),
    edit_type=(
        str | None,
        Field(None, description="inpaint or outpaint (default inpaint with a mask), else an edit type (default edit)"),
    ),
    **{k: v for k, v in _WIRE.items() if k != "size"},
)


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(description="data:image/png;base64,... (remote URLs are not fetched)")
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None


ChatBody = create_model(
    "ChatBody",
    __config__=_STRICT,  # an option this server does not have is refused by name, never silently ignored
    **_fields_of(requests.UnderstandRequest),
    model=_WIRE["model"],
    messages=(list[ChatMessage], Field(min_length=1, description="a user message with an image_url and a question")),
    stream=(bool, Field(False, description="send each answer block as it is fixed (server-sent events)")),
    max_tokens=(int | None, Field(None, ge=1, description="OpenAI's name for gen_length")),
)


# ---- errors ----


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None, param=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers, param


def _error(
    status: int, message: str, kind: str = "invalid_request_error", headers=None, param: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_name(location: tuple) -> str:
    """A validation error's place in the request (``messages.0.content``), without FastAPI's ``body`` root."""
    parts = [str(p) for p in location]
    return ".".join(parts[1:] if parts[:1] == ["body"] and len(parts) > 1 else parts)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return _error(err.status, err.message, err.kind, err.headers, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        metrics.requests.labels(request.url.path, "422").inc()
        errors = err.errors()
        details = "; ".join(f"{_field_name(e['loc'])}: {e['msg']}" for e in errors[:5])
        return _error(422, f"malformed request: {details}", param=_field_name(errors[0]["loc"]) if errors else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), "http_error", getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details", "server_error")


def _endpoint(path: str, routes: list) -> str:
    """The metrics label of a path: the route's, or ``other`` (a scanner's made-up paths add no series)."""
    return path if any(getattr(route, "path", None) == path for route in routes) else "other"


class ApiKeyGate:
    """ASGI middleware: with a key set, every route but `OPEN_ROUTES` answers 401 without it, before any of the
    body is read (so a malformed body without the key is a 401, and the schema and metrics are not public)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, routes: list):
        self.app, self.expected, self.metrics = app, f"Bearer {api_key}".encode() if api_key else None, metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.metrics.requests.labels(_endpoint(scope["path"], self.routes), "401").inc()
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        await _error(401, message, "authentication_error")(scope, receive, send)


class BodyGuard:
    """ASGI middleware: a body over ``limit`` bytes is answered 413 (declared or not: chunked bodies are counted as
    they arrive), a body not received within ``timeout`` seconds 408; the app then sees a client that went away
    and whatever it answers is dropped."""

    def __init__(self, app, limit: int, timeout: float, metrics: Metrics, routes: list):
        self.app, self.limit, self.timeout, self.metrics, self.routes = app, limit, timeout, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over {self.limit} bytes: send a smaller image", "too_large"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(413, *too_large, scope, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        seen, started, refused, body_done = 0, False, False, False

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = True
            await send(message)

        async def guarded_receive():
            nonlocal seen, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # after the body: only the disconnect message, waited for as long as it takes
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                refusal = (408, f"request body not received within {self.timeout:g} s", "timeout")
            else:
                seen += len(message.get("body", b""))
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                if seen <= self.limit:
                    return message
                refusal = (413, *too_large)
            if not started:
                await self._refuse(*refusal, scope, send)
            refused = True
            return {"type": "http.disconnect"}

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refused:
                raise  # the app's own failure; a refused request's "client went away" errors are expected

    async def _refuse(self, status: int, message: str, kind: str, scope, send) -> None:
        self.metrics.requests.labels(_endpoint(scope["path"], self.routes), str(status)).inc()
        headers = {"Connection": "close"}
        await _error(status, message, kind, headers)(scope, _no_body, send)


async def _no_body():
    return {"type": "http.disconnect"}


# ---- the app ----


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts the scheduler (which loads the model) and drains it on shutdown."""
    metrics = Metrics()
    state: dict[str, Any] = {}

    def load():
        from dimoo_npu.pipeline import DiMOOPipeline

        pipeline = DiMOOPipeline.from_pretrained(
            config.checkpoint, config.device, compile=config.compile, quantize=config.quantize, lora=config.lora
        )
        pipeline.config.generation_defaults = {**pipeline.config.generation_defaults, **config.understand_defaults}
        state["pipeline"] = pipeline
        return pipeline.model

    buckets = tuple(2**i for i in range(12) if 2**i < config.max_batch) + (config.max_batch,) if config.compile else ()
    sched = Scheduler(load, config.max_batch, config.max_queue, buckets, metrics, max_tokens=config.token_limit())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        yield
        logger.info("draining: finishing %d running and queued request(s)", len(sched.pending) + sched.busy_rows())
        await asyncio.to_thread(sched.stop, config.grace_s)

    app = FastAPI(
        title="dimoo serve",
        version="1",
        description="Lumina-DiMOO behind OpenAI's images and chat APIs, with step-level continuous batching.",
        lifespan=lifespan,
    )
    app.state.scheduler = sched  # `dimoo serve` starts its drain at SIGTERM, before uvicorn waits for requests
    routes = app.router.routes  # filled below; the middleware reads it per request
    app.add_middleware(
        BodyGuard, limit=config.max_body_bytes, timeout=config.body_timeout_s, metrics=metrics, routes=routes
    )
    app.add_middleware(ApiKeyGate, api_key=config.api_key, metrics=metrics, routes=routes)  # added last: runs first
    _install_error_handlers(app, metrics)

    def served(model: str | None) -> None:
        if model is not None and model not in (config.model_id, *MODEL_ALIASES):
            names = ", ".join(repr(name) for name in (config.model_id, *MODEL_ALIASES))
            message = f"the model {model[:100]!r} does not exist on this server: use {names} (see /v1/models)"
            raise ApiError(404, message, param="model")

    def pipeline():
        if sched.load_error is not None:
            raise ApiError(503, f"the model failed to load: {sched.load_error}", "server_error")
        if not sched.ready.is_set():
            raise ApiError(503, "the model is still loading: retry shortly", "server_error", {"Retry-After": "5"})
        return state["pipeline"]

    async def run(job_parts: dict[str, Any], http: Request, stream: bool = False):
        """Queue a job and wait for its result (or yield its blocks); a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        job = Job(post=post, **job_parts)
        try:
            sched.submit(job)
        except TooMuchWork as err:
            raise ApiError(400, str(err)) from None
        except QueueFull as err:
            raise ApiError(
                429, f"server busy: {err}; retry later", "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)}
            ) from None
        except NotAccepting as err:
            raise ApiError(503, f"not accepting requests: {err}", "server_error", {"Retry-After": "5"}) from None

        async def events_of_job():
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), 0.25)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            logger.info("client went away: request cancelled")
                            metrics.requests.labels(http.url.path, "cancelled").inc()
                            sched.cancel(job)
                            return
                        continue
                    if kind == "error":
                        if isinstance(value, DimooError):
                            raise ApiError(400, str(value))
                        if isinstance(value, NotAccepting):
                            raise ApiError(503, str(value), "server_error", {"Retry-After": "5"})
                        raise value
                    yield kind, value
                    if kind == "done":
                        return
            finally:
                if not job.cancelled and not _done(job):
                    sched.cancel(job)

        if stream:
            return events_of_job()
        async for kind, value in events_of_job():
            if kind == "done":
                metrics.requests.labels(http.url.path, "200").inc()
                return value
        return None

    # ---- endpoints ----

    @app.get("/health")
    async def health() -> dict:
        """The process is up (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "model not loaded yet"}})
    async def ready():
        """The model is loaded and requests are admitted."""
        if sched.ready.is_set() and not sched.stopping:
            return {"status": "ready"}
        reason = "draining" if sched.stopping else "failed" if sched.load_error else "loading"
        return _error(503, f"not ready: {reason}", "server_error", {"Retry-After": "5"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics: queue depth, batch occupancy, step latency, requests by status."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "owned_by": "dimoo"}]}

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationBody, http: Request) -> dict:  # type: ignore[valid-type]
        """Text-to-image; ``size`` is WxH (multiples of 16), ``seed`` makes it reproducible (image i: seed + i)."""
        served(body.model)
        pipe = pipeline()
        values = body.model_dump(exclude={"model", "n", "size", "response_format"})
        if body.size is not None:
            values["width"], values["height"] = (int(v) for v in body.size.split("x"))
        _check_n(body.n, config)
        request, prepared = await asyncio.to_thread(_prepared, pipe, "t2i", values, {}, config.max_steps, body.n)
        return _images_response(await run(_image_job(pipe, prepared, request, body.n), http))

    @app.post("/v1/images/edits")
    async def edits(
        http: Request,
        form: Annotated[EditForm, Form()],  # type: ignore[valid-type]
        image: Annotated[UploadFile, File(description="the picture to edit (PNG or JPEG)")],
        mask: Annotated[UploadFile | None, File(description="white = regenerate (inpaint / outpaint)")] = None,
    ) -> dict:
        """Editing (``edit_type``), or inpainting / outpainting (edit_type inpaint or outpaint; default inpaint
        when a ``mask`` is sent) of the mask's white region, else of the centred box (``mask_h_ratio``,
        ``mask_w_ratio``)."""
        unknown = sorted(set((await http.form()).keys()) - set(EditForm.model_fields) - set(_UPLOADS))
        if unknown:
            known = ", ".join(sorted({*EditForm.model_fields, *_UPLOADS}))
            raise ApiError(
                422,
                f"malformed request: unknown field(s) {', '.join(unknown)[:200]}: use {known}",
                param=unknown[0][:100],
            )
        served(form.model)
        task, values = _edit_task(form, mask is not None)
        _check_n(form.n, config)
        pipe = pipeline()
        files = {"image": await image.read()}
        if mask is not None:
            files["mask"] = await mask.read()
        request, prepared = await asyncio.to_thread(_prepared, pipe, task, values, files, config.max_steps, form.n)
        return _images_response(await run(_image_job(pipe, prepared, request, form.n), http))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):  # type: ignore[valid-type]
        """Understanding: the last user message's image (data URI) and text; ``stream`` sends each block as fixed."""
        from dimoo_npu.tasks.understand import EMPTY_ANSWER

        served(body.model)
        pipe = pipeline()
        picture, question = _image_and_question(body.messages)
        values = body.model_dump(exclude={"model", "messages", "stream", "max_tokens"})
        if body.max_tokens is not None and values.get("gen_length") is None:
            values["gen_length"] = body.max_tokens
        values["question"] = question
        request, ids = await asyncio.to_thread(
            _prepared, pipe, "understand", values, {"image": picture}, config.max_steps
        )
        parts = _text_job(pipe, ids, request)
        created, name = int(time.time()), f"chatcmpl-{secrets.token_hex(8)}"
        if not body.stream:
            answer = await run(parts, http)
            if answer is None:
                return Response(status_code=499)
            if not answer:
                raise ApiError(500, EMPTY_ANSWER, "server_error")
            message = {"role": "assistant", "content": answer}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {
                "id": name,
                "object": "chat.completion",
                "created": created,
                "model": config.model_id,
                "choices": [choice],
                "usage": _usage(pipe, ids, answer),
            }
        events = await run(parts, http, stream=True)

        async def sse():
            sent = ""

            def chunk(delta: dict, finish: str | None = None) -> str:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                payload = {
                    "id": name,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": config.model_id,
                    "choices": [choice],
                }
                return f"data: {json.dumps(payload)}\n\n"

            yield chunk({"role": "assistant", "content": ""})
            try:
                async for kind, text in events:
                    new = text[len(sent) :] if text.startswith(sent) else text
                    if new:
                        yield chunk({"content": new})
                        sent = text
                    if kind == "done" and not text:
                        raise ApiError(500, EMPTY_ANSWER, "server_error")
                    if kind == "done":
                        metrics.requests.labels(http.url.path, "200").inc()
                        yield chunk({}, "stop")
                        yield "data: [DONE]\n\n"
            except ApiError as err:
                metrics.requests.labels(http.url.path, str(err.status)).inc()
                yield f"data: {json.dumps({'error': {'message': err.message, 'code': err.status}})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


# ---- helpers of the endpoints ----


def _check_n(n: int, config: ServeConfig) -> None:
    if n > min(config.max_n, config.max_batch):
        raise ApiError(
            400, f"n={n} is over this server's limit of {min(config.max_n, config.max_batch)} images a request"
        )


def _edit_task(form, has_mask: bool) -> tuple[str, dict[str, Any]]:
    """The task of an edits form and its request fields; a field of another task is refused, never ignored."""
    values = form.model_dump(exclude={"model", "n", "response_format", "edit_type"})
    default = "inpaint" if has_mask else "edit"
    task = form.edit_type if form.edit_type in PAINT_TASKS else default if form.edit_type is None else "edit"
    if task == "edit":
        misplaced = sorted(name for name in _BOX if values.pop(name) is not None) + ["mask"] * has_mask
        values["edit_type"] = form.edit_type
    else:
        misplaced = ["cfg_img"] if values.pop("cfg_img") is not None else []
    if misplaced:
        raise ApiError(400, f"{', '.join(misplaced)}: not a field of {task}, drop it", param=misplaced[0])
    return task, values


def _prepared(pipe, task: str, values: dict[str, Any], files: dict[str, bytes], max_steps: int, n: int = 1):
    """The resolved, checked request and its sampler input, as ``dimoo <task>`` makes them from flags and files
    (uploads are written to a temporary folder for the duration). Runs in a worker thread; bad input -> 400.
    Every size-like field and the seeds of all ``n`` images are checked (`requests.check`) before the upload is
    decoded."""
    from dimoo_npu.tasks import check_files

    with tempfile.TemporaryDirectory(prefix="dimoo-serve-") as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
            values[name] = str(Path(folder) / name)
        try:
            given = {k: v for k, v in values.items() if v is not None}
            request = pipe.resolve(requests.from_mapping(task, given, "the request"), count=n)
            steps = getattr(request, "timesteps", None) or getattr(request, "steps", None)
            if steps > max_steps:
                raise ApiError(400, f"{steps} sampling steps is over this server's limit of {max_steps}: ask for fewer")
            check_files(request)
            return request, pipe.prepare(request)
        except DimooError as err:
            raise ApiError(400, _without_paths(str(err), folder, files)) from None


def _without_paths(message: str, folder: str, files: dict[str, bytes]) -> str:
    """A message about an upload names its form field (``the uploaded image``), never the server's temporary file."""
    for name in files:
        message = message.replace(str(Path(folder) / name), f"the uploaded {name}")
    return message.replace(folder, "the uploads")


def _done(job: Job) -> bool:
    return job.task is not None and (getattr(job.task, "finished", False) or getattr(job.task, "done", False))


def _image_job(pipe, prepared, request: requests.ImageRequest, n: int) -> dict[str, Any]:
    """How the loop makes the task of an image request (n rows, seeds seed + i) and turns it into PNGs."""
    from dimoo_npu.sampling.image import image_task

    settings = request.image_settings()
    seed = request.seed if request.seed is not None else secrets.randbits(62)
    requests.check(dataclasses.replace(request, seed=seed), count=n)  # seed + n - 1 must be a valid seed too
    offset = pipe.tokens["image_offset"]

    def make():
        device = pipe.device
        return image_task(
            pipe.model,
            [prepared.prompt.to(device)] * n,
            uncond_ids=_repeat(pipe._prefixes([prepared], "uncond", settings.cfg_scale), n),
            uncond_image_ids=_repeat(pipe._prefixes([prepared], "uncond_image", settings.cfg_img), n),
            generator=[pipe._generator(seed + i) for i in range(n)],
            **settings.sampler_kwargs(),
        )

    def finish(task) -> list[Image.Image]:
        codes = (task.cells.cpu() - offset).reshape(n, *prepared.grid)
        return [pipe.image_tokenizer.decode_images(grid[None])[0] for grid in codes]

    tokens = n * sum(prepared.lengths())  # every row of every guidance copy
    return {"rows": n, "make": make, "finish": finish, "tokens": tokens}


def _repeat(prefixes: list | None, n: int) -> list | None:
    return None if prefixes is None else prefixes * n


def _text_job(pipe, ids, request: requests.UnderstandRequest) -> dict[str, Any]:
    """How the loop makes the task of a question and turns its rows into the answer (so far, at each block)."""
    from dimoo_npu.sampling.text import text_task
    from dimoo_npu.tasks import understand

    settings = request.text_settings()
    seed = request.seed if request.seed is not None else secrets.randbits(62)
    eoa = pipe.tokens["eoa"]

    def make():
        return text_task(
            pipe.model, [ids.to(pipe.device)], generator=pipe._generator(seed), **settings.sampler_kwargs()
        )

    def answer(task) -> str:
        row = task.x[0].clone()
        row[task.answer[0, task.block * settings.block_length :]] = eoa  # blocks not fixed yet end the answer
        return understand.decode_answer(pipe.encoder, ids, row.cpu())

    tokens = int(ids.shape[-1]) * (2 if settings.cfg_scale > 0 else 1)  # the answer's MASKs are in ids
    return {"rows": 1, "make": make, "finish": answer, "on_block": answer, "tokens": tokens}


def _usage(pipe, prompt_ids, answer: str) -> dict[str, int]:
    """OpenAI's token counts: the whole prompt (image codes included) and the answer's text tokens."""
    prompt = int(prompt_ids.shape[-1])
    completion = len(pipe.encoder.text_tokenizer.encode(answer, add_special_tokens=False))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _images_response(images: list[Image.Image] | None) -> dict:
    if images is None:
        return Response(status_code=499)
    data = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return {"created": int(time.time()), "data": data}


def _image_and_question(messages: list) -> tuple[bytes, str]:
    """The last user message's picture (bytes of a base64 data URI) and its text."""
    user = next((m for m in reversed(messages) if m.role == "user"), None)
    if user is None or isinstance(user.content, str):
        raise ApiError(400, "the last user message needs an image_url part (data URI) and a text part")
    urls = [p.image_url.url for p in user.content if p.type == "image_url" and p.image_url is not None]
    texts = [p.text for p in user.content if p.type == "text" and p.text]
    if len(urls) != 1 or not texts:
        raise ApiError(
            400, "send one image_url part (data:image/png;base64,...) and a text question in the user message"
        )
    head, _, data = urls[0].partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise ApiError(400, "image_url must be a data URI (data:image/png;base64,...): remote URLs are not fetched")
    try:
        return base64.b64decode(data, validate=True), " ".join(texts)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url's data is not valid base64") from None
