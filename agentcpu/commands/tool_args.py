"""`agentcpu serve` options for server-side tools (requests opt in with `server_tools`)."""

from __future__ import annotations

import argparse

# Mirrors server/server_tools.py and tools/executor.py; kept here so the CLI parses
# without importing the server.
DEFAULT_MAX_AGENT_TURNS = 8
DEFAULT_TOOL_TIMEOUT_S = 60.0


def add_tool_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "server-side tools",
        "tools the server runs itself for chat requests that name them in `server_tools`",
    )
    group.add_argument(
        "--tools",
        action="append",
        default=[],
        metavar="MODULE",
        help="register a module's functions as tools (repeatable): a dotted module name or a "
        ".py file; its functions marked @tool, else those in __all__, else every public "
        "function defined in it; schemas come from type hints and docstrings",
    )
    group.add_argument(
        "--mcp",
        default=None,
        metavar="CONFIG",
        help='register the tools of the MCP servers in a JSON file {"mcpServers": {NAME: '
        '{"command", "args", "env"} | {"url"}}} (stdio or streamable HTTP), connected at startup',
    )
    group.add_argument(
        "--python-tool",
        action="store_true",
        help="register the built-in sandboxed `python` code tool",
    )
    group.add_argument(
        "--tool-timeout-s",
        type=float,
        default=DEFAULT_TOOL_TIMEOUT_S,
        metavar="S",
        help="per-call tool timeout; a slower call fails with an error result for the model "
        "(default: %(default)g)",
    )
    group.add_argument(
        "--max-agent-turns",
        type=int,
        default=DEFAULT_MAX_AGENT_TURNS,
        metavar="N",
        help="model turns of a server_tools run whose request sets no max_turns "
        "(default: %(default)s)",
    )


def tool_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of `ServerToolsConfig`."""
    return dict(
        modules=tuple(args.tools),
        mcp_config=args.mcp,
        python_tool=args.python_tool,
        timeout_s=args.tool_timeout_s,
        max_turns=args.max_agent_turns,
    )
