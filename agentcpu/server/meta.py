"""GET /v1/models, /v1/models/{model}, /health, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from agentcpu.server.errors import error_response
from agentcpu.server.openapi import MODEL_RESPONSES
from agentcpu.server.protocol import HealthResponse, ModelCard, ModelList
from agentcpu.server.state import ServerState, get_state

router = APIRouter()


def _cards(state: ServerState) -> list[ModelCard]:
    return [
        ModelCard(
            id=name,
            created=state.created,
            root=state.engine.config.model,
            max_model_len=state.max_model_len,
        )
        for name in state.settings.served_model_names
    ]


@router.get("/v1/models", response_model=ModelList, responses=MODEL_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(get_state(request)))


@router.get("/v1/models/{model}", response_model=ModelCard, responses=MODEL_RESPONSES)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model)
    return next(card for card in _cards(state) if card.id == model)


@router.get(
    "/health",
    response_model=HealthResponse,
    responses={503: {"description": "the engine thread has stopped"}},
)
async def health(request: Request):
    if not get_state(request).engine_alive():
        return error_response(503, "the engine thread has stopped", "server_error")
    return HealthResponse()


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
