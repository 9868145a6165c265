"""GET /v1/sessions/{id} (what an agent session holds) and DELETE (end it now).

A session id is what the client sent (X-Session-Id header, `session_id` or `user`), on
chat completions, agent runs and plain completions alike.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from agentcpu.server.errors import error_response
from agentcpu.server.state import get_state

router = APIRouter()
SESSION_PREFIX = "s:"  # how client-named sessions are named inside the engine
SESSION_HEADER = "x-session-id"


def named_session(request: Request, body) -> str | None:
    """The engine session a request names: the X-Session-Id header, else the body's
    `session_id` or `user` field; None if it names none."""
    named = request.headers.get(SESSION_HEADER) or body.session_id or body.user
    return f"{SESSION_PREFIX}{named}" if named else None


@router.get("/v1/sessions/{session_id}", summary="An agent session's cached tokens, pinned KV, turns")
async def get_session(session_id: str, request: Request):
    state = get_state(request)
    info = await _on_engine(state, lambda e: e.session_info(SESSION_PREFIX + session_id))
    if info is None:
        return _not_found(session_id)
    info["id"] = session_id
    return info


@router.delete("/v1/sessions/{session_id}", summary="End an agent session and release its KV")
async def delete_session(session_id: str, request: Request):
    state = get_state(request)
    if not await _on_engine(state, lambda e: e.end_session(SESSION_PREFIX + session_id)):
        return _not_found(session_id)
    return {"id": session_id, "deleted": True}


async def _on_engine(state, fn):
    import asyncio

    return await asyncio.wrap_future(state.front.call(fn))


def _not_found(session_id: str):
    return error_response(404, f"session {session_id!r} not found", "not_found_error", "session_id")
