"""MCP servers' tools as agentcpu tools (`agentcpu serve --mcp CONFIG`), via the `mcp` package.

CONFIG is the file format MCP clients share:

    {"mcpServers": {
        "files":  {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."],
                   "env": {"KEY": "value"}, "cwd": "/srv"},
        "search": {"url": "http://localhost:8000/mcp", "headers": {"Authorization": "Bearer ..."}},
        "old":    {"command": "...", "disabled": true}}}

An entry with "command" is started as a subprocess and spoken to over stdio; one with
"url" over streamable HTTP (the SSE-only transport is not supported). Each server's
session stays open for the toolset's lifetime: it is owned by one background task, so
opening and closing may happen in different tasks (e.g. a server's startup and shutdown).

Tool names: a server's tool keeps its own name (made valid for OpenAI: other characters
become "_", at most 64) unless that name is taken by a tool already registered or is
offered by more than one MCP server; then every clashing MCP tool is named
"<server>__<tool>". A clash that prefixing cannot resolve is a startup error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from agentcpu.tools.registry import (
    Tool,
    ToolError,
    ToolRegistrationError,
    make_validator,
    sanitize_tool_name,
)

log = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
HTTP_CONNECT_TIMEOUT_S = 30.0
# An MCP server may hold a response stream open while a long tool runs.
HTTP_READ_TIMEOUT_S = 300.0
MAX_LIST_PAGES = 100
HTTP_TRANSPORTS = (None, "http", "streamable-http", "streamable_http", "streamableHttp")


class MCPConfigError(ToolRegistrationError):
    """The --mcp config file is missing, not JSON, or not in the mcpServers shape."""


class MCPConnectionError(ToolError):
    """An MCP server could not be started, reached, or spoken to."""


@dataclass(frozen=True)
class MCPServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def load_mcp_config(path: str | Path) -> list[MCPServerConfig]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise MCPConfigError(f"--mcp {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise MCPConfigError(f"--mcp {path}: not valid JSON ({e})") from None
    return parse_mcp_config(data, source=str(path))


def parse_mcp_config(data: Any, *, source: str = "MCP config") -> list[MCPServerConfig]:
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise MCPConfigError(f'{source}: expected {{"mcpServers": {{"<name>": {{...}}}}}}')
    configs = []
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise MCPConfigError(f"{source}: server {name!r} must be an object")
        if entry.get("disabled"):
            continue
        configs.append(_server_config(name, entry, source))
    return configs


def _server_config(name: str, entry: dict[str, Any], source: str) -> MCPServerConfig:
    where = f"{source}: server {name!r}"
    transport = entry.get("type", entry.get("transport"))
    env, headers = entry.get("env") or {}, entry.get("headers") or {}
    for label, mapping in (("env", env), ("headers", headers)):
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise MCPConfigError(f"{where}: {label} must map names to strings")
    if "url" in entry:
        if transport not in HTTP_TRANSPORTS:
            raise MCPConfigError(
                f"{where}: transport {transport!r} is not supported (streamable HTTP is)"
            )
        return MCPServerConfig(name=name, url=str(entry["url"]), headers=dict(headers))
    command, args = entry.get("command"), entry.get("args") or []
    if not isinstance(command, str) or not command:
        raise MCPConfigError(f'{where}: needs "command" (stdio) or "url" (streamable HTTP)')
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise MCPConfigError(f"{where}: args must be a list of strings")
    return MCPServerConfig(
        name=name, command=command, args=tuple(args), env=dict(env), cwd=entry.get("cwd")
    )


class MCPServerConnection:
    """One MCP server's session, opened and closed by a task of its own."""

    def __init__(
        self,
        config: MCPServerConfig,
        *,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        errlog: TextIO | None = None,
    ):
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.errlog = errlog
        self._client: Any = None
        self._task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._stop: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def start(self) -> list[Any]:
        """Connect and list the server's tools (mcp `Tool` objects)."""
        if self._task is not None:
            raise MCPConnectionError(f"MCP server {self.config.name!r} was already started")
        self._ready = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._serve(), name=f"mcp-{self.config.name}")
        try:
            async with asyncio.timeout(self.startup_timeout_s):
                return await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            raise MCPConnectionError(
                f"MCP server {self.config.name!r} did not start within {self.startup_timeout_s:g} s"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> str:
        client = self._client
        if client is None:
            raise MCPConnectionError(f"MCP server {self.config.name!r} is not connected")
        from mcp.shared.exceptions import MCPError

        try:
            result = await client.call_tool(name, arguments)
        except MCPError as e:
            raise MCPConnectionError(
                f"MCP server {self.config.name!r}: {e.error.message}"
            ) from None
        return result_text(result)

    async def close(self) -> None:
        task, self._client = self._task, None
        if task is None or task.done():
            return
        if self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None:
            self._stop.set()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
            if done:
                return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _serve(self) -> None:
        from mcp import Client

        try:
            async with contextlib.AsyncExitStack() as stack:
                transport = await self._transport(stack)
                client = await stack.enter_async_context(Client(transport))
                tools = await _list_all_tools(client)
                self._client = client
                if not self._ready.done():
                    self._ready.set_result(tools)
                await self._stop.wait()
        except Exception as e:  # ExceptionGroups from anyio task groups included
            error = MCPConnectionError(f"MCP server {self.config.name!r}: {_describe(e)}")
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                log.warning("%s (its tools now fail until restart)", error)
        finally:
            self._client = None
            if not self._ready.done():  # closed (cancelled) while still starting
                self._ready.set_exception(
                    MCPConnectionError(f"MCP server {self.config.name!r} was closed while starting")
                )

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        cfg = self.config
        if cfg.url is not None:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            timeout = httpx2.Timeout(HTTP_CONNECT_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S)
            http = await stack.enter_async_context(
                httpx2.AsyncClient(headers=cfg.headers, timeout=timeout)
            )
            return streamable_http_client(cfg.url, http_client=http)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(
            command=cfg.command, args=list(cfg.args), env=cfg.env or None, cwd=cfg.cwd
        )
        return stdio_client(params, errlog=self.errlog or sys.stderr)


async def _list_all_tools(client: Any) -> list[Any]:
    tools, cursor = [], None
    for _ in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _describe(error: BaseException) -> str:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


def result_text(result: Any) -> str:
    """An MCP CallToolResult as text; a result the server marked as an error raises ToolError."""
    parts = [_block_text(block) for block in result.content or []]
    if not parts and result.structured_content is not None:
        parts = [json.dumps(result.structured_content, ensure_ascii=False)]
    text = "\n".join(parts)
    if result.is_error:
        raise ToolError(text or "the MCP tool reported an error")
    return text


def _block_text(block: Any) -> str:
    kind = getattr(block, "type", "unknown")
    if kind == "text":
        return block.text
    if kind in ("image", "audio"):
        return f"[{kind}: {block.mime_type}, {len(block.data) * 3 // 4} bytes]"
    if kind == "resource":
        resource = block.resource
        text = getattr(resource, "text", None)
        return text if text is not None else f"[resource {resource.uri} ({resource.mime_type})]"
    if kind == "resource_link":
        return f"[resource link: {block.uri}]"
    return f"[{kind} content]"


class MCPTool(Tool):
    """A tool of an MCP server; `remote_name` is its name on the server."""

    def __init__(self, connection: MCPServerConnection, listing: Any, name: str):
        self.connection = connection
        self.remote_name = listing.name
        self.name = name
        self.description = listing.description or listing.title or ""
        self.parameters = _input_schema(listing)

    async def call(self, arguments: dict[str, Any]) -> str:
        return await self.connection.call_tool(self.remote_name, arguments)


class MCPToolset:
    """All servers of one config: `tools = await toolset.start(...)`, later `await toolset.close()`."""

    def __init__(
        self,
        configs: Iterable[MCPServerConfig],
        *,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        errlog: TextIO | None = None,
    ):
        self.connections = [
            MCPServerConnection(c, startup_timeout_s=startup_timeout_s, errlog=errlog)
            for c in configs
        ]
        self.tools: list[MCPTool] = []

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> MCPToolset:
        return cls(load_mcp_config(path), **kwargs)

    async def start(self, reserved_names: Iterable[str] = ()) -> list[MCPTool]:
        """Connect to every server (concurrently) and return their tools, named as the
        module docstring says; `reserved_names` are the names already registered."""
        results = await asyncio.gather(
            *(c.start() for c in self.connections), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.close()
            raise failures[0]
        self.tools = _name_tools(self.connections, results, set(reserved_names))
        return self.tools

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections))

    async def __aenter__(self) -> MCPToolset:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _name_tools(
    connections: list[MCPServerConnection], listings: list[list[Any]], reserved: set[str]
) -> list[MCPTool]:
    usable = [
        (conn, t)
        for conn, tools in zip(connections, listings, strict=True)
        for t in tools
        if _schema_ok(conn, t)
    ]
    counts = Counter(sanitize_tool_name(t.name) for _, t in usable)
    taken, named = set(reserved), []
    for conn, listing in usable:
        name = sanitize_tool_name(listing.name)
        if counts[name] > 1 or name in reserved:
            name = sanitize_tool_name(f"{conn.config.name}__{listing.name}")
        if name in taken:
            raise ToolRegistrationError(
                f"MCP server {conn.config.name!r}: tool {listing.name!r} clashes with another tool as {name!r}"
            )
        taken.add(name)
        named.append(MCPTool(conn, listing, name))
    return named


def _input_schema(listing: Any) -> dict[str, Any]:
    return {"type": "object", **(listing.input_schema or {})}


def _schema_ok(conn: MCPServerConnection, listing: Any) -> bool:
    probe = Tool()
    probe.name, probe.parameters = listing.name, _input_schema(listing)
    try:
        make_validator(probe)
    except ToolRegistrationError as e:
        log.warning("MCP server %r: skipping tool %r: %s", conn.config.name, listing.name, e)
        return False
    return True
