"""The engine's async front door for the server.

The engine loop runs in its own thread (PyTorch releases the GIL inside kernels, so the
event loop stays responsive) or, with `own_thread=False`, on whichever thread calls
`run_here()`. `agentcpu serve` and `agentcpu demo` give it the main thread
(`run_beside_engine`): OpenMP parallel regions started
from the process's initial thread reuse a spinning worker team, while from any other
thread each region costs ~55 us more here (one bf16 GEMV 42 -> 101 us; a decode step,
~240 regions, 34 -> 46 ms). Requests and aborts reach the loop through a command queue, and
outputs come back to each caller's asyncio queue via `call_soon_threadsafe`. Leaving the
`generate` iterator early (client disconnect, cancellation) aborts the request, which
frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from agentcpu.engine.constraint import TokenConstraint
from agentcpu.engine.llm_engine import LLMEngine
from agentcpu.engine.outputs import RequestOutput
from agentcpu.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0  # how often an idle engine thread wakes to expire session pins
WORK_JOIN_TIMEOUT_S = 30.0
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> bool:
        """Hand `item` to the caller's event loop; False if that loop has closed (the HTTP
        server shut down with the request in flight): nobody is listening any more, and
        the engine thread must go on stopping, not die on RuntimeError."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            return False
        return True


class AsyncEngine:
    def __init__(self, engine: LLMEngine, own_thread: bool = True):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        if own_thread:
            self._thread = threading.Thread(target=self._run, name="agentcpu-engine", daemon=True)
            self._thread.start()

    def run_here(self) -> None:
        """Run the engine loop on the calling thread until `shutdown()` (own_thread=False)."""
        if self._thread is not None:
            raise RuntimeError("this AsyncEngine already runs its loop on its own thread")
        self._run()

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        constraint: TokenConstraint | None = None,
        session_id: str | None = None,
        pin_ttl_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; raises the engine's typed error if it is refused."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        options = {"constraint": constraint, "session_id": session_id, "pin_ttl_s": pin_ttl_s}
        self._send(("add", request_id, list(prompt_token_ids), params, stream, options))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def call(self, fn, *args):
        """Run `fn(engine, *args)` on the engine thread; returns a concurrent Future."""
        import concurrent.futures

        future: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("call", fn, args, future))
        return future

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ---- engine thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:  # shutdown or Ctrl-C: no caller may wait forever on a stream
            for request_id, stream in self._streams.items():
                stream.put(RuntimeError("the engine stopped"))
                try:
                    self.engine.abort(request_id)
                except Exception:  # interrupted mid-step: the caller is told all the same
                    log.exception("could not abort %s while stopping", request_id)
            self._streams.clear()

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=IDLE_POLL_S)
                self._wakeup.clear()
                self.engine.kv.pins.expire()  # pins age out while nothing runs too
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug in a step must not kill the server
                log.exception("engine step failed; failing its requests")
                self._fail_all(e)
                continue
            for out in outputs:
                # a finished stream is dropped before its last output is handed over, so
                # a caller that saw the end never counts it among the live streams
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None and not stream.put(out) and not out.finished:
                    self.engine.abort(out.request_id)  # its caller's loop is gone: free the KV now
                    del self._streams[out.request_id]

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self.engine.abort(command[1])
                self._streams.pop(command[1], None)
            elif kind == "call":
                _, fn, args, future = command
                try:
                    future.set_result(fn(self.engine, *args))
                except Exception as e:
                    future.set_exception(e)

    def _add(self, request_id, prompt, params, stream: _Stream, options: dict) -> None:
        try:
            self.engine.add_request(prompt, params, request_id, **options)
        except Exception as e:
            stream.put(e)
            return
        self._streams[request_id] = stream

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(RuntimeError(f"engine step failed: {error}"))
        self._streams.clear()


def run_beside_engine(front: AsyncEngine, work: Callable[[], T], name: str = "agentcpu-front",
                      stop_work: Callable[[], None] | None = None) -> T:
    """Run `work()` on a second thread while `front`'s engine loop runs on the calling (main)
    thread, and return what `work` returns (or raise what it raised). The engine stops when
    `work` ends; if the engine loop ends first (shutdown, Ctrl-C), `stop_work()` asks `work`
    to finish. `front` must have been made with `own_thread=False`."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as e:  # handed to the caller's thread below
            result["error"] = e
        finally:
            front.shutdown()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        front.run_here()
    finally:
        front.shutdown()
        if stop_work is not None and thread.is_alive():
            stop_work()
        thread.join(timeout=WORK_JOIN_TIMEOUT_S)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")  # type: ignore[return-value]
