"""``dimoo serve``: the OpenAI-compatible server (`dimoo_npu.serve`); FastAPI and uvicorn load only here."""

from __future__ import annotations

import argparse
import gc
import logging
import math
from typing import TYPE_CHECKING

from dimoo_npu.commands.quantize import add_quantize_argument
from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import ConfigError, InputError

if TYPE_CHECKING:
    from dimoo_npu.serve.app import ServeConfig

logger = logging.getLogger("dimoo")

COUNTS = ("max_batch", "max_queue", "max_n", "max_steps", "port", "max_concurrent_tokens")
SECONDS = ("header_timeout", "body_timeout")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--checkpoint", help="DiMOO checkpoint folder or cached Hugging Face id; default: the bundled model"
    )
    parser.add_argument("--lora", help="LoRA adapter folder (peft format) merged into the weights at load")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    parser.add_argument("--max-batch", type=int, default=8, help="prompt rows sampled together over all groups")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    parser.add_argument(
        "--max-concurrent-tokens",
        type=int,
        help="tokens of queued and running work (rows x sequence length, guidance copies included); more get 429 "
        "(default: DIMOO_MAX_CONCURRENT_TOKENS, else --max-batch x the checkpoint's length cap)",
    )
    parser.add_argument("--max-n", type=int, default=4, help="most images one request may ask for")
    parser.add_argument("--max-steps", type=int, default=1024, help="most sampling steps a request may ask for")
    parser.add_argument("--max-body-mb", type=float, default=16, help="largest request body (MB); larger get 413")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: DIMOO_API_KEY; unset: none)")
    parser.add_argument(
        "--header-timeout", type=float, default=10, help="seconds a client has to send its request headers"
    )
    parser.add_argument("--body-timeout", type=float, default=60, help="seconds a client has to send its body (408)")
    parser.add_argument(
        "--grace", type=float, default=30, help="SIGTERM: seconds running requests may finish before they are cancelled"
    )
    parser.add_argument(
        "--compile", action="store_true", help="graph mode (torch.compile); groups pad to fixed batch buckets"
    )
    from dimoo_npu.commands.generate import add_request_arguments
    from dimoo_npu.settings.requests import UNDERSTAND_SPEED_FIELDS

    speed = parser.add_argument_group("chat answers' defaults (a request's own fields win)")
    add_request_arguments(speed, "understand", UNDERSTAND_SPEED_FIELDS)
    add_quantize_argument(parser)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Every setting checked before anything binds or loads: a bad flag, variable or checkpoint exits 2 here
    instead of leaving a server up that answers 503."""
    from dimoo_npu.checkpoint import resolve_target
    from dimoo_npu.pipeline import default_checkpoint
    from dimoo_npu.serve.app import ServeConfig, default_token_limit

    given = args.max_concurrent_tokens
    tokens = given if given is not None else envs.max_concurrent_tokens()
    for name in COUNTS:
        value = tokens if name == "max_concurrent_tokens" else getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value} must be at least 1")
    for name, value in ((n, getattr(args, n)) for n in (*SECONDS, "max_body_mb")):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--{name.replace('_', '-')} {value} must be a positive number")
    if not (math.isfinite(args.grace) and args.grace >= 0):
        raise InputError(f"--grace {args.grace} must be a number of seconds, 0 or more")
    checkpoint = str(args.checkpoint or default_checkpoint())
    understand_defaults = _understand_defaults(args)
    resolve_target(args.device)  # a device this machine does not have is named now, not after binding
    derived = default_token_limit(checkpoint, args.max_batch)  # reads config.json and DIMOO_MAX_LENGTH: both checked
    if args.lora is not None:  # a mismatched adapter is refused before the server binds
        from dimoo_npu.checkpoint import load_model

        load_model(checkpoint, device="meta", lora=args.lora)
    return ServeConfig(
        checkpoint=checkpoint,
        lora=args.lora,
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_steps=args.max_steps,
        api_key=args.api_key or envs.api_key(),
        compile=args.compile or envs.compile_enabled(),
        quantize=args.quantize,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_concurrent_tokens=tokens or derived,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        grace_s=args.grace,
        understand_defaults=understand_defaults,
    )


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from dimoo_npu.serve.http_server import build_server
    except ImportError as err:
        raise ConfigError(
            f"dimoo serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'"
        ) from None
    config = serve_config(args)
    logger.info(
        "serving %s on http://%s:%d (OpenAI API under /v1; at most %d tokens of work at a time)",
        config.checkpoint,
        args.host,
        args.port,
        config.max_concurrent_tokens,
    )
    # SIGTERM/SIGINT: uvicorn stops listening; running requests have --grace seconds, then are cancelled at a step
    # boundary (503); the process exits 0 (see dimoo_npu.serve.http_server). A model that fails to load stops it.
    server = build_server(config, args.host, args.port)
    server.run()
    if server.scheduler.load_error is not None:
        raise server.scheduler.load_error
    # The interpreter's last garbage collections walk the model's and tokenizers' ~400k objects (seconds on a busy
    # CPU, after the drain); nothing needs collecting any more, so the process ends without them.
    gc.freeze()
    return 0


def _understand_defaults(args: argparse.Namespace) -> dict:
    """The chat answers' speed flags that were given, checked before the model loads."""
    from dimoo_npu.settings.generation_settings import check_cache_settings
    from dimoo_npu.settings.requests import UNDERSTAND_SPEED_FIELDS, UnderstandRequest, resolve

    given = {name: getattr(args, name) for name in UNDERSTAND_SPEED_FIELDS if getattr(args, name) is not None}
    speed = resolve(UnderstandRequest(**given))
    check_cache_settings(speed.kv_cache, speed.parallel_threshold)
    return given
