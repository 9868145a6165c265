"""Bearer API-key check for the /v1 routes, before anything else reads the request.

It is ASGI middleware rather than a FastAPI dependency so that a request without the
key is refused (401) before its body is parsed: a malformed body from a stranger gets
401, not a 400 that reveals how the API validates.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from agentcpu.server.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            problem = self._problem(dict(scope["headers"]).get(b"authorization"))
            if problem is not None:
                response = error_response(
                    401,
                    problem,
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        if header is None:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        if not secrets.compare_digest(header, self._expected):
            return "invalid API key"
        return None
