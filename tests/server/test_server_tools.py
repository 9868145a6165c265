"""The server-side agent loop over HTTP: `server_tools` on /v1/chat/completions.

A random-weight model calls no tool on its own, so each run forces its first turn with a
named `tool_choice` (honoured on the first turn only) and bounds itself with `max_turns`.
The tools are a module written here (`--tools`) and an MCP stdio server written here
(`--mcp`), served by a real uvicorn whose lifespan connects and closes them.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import httpx
import openai
import pytest

from agentcpu.cli import build_parser
from agentcpu.commands.tool_args import tool_options
from agentcpu.server import ServerSettings
from agentcpu.server.server_tools import ServerTools, ServerToolsConfig
from agentcpu.tools.registry import ToolRegistrationError
from tests.server.conftest import MODEL_NAME, LiveServer

MAX_TOKENS = 48  # a forced no-argument call takes ~20 tokens of the test tokenizer
TOOL_TIMEOUT_S = 1.0
BLOCK_SIZE = 16  # LiveServer's
SLOW_TOOL_S = 0.5
USER = [{"role": "user", "content": "Use the tool, then answer."}]

TOOLS_MODULE = '''\
"""Tools for the server-side agent tests (every public function here is a tool)."""

import time
from pathlib import Path

LOG = Path(LOG_PATH)
SLOW_TOOL_S = SLOW_SECONDS
MARKER = "zebra-result-seven"


def record() -> str:
    """Append a line to the log and report how many calls it holds."""
    with LOG.open("a") as f:
        f.write("called\\n")
    return f"{MARKER} call {len(LOG.read_text().splitlines())}"


def slow() -> str:
    """Take a while, within the timeout."""
    time.sleep(SLOW_TOOL_S)
    return "slow done"


def explode() -> str:
    """Always fails."""
    raise RuntimeError("kaboom-42")


def sleepy() -> str:
    """Take longer than the server's tool timeout."""
    time.sleep(3)
    return "late"


def junk():
    """Return something that is not JSON."""
    return object()
'''

MCP_SERVER = '''\
"""A stdio MCP server with one tool, declared with a closed argument schema."""

import anyio
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

PING = types.Tool(
    name="ping",
    description="Answer pong.",
    input_schema={"type": "object", "properties": {}, "additionalProperties": False},
)


async def list_tools(ctx, params):
    return types.ListToolsResult(tools=[PING])


async def call_tool(ctx, params):
    return types.CallToolResult(content=[types.TextContent(type="text", text="pong-from-mcp")])


server = Server("agent-test", on_list_tools=list_tools, on_call_tool=call_tool)


async def main():
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


anyio.run(main)
'''


@pytest.fixture(scope="module")
def agent_server(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-tools")
    log = root / "calls.log"
    log.touch()
    module = root / "agent_test_tools.py"
    source = TOOLS_MODULE.replace("LOG_PATH", repr(str(log)))
    module.write_text(source.replace("SLOW_SECONDS", repr(SLOW_TOOL_S)))
    mcp_server = root / "mcp_server.py"
    mcp_server.write_text(MCP_SERVER)
    mcp_config = root / "mcp.json"
    entry = {"command": sys.executable, "args": [str(mcp_server)]}
    mcp_config.write_text(json.dumps({"mcpServers": {"test": entry}}))
    config = ServerToolsConfig(
        modules=(str(module),), mcp_config=str(mcp_config), timeout_s=TOOL_TIMEOUT_S
    )
    tools = ServerTools(config)
    settings = ServerSettings.for_model(MODEL_NAME, max_queue=1)
    live = LiveServer(
        model_dir,
        settings,
        tools=tools,
        max_model_len=1536,
        kv_cache_gb=0.08,
        block_size=BLOCK_SIZE,
    )
    live.log = log
    yield live
    live.stop()
    assert not any(c.connected for c in tools.mcp.connections)  # the lifespan closed them


def _calls(live: LiveServer) -> int:
    return len(live.log.read_text().splitlines())


def _forced(tool: str, max_turns: int = 1) -> dict:
    """A request body whose run opens with a call of `tool`."""
    return {
        "model": MODEL_NAME,
        "messages": USER,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": tool}},
        "server_tools": [tool],
        "max_turns": max_turns,
    }


def _sdk(body: dict) -> dict:
    """The same as keyword arguments of the openai client (extensions in extra_body)."""
    extensions = ("server_tools", "max_turns")
    kwargs = {k: v for k, v in body.items() if k not in extensions}
    return {**kwargs, "extra_body": {k: body[k] for k in extensions}}


def _agent(response) -> dict:
    return response.model_extra["agent"]


def _template_messages(messages: list[dict]) -> list[dict]:
    """As the server renders them: tool-call arguments decoded to objects."""
    out = []
    for m in messages:
        calls = [
            {
                **c,
                "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])},
            }
            for c in m.get("tool_calls") or []
        ]
        out.append({**m, "tool_calls": calls} if calls else m)
    return out


def test_forced_call_runs_the_tool_appends_its_result_and_keeps_the_kv(agent_server, tokenizer):
    client = agent_server.client()
    session = f"agent-{uuid.uuid4().hex[:8]}"
    resumed_before = agent_server.engine(lambda e: e.kv.pins.stats.resumed)
    calls_before = _calls(agent_server)
    response = client.chat.completions.create(
        **_sdk(_forced("record", max_turns=2)), extra_headers={"X-Session-Id": session}
    )
    agent = _agent(response)

    assert _calls(agent_server) == calls_before + 1  # the tool really ran, once
    first = agent["tool_calls"][0]
    assert (first["turn"], first["name"], first["ok"]) == (0, "record", True)
    assert first["content"].startswith("zebra-result-seven call")
    assert agent["turns"] == 2 and agent["finish_reason"] in ("stop", "max_turns")
    assert response.choices[0].finish_reason in ("stop", "length")

    # The second turn's prompt is the first one plus the call and its result, exactly.
    call, result = agent["messages"][:2]
    assert call["tool_calls"][0]["function"]["name"] == "record"
    assert result == {
        "role": "tool",
        "tool_call_id": first["id"],
        "name": "record",
        "content": first["content"],
    }
    schemas = agent_server.state.tools.registry.schemas(["record"])
    text = tokenizer.apply_chat_template(
        _template_messages([*USER, call, result]), tools=schemas, add_generation_prompt=True
    )
    turn1, turn2 = agent["turn_usage"]
    assert "zebra-result-seven" in text
    assert turn2["prompt_tokens"] == len(tokenizer.encode(text))

    # The session's KV was pinned through the tool call and found by the second turn.
    assert turn2["cached_tokens"] >= turn1["prompt_tokens"] // BLOCK_SIZE * BLOCK_SIZE
    assert agent_server.engine(lambda e: e.kv.pins.stats.resumed) > resumed_before
    with agent_server.http() as http:
        info = http.get(f"/v1/sessions/{session}").json()
    assert info["turns"] == 2

    usage = response.usage
    assert usage.prompt_tokens == turn1["prompt_tokens"] + turn2["prompt_tokens"]
    assert usage.completion_tokens == turn1["completion_tokens"] + turn2["completion_tokens"]
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached == turn1["cached_tokens"] + turn2["cached_tokens"]
    assert agent["usage"]["prompt_tokens_details"]["cached_tokens"] == cached


def test_the_run_stops_at_max_turns(agent_server):
    calls_before = _calls(agent_server)
    response = agent_server.client().chat.completions.create(**_sdk(_forced("record")))
    agent = _agent(response)
    assert (agent["turns"], agent["finish_reason"]) == (1, "max_turns")
    assert response.choices[0].finish_reason == "length"
    assert [c["name"] for c in agent["tool_calls"]] == ["record"]
    assert _calls(agent_server) == calls_before + 1


@pytest.mark.parametrize(
    ("tool", "error"),
    [
        ("explode", "raised RuntimeError: kaboom-42"),
        ("sleepy", f"timed out after {TOOL_TIMEOUT_S:g} s"),
        ("junk", "not JSON-serialisable"),
    ],
)
def test_a_failing_tool_is_an_error_result_for_the_model_not_a_500(agent_server, tool, error):
    with agent_server.http() as http:
        response = http.post("/v1/chat/completions", json=_forced(tool))
        metrics = http.get("/metrics").text
    assert response.status_code == 200, response.text
    (call,) = response.json()["agent"]["tool_calls"]
    assert call["ok"] is False and error in call["content"], call
    assert f'agentcpu_tool_errors_total{{tool="{tool}"}} 1.0' in metrics
    assert 'agentcpu_agent_runs_total{finish_reason="max_turns"}' in metrics


def test_the_mcp_servers_tool_is_registered_and_called(agent_server):
    assert "ping" in agent_server.state.tools.registry.names()
    response = agent_server.client().chat.completions.create(**_sdk(_forced("ping")))
    (call,) = _agent(response)["tool_calls"]
    assert (call["name"], call["ok"], call["content"]) == ("ping", True, "pong-from-mcp")


def test_streaming_yields_agent_events_the_openai_client_passes_over(agent_server):
    client = agent_server.client()
    stream = client.chat.completions.create(
        **_sdk(_forced("record", max_turns=2)),
        stream=True,
        stream_options={"include_usage": True},
    )
    events, reasons, summary, usage = [], [], None, None
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "agent_event" in extra:
            events.append(extra["agent_event"])
            assert chunk.choices[0].delta.content is None
        summary = extra.get("agent", summary)
        reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        usage = chunk.usage or usage
    assert [e["type"] for e in events[:2]] == ["tool_call", "tool_result"]
    assert events[0]["name"] == "record" and events[0]["turn"] == 0
    assert events[1]["ok"] is True and events[1]["content"].startswith("zebra-result-seven")
    assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert summary["turns"] == 2 and "messages" not in summary
    assert usage.prompt_tokens == sum(t["prompt_tokens"] for t in summary["turn_usage"])
    assert usage.prompt_tokens_details.cached_tokens > 0

    # the SDK's stream helper accumulates the same chunks without choking (its
    # get_final_completion would raise LengthFinishReasonError: a run cut at max_turns
    # finishes with "length", as an answer cut at max_tokens does)
    with client.chat.completions.stream(**_sdk(_forced("record"))) as helper:
        kinds = {event.type for event in helper}
        snapshot = helper.current_completion_snapshot
    assert "chunk" in kinds and snapshot.choices[0].finish_reason == "length"


def test_a_run_holds_its_admission_slot_and_a_client_that_leaves_ends_it(agent_server):
    """max_queue=1: a second request meets 429 during a run's tool pause; leaving mid-run
    ends the run (no second turn after the tool returns) and frees the slot."""
    session = f"leaver-{uuid.uuid4().hex[:8]}"
    headers = {"X-Session-Id": session}
    body = {**_forced("slow", max_turns=3), "stream": True}
    with agent_server.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            assert any('"tool_call"' in line for line in lines)  # the tool is running now
            refused = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert refused.status_code == 429 and refused.headers["Retry-After"]
        _wait_for(lambda: agent_server.state.admission.in_flight == 0)
        time.sleep(SLOW_TOOL_S + 0.3)  # a run still going would have started turn 2 by now
        assert http.get(f"/v1/sessions/{session}").json()["turns"] == 1
        metrics = http.get("/metrics").text
    assert agent_server.wait_idle() == (0, False)
    assert 'agentcpu_agent_runs_total{finish_reason="abort"} 1.0' in metrics


def _wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_requests_the_server_cannot_run_are_400s_naming_the_field(agent_server):
    base = {"model": MODEL_NAME, "messages": USER, "max_tokens": 8}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [
        ({"server_tools": ["record", "nope"]}, "server_tools", "nope"),
        ({"server_tools": "all", "tools": [tool]}, "tools", "mixing"),
        ({"max_turns": 2}, "max_turns", "server_tools"),
        ({"server_tools": ["record"], "max_turns": 0}, "max_turns", ""),
        ({"server_tools": ["record"], "max_turns": 65}, "max_turns", ""),
        ({"server_tools": [], "max_turns": 2}, "server_tools", ""),
        ({"server_tools": ["record"], "n": 2}, "n", "one choice"),
        (
            {
                "server_tools": ["record"],
                "tool_choice": {"type": "function", "function": {"name": "ping"}},
            },
            "tool_choice",
            "ping",
        ),
    ]
    with agent_server.http() as http:
        for extra, param, words in cases:
            response = http.post("/v1/chat/completions", json={**base, **extra})
            assert response.status_code == 400, (extra, response.text)
            error = response.json()["error"]
            assert error["param"] == param and words in error["message"], (extra, error)


def test_a_server_without_tools_refuses_server_tools(server):
    with pytest.raises(openai.BadRequestError, match="start it with --tools"):
        server.client().chat.completions.create(
            model=MODEL_NAME, messages=USER, extra_body={"server_tools": "all"}
        )


# ---- building the tools from the command line -------------------------------------------


def test_serve_flags_become_the_server_tools_config(tmp_path):
    module = tmp_path / "few_tools.py"
    module.write_text("def hello(name: str) -> str:\n    return 'hi ' + name\n")
    args = build_parser().parse_args(
        [
            "serve",
            "--tools",
            str(module),
            "--python-tool",
            "--tool-timeout-s",
            "5",
            "--max-agent-turns",
            "3",
        ]
    )
    config = ServerToolsConfig(**tool_options(args))
    assert (config.modules, config.python_tool, config.timeout_s, config.max_turns) == (
        (str(module),),
        True,
        5.0,
        3,
    )
    tools = ServerTools(config)
    assert tools.registry.names() == ["hello", "python"]
    assert tools.resolve("all") == ["hello", "python"]
    assert tools.executor.timeout_s == 5.0
    tools.executor.close()
    defaults = ServerToolsConfig(**tool_options(build_parser().parse_args(["serve"])))
    assert defaults == ServerToolsConfig() and not defaults.enabled  # CLI and config agree


def test_bad_tool_flags_fail_before_the_model_loads(tmp_path):
    with pytest.raises(ToolRegistrationError, match="no such file"):
        ServerTools(ServerToolsConfig(modules=(str(tmp_path / "missing.py"),)))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ToolRegistrationError, match="mcpServers"):
        ServerTools(ServerToolsConfig(mcp_config=str(tmp_path / "bad.json")))
    with pytest.raises(ToolRegistrationError, match="max-agent-turns"):
        ServerToolsConfig(max_turns=0)


def test_plain_chat_on_a_server_with_tools_is_untouched(agent_server):
    """Plain chat on a server with tools: no agent fields, no tools rendered."""
    response = httpx.post(
        f"{agent_server.url}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": USER, "max_tokens": 4},
        timeout=60,
    )
    assert response.status_code == 200 and "agent" not in response.json()
