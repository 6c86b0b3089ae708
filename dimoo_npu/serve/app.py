"""The HTTP API of `dimoo serve`: OpenAI's images and chat endpoints on the continuous-batching `Scheduler`.

Request bodies are generated from the task dataclasses of `dimoo_npu.requests` (their fields, types and help), with
only OpenAI's wire names added (``n``, ``size``, ``response_format``, ``model``, chat ``messages`` and ``stream``);
values are then resolved and checked by `dimoo_npu.requests` as for ``dimoo t2i``, so a seeded request gives what
the command gives. Every error is a JSON body ``{"error": {"message", "type", "code"}}``: 400 for a bad value, 401
without the API key, 413 for a body over the limit, 422 for a malformed body, 429 (with Retry-After) when the queue
is full, 503 while the model loads or the server drains; never a traceback.
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

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

from dimoo_npu import requests
from dimoo_npu.errors import DimooError
from dimoo_npu.serve.metrics import Metrics
from dimoo_npu.serve.scheduler import Job, NotAccepting, QueueFull, Scheduler

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    """What `dimoo serve` was started with."""

    checkpoint: str
    device: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    compile: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    max_n: int = 4
    max_steps: int = 1024

    @property
    def model_id(self) -> str:
        """The name `/v1/models` lists: a hub repo id as given, a checkpoint folder by its name (not its path)."""
        path = Path(self.checkpoint)
        return path.name if path.is_dir() else self.checkpoint


# ---- request bodies, generated from dimoo_npu.requests ----

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


_FORBID = ConfigDict(extra="forbid")
# JSON bodies are typed as batch-file lines are: {"n": true} or {"n": "2"} is refused, not read as 1 or 2.
_STRICT = ConfigDict(extra="forbid", strict=True)
_WIRE = {
    "model": (str | None, Field(None, description="ignored: this server serves one model")),
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
EditForm = create_model(
    "EditForm",
    **_fields_of(requests.EditRequest, requests.InpaintRequest, skip=_NOT_ON_THE_WIRE | {"edit_type"}),
    edit_type=(
        str | None,
        Field(None, description="inpaint or outpaint (default inpaint with a mask), else an edit type (default edit)"),
    ),
    **{k: v for k, v in _WIRE.items() if k != "size"},
)


class ImageURL(BaseModel):
    model_config = _FORBID
    url: str = Field(description="data:image/png;base64,... (remote URLs are not fetched)")
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = _FORBID
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]


ChatBody = create_model(
    "ChatBody",
    __config__=ConfigDict(extra="ignore", strict=True),  # OpenAI clients send more options than this model has
    **_fields_of(requests.UnderstandRequest),
    model=_WIRE["model"],
    messages=(list[ChatMessage], Field(min_length=1, description="a user message with an image_url and a question")),
    stream=(bool, Field(False, description="send each answer block as it is fixed (server-sent events)")),
    max_tokens=(int | None, Field(None, ge=1, description="OpenAI's name for gen_length")),
)


# ---- errors ----


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return _error(err.status, err.message, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        metrics.requests.labels(request.url.path, "422").inc()
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
        return _error(422, f"malformed request: {details}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, str(err.detail), "http_error", getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details", "server_error")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before it is read in full."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes: send a smaller image", "too_large")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope, receive, send):
        response = _error(413, f"request body over {self.limit} bytes: send a smaller image", "too_large")
        await response(scope, receive, send)


# ---- the app ----


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app; its lifespan starts the scheduler (which loads the model) and drains it on shutdown."""
    metrics = Metrics()
    state: dict[str, Any] = {}

    def load():
        from dimoo_npu.pipeline import DiMOOPipeline

        pipeline = DiMOOPipeline.from_pretrained(config.checkpoint, config.device, compile=config.compile)
        state["pipeline"] = pipeline
        return pipeline.model

    buckets = tuple(2**i for i in range(12) if 2**i < config.max_batch) + (config.max_batch,) if config.compile else ()
    sched = Scheduler(load, config.max_batch, config.max_queue, buckets, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        yield
        logger.info("draining: finishing %d running and queued request(s)", len(sched.pending) + sched.busy_rows())
        await asyncio.to_thread(sched.stop)

    app = FastAPI(
        title="dimoo serve",
        version="1",
        description="Lumina-DiMOO behind OpenAI's images and chat APIs, with step-level continuous batching.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    _install_error_handlers(app, metrics)

    async def authorised(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {config.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error")

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

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "owned_by": "dimoo"}]}

    @app.post("/v1/images/generations", dependencies=[Depends(authorised)])
    async def generations(body: ImageGenerationBody, http: Request) -> dict:  # type: ignore[valid-type]
        """Text-to-image; ``size`` is WxH (multiples of 16), ``seed`` makes it reproducible (image i: seed + i)."""
        pipe = pipeline()
        values = body.model_dump(exclude={"model", "n", "size", "response_format"})
        if body.size is not None:
            values["width"], values["height"] = (int(v) for v in body.size.split("x"))
        _check_n(body.n, config)
        request, prepared = await asyncio.to_thread(_prepared, pipe, "t2i", values, {}, config.max_steps, body.n)
        return _images_response(await run(_image_job(pipe, prepared, request, body.n), http))

    @app.post("/v1/images/edits", dependencies=[Depends(authorised)])
    async def edits(
        http: Request,
        form: Annotated[EditForm, Form()],  # type: ignore[valid-type]
        image: Annotated[UploadFile, File(description="the picture to edit (PNG or JPEG)")],
        mask: Annotated[UploadFile | None, File(description="white = regenerate (inpaint / outpaint)")] = None,
    ) -> dict:
        """Editing (``edit_type``), or inpainting / outpainting (edit_type inpaint or outpaint; default inpaint
        when a ``mask`` is sent) of the mask's white region, else of the centred box."""
        pipe = pipeline()
        values = form.model_dump(exclude={"model", "n", "response_format", "edit_type"})
        task = form.edit_type if form.edit_type in PAINT_TASKS else "inpaint" if mask is not None else "edit"
        files = {"image": await image.read()}
        if task == "edit":
            values = {k: v for k, v in values.items() if k not in {"mask_h_ratio", "mask_w_ratio"}}
            values["edit_type"] = form.edit_type
        else:
            values = {k: v for k, v in values.items() if k not in {"cfg_img"}}
            if mask is not None:
                files["mask"] = await mask.read()
        _check_n(form.n, config)
        request, prepared = await asyncio.to_thread(_prepared, pipe, task, values, files, config.max_steps, form.n)
        return _images_response(await run(_image_job(pipe, prepared, request, form.n), http))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: ChatBody, http: Request):  # type: ignore[valid-type]
        """Understanding: the last user message's image (data URI) and text; ``stream`` sends each block as fixed."""
        from dimoo_npu.tasks.understand import EMPTY_ANSWER

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
            raise ApiError(400, str(err)) from None


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

    return {"rows": n, "make": make, "finish": finish}


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
        return text_task(pipe.model, ids.to(pipe.device), generator=pipe._generator(seed), **settings.sampler_kwargs())

    def answer(task) -> str:
        row = task.row.clone()
        row[task.answer[task.block * settings.block_length :]] = eoa  # blocks not fixed yet end the answer
        return understand.decode_answer(pipe.encoder, ids, row.cpu())

    return {"rows": 1, "make": make, "finish": answer, "on_block": answer}


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
