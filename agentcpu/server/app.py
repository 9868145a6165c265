"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine.

    app = create_app(AsyncEngine(engine), ServerSettings.for_model("qwen2.5-7b"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app only parses, renders templates, tokenizes and formats; the engine thread does
the compute. Errors map to HTTP in `server/errors.py`, metrics live in the app's own
registry (`app.state.server.metrics`).
"""

from __future__ import annotations

from fastapi import FastAPI

import agentcpu
from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.server import chat, completions, meta, responses, sessions, tooling
from agentcpu.server.auth import APIKeyMiddleware
from agentcpu.server.errors import install_error_handlers
from agentcpu.server.metrics import ServerMetrics
from agentcpu.server.openapi import install_openapi
from agentcpu.server.response_store import ResponseStore
from agentcpu.server.server_tools import ServerTools, install_lifespan
from agentcpu.server.settings import ServerSettings
from agentcpu.server.state import Admission, ServerState


def create_app(
    front: AsyncEngine, settings: ServerSettings | None = None, tools: ServerTools | None = None
) -> FastAPI:
    """`tools`: what `server_tools` requests may run; started and closed by the app's lifespan."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="agentcpu",
        version=getattr(agentcpu, "__version__", "0"),
        description="OpenAI-compatible inference server for CPUs",
    )
    metrics = ServerMetrics(front.engine, settings.model_id)
    tokenizer = front.engine.tokenizer
    app.state.server = ServerState(
        front=front,
        settings=settings,
        metrics=metrics,
        admission=Admission(settings.max_queue, settings.retry_after_s, metrics),
        tool_format=tooling.detect_tool_format(tokenizer.chat_template if tokenizer else None),
        tools=tools,
        responses=ResponseStore(
            settings.response_store_dir,
            max_count=settings.response_store_max_count,
            max_bytes=settings.response_store_max_bytes,
            ttl_s=settings.response_store_ttl_s,
        ),
    )
    for module in (chat, completions, meta, sessions, responses):
        app.include_router(module.router)
    install_error_handlers(app)
    if tools is not None:
        install_lifespan(app, tools)
    install_openapi(app, settings.served_model_names, bearer_auth=settings.api_key is not None)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    return app
