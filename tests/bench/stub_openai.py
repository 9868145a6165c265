"""A tiny OpenAI-compatible server with known timings and usage, for the harness tests.

`/v1/completions` (streamed only) waits `ttft_s + ttft_per_prompt_token_s x prompt` before
the first token, then `itl_s` between tokens, one token per chunk, then a usage chunk with
`cached_tokens = int(prompt x cached_fraction)`. The n-th request (1-based) fails with the
first status in `fail_every` whose period divides n. Every request body is recorded.

In-process: `with StubServer(Behaviour(...)) as stub: stub.base_url`. As a process (for
the server-lifecycle tests): `python -m tests.bench.stub_openai --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL_ID = "stub-model"
STARTUP_TIMEOUT_S = 20.0


@dataclass
class Behaviour:
    ttft_s: float = 0.0
    ttft_per_prompt_token_s: float = 0.0
    itl_s: float = 0.0
    cached_fraction: float = 0.0
    report_cached: bool = True
    short_by: int = 0  # return this many tokens fewer than asked
    fail_every: dict[int, int] = field(default_factory=dict)  # status -> period


@dataclass
class StubState:
    behaviour: Behaviour = field(default_factory=Behaviour)
    bodies: list[dict] = field(default_factory=list)

    def reset(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.bodies = []


def make_app(state: StubState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state.bodies.append(body)
        number = len(state.bodies)
        for status, period in state.behaviour.fail_every.items():
            if number % period == 0:
                return JSONResponse({"error": {"message": f"stub {status}"}}, status_code=status)
        return StreamingResponse(_stream(body, state.behaviour), media_type="text/event-stream")

    return app


async def _stream(body: dict, behaviour: Behaviour):
    prompt = len(body["prompt"])
    tokens = max(0, body["max_tokens"] - behaviour.short_by)
    await asyncio.sleep(behaviour.ttft_s + behaviour.ttft_per_prompt_token_s * prompt)
    for index in range(tokens):
        if index:
            await asyncio.sleep(behaviour.itl_s)
        yield _event({"choices": [{"index": 0, "text": f" t{index}", "finish_reason": None}]})
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
    if behaviour.report_cached:
        usage["prompt_tokens_details"] = {"cached_tokens": int(prompt * behaviour.cached_fraction)}
    yield _event({"choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps({'object': 'text_completion', 'model': MODEL_ID, **payload})}\n\n"


class StubServer:
    """Runs the stub on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, behaviour: Behaviour | None = None):
        self.state = StubState(behaviour or Behaviour())
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(make_app(self.state), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> StubServer:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ballast-mb", type=int, default=0, help="hold this much memory")
    args = parser.parse_args()
    ballast = bytearray(args.ballast_mb * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page so it is resident
    uvicorn.run(make_app(StubState()), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
