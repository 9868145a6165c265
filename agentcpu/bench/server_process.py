"""A benchmarked server as a child process: start it in its own process group, wait
until it answers, track its tree's peak RSS from /proc, stop it (TERM, then KILL).

Peak RSS is the largest VmHWM seen for each process of the tree, summed (children the
server forks count too), next to the largest summed VmRSS of any one sample.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agentcpu.errors import AgentCPUError

READY_POLL_S = 0.25
RSS_POLL_S = 0.5
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 40
KIB = 1024


class ServerStartError(AgentCPUError):
    """A server exited, or did not answer in time, while starting."""


@dataclass(frozen=True)
class Launch:
    """How to start a server: its command line, the port it will listen on, extra
    environment variables, and the working directory (None: ours)."""

    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant (by parent pid), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_pid(entry / "stat")
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, []))
    return tree


def _parent_pid(stat_path: Path) -> int | None:
    try:
        # the command name (field 2) may hold spaces; fields after its ')' are fixed
        return int(stat_path.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def status_kib(pid: int, key: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Polls a process tree: the peak VmHWM per pid (summed) and the peak summed VmRSS."""

    def __init__(self, root: int, interval_s: float = RSS_POLL_S):
        self.root, self.interval_s = root, interval_s
        self.hwm_kib: dict[int, int] = {}
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.root):
            hwm, rss = status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")
            if hwm is not None:
                self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), hwm)
            total += rss or 0
        self.peak_rss_kib = max(self.peak_rss_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> dict[str, float]:
        self.sample()
        self._stop.set()
        self._thread.join()
        return {
            "peak_rss_mb": sum(self.hwm_kib.values()) / KIB,
            "peak_rss_sampled_mb": self.peak_rss_kib / KIB,
        }


@dataclass
class RunningServer:
    engine: str
    base_url: str
    process: subprocess.Popen
    log_path: Path
    ready_s: float = 0.0
    figures: dict[str, float] = field(default_factory=dict)


@contextmanager
def running_server(
    engine: str, launch: Launch, log_path: Path, ready_timeout_s: float
) -> Iterator[RunningServer]:
    """Start `launch` in its own process group, wait until ready, stop it on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(launch.argv)}\n")
        log.flush()
        process = subprocess.Popen(
            launch.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **launch.env}, cwd=launch.cwd,
        )  # fmt: skip
    sampler = RssSampler(process.pid).start()
    server = RunningServer(engine, f"http://127.0.0.1:{launch.port}", process, log_path)
    try:
        server.ready_s = wait_ready(server, ready_timeout_s)
        yield server
    finally:
        server.figures = sampler.stop()
        stop_process(process)


def wait_ready(server: RunningServer, timeout_s: float) -> float:
    """Poll /health (or /v1/models where /health is absent) until 200; seconds waited."""
    start = time.monotonic()
    with httpx.Client(base_url=server.base_url, timeout=5.0, trust_env=False) as http:
        while time.monotonic() - start < timeout_s:
            if server.process.poll() is not None:
                raise ServerStartError(
                    f"{server.engine} exited ({server.process.returncode}):\n{log_tail(server.log_path)}"
                )
            if _answers(http):
                return time.monotonic() - start
            time.sleep(READY_POLL_S)
    raise ServerStartError(
        f"{server.engine} not ready after {timeout_s:.0f} s:\n{log_tail(server.log_path)}"
    )


def _answers(http: httpx.Client) -> bool:
    try:
        health = http.get("/health")
        if health.status_code == 200:
            return True
        if health.status_code == 404:
            models = http.get("/v1/models")
            return models.status_code == 200 and bool(models.json().get("data"))
    except (httpx.HTTPError, ValueError):
        pass
    return False


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after a grace period."""
    if process.poll() is not None:
        return
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
