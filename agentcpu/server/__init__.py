"""OpenAI-compatible HTTP server: FastAPI app, schemas, SSE streaming, metrics, auth, errors."""

from agentcpu.server.app import create_app
from agentcpu.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
