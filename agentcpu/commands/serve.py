"""`agentcpu serve --model PATH`: the OpenAI-compatible HTTP server (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from agentcpu.commands.engine_args import add_engine_arguments, engine_options
from agentcpu.commands.tool_args import add_tool_arguments, tool_options

API_KEY_ENV = "AGENTCPU_API_KEY"
CACHE_HOME_ENV = "XDG_CACHE_HOME"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, model_required=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="most requests in flight (waiting + running) before answering 429",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model id clients use (default: the model directory's name; 'default' also works)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    add_tool_arguments(parser)
    _add_response_store_arguments(parser)


def _add_response_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Bounds left unset take `ServerSettings`' defaults."""
    parser.add_argument(
        "--response-store-dir",
        default=str(default_response_store_dir()),
        help="where /v1/responses keeps stored responses across restarts "
        "(default: %(default)s; '' keeps them in memory only)",
    )
    parser.add_argument(
        "--response-store-max-count",
        type=int,
        help="most stored responses; the least recently used go first (default: 10,000)",
    )
    parser.add_argument(
        "--response-store-max-mb",
        type=float,
        help="most MiB of stored responses (JSON), least recently used go first (default: 256)",
    )
    parser.add_argument(
        "--response-store-ttl-s",
        type=float,
        help="a stored response unused this many seconds is deleted (default: 30 days)",
    )


def _response_store_bounds(args: argparse.Namespace) -> dict:
    names = ("response_store_max_count", "response_store_max_mb", "response_store_ttl_s")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def default_response_store_dir() -> Path:
    cache = os.environ.get(CACHE_HOME_ENV) or "~/.cache"
    return Path(cache).expanduser() / "agentcpu" / "responses"


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from agentcpu.engine.async_engine import AsyncEngine
    from agentcpu.engine.llm_engine import LLMEngine
    from agentcpu.hardware.allocator import freeze_loaded_objects
    from agentcpu.hardware.threads import configure_threads
    from agentcpu.models.loading import resolve_engine_config
    from agentcpu.server import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.model is None:  # the embedded demo model: works on a fresh machine, no download
        from agentcpu.demo.runner import DEMO_MODEL_DIR

        args.model = str(DEMO_MODEL_DIR)
    settings = ServerSettings.for_model(
        args.served_model_name or Path(args.model).resolve().name,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        response_store_dir=args.response_store_dir or None,
        **_response_store_bounds(args),
    )
    tools = _server_tools(args)  # a bad --tools module or --mcp file fails before the model loads
    config = resolve_engine_config(args.model, **engine_options(args))
    configure_threads(config.threads or None)
    front = AsyncEngine(LLMEngine(config), own_thread=False)
    freeze_loaded_objects()  # the loaded model stays out of the collector's walks
    app = create_app(front, settings, tools=tools)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    )
    return serve_with_engine_on_main_thread(server, front)


def serve_with_engine_on_main_thread(server, front) -> int:
    """HTTP on a background thread, the engine loop on this (the main) thread: see
    `engine/async_engine.py` for why the engine wants the process's initial thread.
    SIGINT / SIGTERM stop both; a server that fails to start (port taken) stops the
    engine and makes the exit status 1."""
    import signal

    from agentcpu.engine.async_engine import run_beside_engine

    def stop_http() -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, lambda signum, frame: stop_http())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_beside_engine(front, server.run, name="agentcpu-http", stop_work=stop_http)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _server_tools(args: argparse.Namespace):
    from agentcpu.server.server_tools import ServerTools, ServerToolsConfig

    config = ServerToolsConfig(**tool_options(args))
    return ServerTools(config) if config.enabled else None
