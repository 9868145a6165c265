"""The demo tools as registry `Tool`s, with exactly the schemas the model was trained on
(the system prompt must render token-for-token as in training)."""

from __future__ import annotations

from typing import Any

from agentcpu.demo.tools import TOOL_SCHEMAS, run_tool, tool_result_text
from agentcpu.tools.registry import Tool, ToolRegistry


class DemoTool(Tool):
    blocking = True

    def __init__(self, schema: dict[str, Any]):
        function = schema["function"]
        self.name = function["name"]
        self.description = function["description"]
        self.parameters = function["parameters"]

    def call_blocking(self, arguments: dict[str, Any]) -> str:
        return tool_result_text(run_tool(self.name, arguments))


def demo_registry() -> ToolRegistry:
    return ToolRegistry(DemoTool(s) for s in TOOL_SCHEMAS)
