"""The tools one server runs for agents (`agentcpu serve --tools / --mcp / --python-tool`).

`ServerTools` holds the registry and the one `ToolExecutor` (worker pool, timeouts,
latency averages) that every `server_tools` request shares. Python tools and the
sandboxed `python` tool are registered when it is built, so a bad module fails before
the model loads; MCP servers need the server's event loop, so they are connected by the
app's lifespan (`install_lifespan`) and closed with it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from fastapi import FastAPI

from agentcpu.server.errors import FieldError
from agentcpu.server.protocol import MAX_AGENT_TURNS
from agentcpu.tools.executor import DEFAULT_MAX_WORKERS, DEFAULT_TIMEOUT_S, ToolExecutor
from agentcpu.tools.mcp_client import MCPToolset
from agentcpu.tools.python_tools import register_module
from agentcpu.tools.registry import ToolRegistrationError, ToolRegistry
from agentcpu.tools.sandbox import SandboxTool

log = logging.getLogger(__name__)

DEFAULT_MAX_AGENT_TURNS = 8
ALL_TOOLS = "all"


@dataclass(frozen=True)
class ServerToolsConfig:
    """`modules`: `--tools` values (dotted names or .py paths); `mcp_config`: a
    `{"mcpServers": ...}` file; `max_turns`: a run's turns when a request sets none."""

    modules: tuple[str, ...] = ()
    mcp_config: str | None = None
    python_tool: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_turns: int = DEFAULT_MAX_AGENT_TURNS
    max_workers: int = DEFAULT_MAX_WORKERS

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ToolRegistrationError(f"--tool-timeout-s must be > 0, got {self.timeout_s}")
        if not 1 <= self.max_turns <= MAX_AGENT_TURNS:
            raise ToolRegistrationError(
                f"--max-agent-turns must be in 1..{MAX_AGENT_TURNS}, got {self.max_turns}"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.modules or self.mcp_config or self.python_tool)


class ServerTools:
    """The registry and executor of one server; `start()` / `close()` bracket its life."""

    def __init__(self, config: ServerToolsConfig):
        self.config = config
        self.registry = ToolRegistry()
        for spec in config.modules:
            register_module(self.registry, spec)
        if config.python_tool:
            self.registry.register(SandboxTool())
        # read now, so a bad config fails before the model loads; connected in start()
        self.mcp = MCPToolset.from_file(config.mcp_config) if config.mcp_config else None
        self.executor = ToolExecutor(
            self.registry, max_workers=config.max_workers, timeout_s=config.timeout_s
        )

    @property
    def max_turns(self) -> int:
        return self.config.max_turns

    async def start(self) -> None:
        """Connect the MCP servers and register their tools (fails if any cannot start)."""
        if self.mcp is not None:
            tools = await self.mcp.start(reserved_names=self.registry.names())
            self.registry.extend(tools)
        log.info("server tools: %s", ", ".join(self.registry.names()) or "none")

    async def close(self) -> None:
        self.executor.close()
        if self.mcp is not None:
            await self.mcp.close()

    def resolve(self, requested: str | list[str]) -> list[str]:
        """The names a request's `server_tools` field means; 400 naming the field if any
        is not registered."""
        available = self.registry.names()
        if not available:
            raise FieldError("server_tools", "this server has no tools registered")
        if requested == ALL_TOOLS:
            return available
        unknown = [name for name in requested if name not in self.registry]
        if unknown:
            raise FieldError(
                "server_tools", f"unknown tool(s) {unknown}; this server runs {available}"
            )
        return list(dict.fromkeys(requested))


def require_tools(tools: ServerTools | None) -> ServerTools:
    if tools is None:
        raise FieldError(
            "server_tools",
            "this server runs no tools: start it with --tools, --mcp or --python-tool",
        )
    return tools


def install_lifespan(app: FastAPI, tools: ServerTools) -> None:
    """Start `tools` before the app's own lifespan (if any) and close them after it."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: FastAPI):
        try:
            await tools.start()
            async with inner(app_) as state:
                yield state
        finally:
            await tools.close()

    app.router.lifespan_context = lifespan
