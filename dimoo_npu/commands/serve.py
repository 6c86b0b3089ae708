"""``dimoo serve``: the OpenAI-compatible server (`dimoo_npu.serve`); FastAPI and uvicorn load only here."""

from __future__ import annotations

import argparse
import logging
import signal

from dimoo_npu import envs
from dimoo_npu.commands.quantize import add_quantize_argument
from dimoo_npu.errors import ConfigError, InputError

logger = logging.getLogger("dimoo")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--checkpoint", help="DiMOO checkpoint folder or cached Hugging Face id; default: the bundled model"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | npu")
    parser.add_argument("--max-batch", type=int, default=8, help="prompt rows sampled together over all groups")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch; more get 429")
    parser.add_argument("--max-n", type=int, default=4, help="most images one request may ask for")
    parser.add_argument("--max-steps", type=int, default=1024, help="most sampling steps a request may ask for")
    parser.add_argument("--max-body-mb", type=float, default=16, help="largest request body (MB); larger get 413")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: DIMOO_API_KEY; unset: none)")
    parser.add_argument(
        "--compile", action="store_true", help="graph mode (torch.compile); groups pad to fixed batch buckets"
    )
    add_quantize_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from dimoo_npu.serve.app import ServeConfig, create_app
    except ImportError as err:
        raise ConfigError(
            f"dimoo serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'"
        ) from None
    from dimoo_npu.pipeline import default_checkpoint

    for name in ("max_batch", "max_queue", "max_n", "max_steps", "port"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {args.max_body_mb} must be positive")
    config = ServeConfig(
        checkpoint=str(args.checkpoint or default_checkpoint()),
        device=args.device,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_n=args.max_n,
        max_steps=args.max_steps,
        api_key=args.api_key or envs.api_key(),
        compile=args.compile or envs.compile_enabled(),
        quantize=args.quantize,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
    )
    logger.info("serving %s on http://%s:%d (OpenAI API under /v1)", config.checkpoint, args.host, args.port)
    # SIGTERM/SIGINT: uvicorn stops listening and waits for the running requests; the app's shutdown drains the
    # scheduler (queued and running jobs finish); then the process exits 0.
    settings = uvicorn.Config(create_app(config), host=args.host, port=args.port, log_level=envs.log_level().lower())
    _server_type()(settings).run()
    return 0


def _server_type():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (the process then dies of it, exit -15); a drained
        server has done what SIGTERM asks, so it exits 0 as a service manager expects."""

        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:
                captured.remove(sig)

    return DrainingServer
