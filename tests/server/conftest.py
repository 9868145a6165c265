"""A real uvicorn server on 127.0.0.1 in a background thread, over a tiny random model."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from agentcpu.engine.async_engine import AsyncEngine
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.models.loading import resolve_engine_config
from agentcpu.server import ServerSettings, create_app
from agentcpu.tokenizer import Tokenizer
from tests.models.reference import make_checkpoint
from tests.tokenizer.fixtures import make_bpe_tokenizer_dir

MODEL_NAME = "tiny-qwen"
API_KEY = "sk-test-key"
STARTUP_TIMEOUT_S = 30
MAX_POSITIONS = 2048  # the Qwen template with tools writes ~500 prompt tokens


class LiveServer:
    """One app over one engine, served on an OS-chosen free port until `stop()`."""

    def __init__(self, model_dir: Path, settings: ServerSettings, tools=None, **engine_options):
        """`tools`: a `ServerTools`; the app's lifespan (which starts them) then runs."""
        options = dict(dtype="float32", max_model_len=512, kv_cache_gb=0.02, block_size=16)
        options.update(engine_options)
        self.front = AsyncEngine(LLMEngine(resolve_engine_config(str(model_dir), **options)))
        self.app = create_app(self.front, settings, tools=tools)
        self.settings = settings
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        lifespan = "off" if tools is None else "on"
        config = uvicorn.Config(self.app, log_level="warning", lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    @property
    def state(self):
        return self.app.state.server

    def client(self, api_key: str | None = None, async_client: bool = False):
        """The real openai client (no retries: a 429 must reach the test)."""
        key = api_key or self.settings.api_key or "unused"
        cls = openai.AsyncOpenAI if async_client else openai.OpenAI
        return cls(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), **kwargs)

    def engine(self, fn, timeout: float = 30):
        """Run `fn(engine)` on the engine thread and return its result."""
        return self.front.call(fn).result(timeout)

    def wait_idle(self, timeout: float = 30) -> tuple[int, bool]:
        """Poll until no request is unfinished and no KV block is held by a request
        (blocks pinned for finished sessions' next turns do not count; pins of one
        prefix share blocks, so they are counted once)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine(lambda e: (e.kv.pool.num_used - _pinned(e), e.has_unfinished()))
            if state == (0, False) or time.monotonic() > deadline:
                return state
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.front.shutdown()


def _pinned(engine) -> int:
    return len({block for pin in engine.kv.pins.pins.values() for block in pin.blocks})


def build_model_dir(path: Path) -> Path:
    make_bpe_tokenizer_dir(path)
    vocab_size = Tokenizer.from_pretrained(path).vocab_size
    make_checkpoint(path, "qwen2", vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS)
    # save_pretrained wrote its own generation_config.json: restore the tokenizer's EOS ids.
    make_bpe_tokenizer_dir(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("server") / MODEL_NAME)


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """Default settings: served as the directory name and "default", no key, no queue cap."""
    live = LiveServer(model_dir, ServerSettings.for_model(MODEL_NAME))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()
