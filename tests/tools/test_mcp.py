"""MCP client: an MCP server written with the `mcp` package, over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentcpu.tools.executor import ToolExecutor
from agentcpu.tools.mcp_client import (
    MCPConfigError,
    MCPConnectionError,
    MCPServerConfig,
    MCPServerConnection,
    MCPToolset,
    _name_tools,
    load_mcp_config,
    parse_mcp_config,
)
from agentcpu.tools.registry import ToolRegistrationError, ToolRegistry

pytest.importorskip("mcp")

SERVER = Path(__file__).with_name("mcp_demo_server.py")
STARTUP_TIMEOUT_S = 120.0  # a loaded machine takes seconds just to import mcp


def test_stdio_server_is_listed_called_and_closed(tmp_path):
    config = tmp_path / "mcp.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "demo": {
                        "command": sys.executable,
                        "args": [str(SERVER)],
                        "env": {"DEMO": "1"},
                    },
                    "off": {"command": "does-not-exist", "disabled": True},
                }
            }
        )
    )

    async def main():
        toolset = MCPToolset.from_file(config, startup_timeout_s=STARTUP_TIMEOUT_S)
        registry = ToolRegistry()
        # started in one task, used and closed from another: the session has its own task
        tools = await asyncio.create_task(toolset.start(reserved_names=["add"]))
        registry.extend(tools)
        async with ToolExecutor(registry, timeout_s=60) as ex:
            results = await asyncio.gather(
                ex.run("demo__add", {"a": 2, "b": 40}),
                ex.run("shout_loud", {"text": "hi"}),
                ex.run("fail", {"reason": "no luck"}),
                ex.run("demo__add", {"a": "two", "b": 1}),
            )
            await toolset.close()
            after_close = await ex.run("demo__add", {"a": 1, "b": 1})
        return tools, registry.schemas(), results, after_close

    tools, schemas, results, after_close = asyncio.run(main())
    # "add" was taken, so it is prefixed; "shout.loud" is made a valid OpenAI name
    assert [(t.name, t.remote_name) for t in tools] == [
        ("demo__add", "add"),
        ("shout_loud", "shout.loud"),
        ("fail", "fail"),
    ]
    add_schema = schemas[0]["function"]
    assert add_schema["description"] == "Add two integers."
    assert add_schema["parameters"]["required"] == ["a", "b"]
    added, shouted, failed, invalid = results
    assert (added.ok, added.content) == (True, "42")
    assert (shouted.ok, shouted.content) == (True, "HI")
    assert not failed.ok and "no luck" in failed.content
    assert not invalid.ok and "invalid arguments" in invalid.content  # caught before the server
    assert not after_close.ok and "not connected" in after_close.content


@pytest.fixture(scope="module", autouse=True)
def http_server_port():
    """Started before the module's first test, so it warms up while the stdio test runs."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(SERVER), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield port, server
    server.terminate()
    server.wait(timeout=30)


def test_streamable_http_server(http_server_port):
    port, server = http_server_port
    _wait_for_port(port, server)
    configs = parse_mcp_config(
        {
            "mcpServers": {
                "web": {
                    "type": "http",
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "headers": {"X-Test": "1"},
                }
            }
        }
    )

    async def main():
        async with MCPToolset(configs, startup_timeout_s=STARTUP_TIMEOUT_S) as toolset:
            tools = {t.name: t for t in await toolset.start()}
            return await tools["add"].call({"a": 1, "b": 2}), sorted(tools)

    assert asyncio.run(main()) == ("3", ["add", "fail", "shout_loud"])


def test_a_server_that_cannot_start_is_a_clear_error():
    config = MCPServerConfig(
        name="broken", command=sys.executable, args=("-c", "import sys; sys.exit(3)")
    )

    async def main():
        with pytest.raises(MCPConnectionError, match="MCP server 'broken'"):
            await MCPToolset(
                [config], startup_timeout_s=STARTUP_TIMEOUT_S, errlog=subprocess.DEVNULL
            ).start()

    asyncio.run(main())


def test_config_shapes_and_errors(tmp_path):
    (a, b) = parse_mcp_config(
        {
            "mcpServers": {
                "a": {"command": "srv", "args": ["--x"], "env": {"K": "v"}, "cwd": "/tmp"},
                "b": {"url": "http://h/mcp"},
            }
        }
    )
    assert a == MCPServerConfig(name="a", command="srv", args=("--x",), env={"K": "v"}, cwd="/tmp")
    assert b.url == "http://h/mcp" and b.command is None
    bad = [
        ({}, "mcpServers"),
        ({"mcpServers": {"x": {}}}, "command"),
        ({"mcpServers": {"x": {"url": "http://h", "type": "sse"}}}, "not supported"),
        ({"mcpServers": {"x": {"command": "c", "args": "not-a-list"}}}, "args"),
        ({"mcpServers": {"x": {"command": "c", "env": {"K": 1}}}}, "env"),
    ]
    for data, message in bad:
        with pytest.raises(MCPConfigError, match=message):
            parse_mcp_config(data)
    with pytest.raises(MCPConfigError, match="cannot read"):
        load_mcp_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MCPConfigError, match="not valid JSON"):
        load_mcp_config(tmp_path / "bad.json")


def test_tool_naming_on_collisions():
    def conn(name):
        return MCPServerConnection(MCPServerConfig(name=name, command="x"))

    def listing(name, schema=None):
        return SimpleNamespace(
            name=name,
            description="d",
            title=None,
            input_schema=schema or {"type": "object", "properties": {}},
        )

    one, two = conn("one"), conn("two")
    tools = _name_tools(
        [one, two],
        [
            [listing("search"), listing("read"), listing("bad", {"type": 3})],
            [listing("search"), listing("python")],
        ],
        {"python"},
    )
    # "search" is on both servers, "python" is taken by a registered tool, "bad" has a broken schema
    assert [t.name for t in tools] == ["one__search", "read", "two__search", "two__python"]
    with pytest.raises(ToolRegistrationError, match="clashes"):
        _name_tools([one], [[listing("x")]], {"x", "one__x"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, "the MCP HTTP server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"MCP HTTP server did not listen on {port}")
