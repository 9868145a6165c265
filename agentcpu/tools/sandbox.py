"""The built-in `python` tool: model-written code run in a limited, throw-away interpreter.

Each call starts a fresh `python -I -S` (standard library only) in a new session
(process group) with a clean environment and its own temporary directory, removed
afterwards. What bounds it, and how firmly (docs/tools.md says the same to users):

- kernel-enforced: CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size
  (RLIMIT_FSIZE), no core files, processes (RLIMIT_NPROC, only when the server does not
  run as root: the kernel ignores it for root); a wall-clock limit after which the whole
  process group is SIGKILLed; a private network namespace (`unshare -n`) when the machine
  allows one; output read by the server and cut to a bound.
- guard-rails, not a security boundary: an audit hook installed before the code runs
  refuses sockets other than AF_UNIX pairs, DNS, process creation, signals to other
  processes, ctypes, raising the limits, and writes (open for writing, remove, rename,
  mkdir, chmod, ...) outside the sandbox directory. Ordinary code, including buggy or
  careless model code, is stopped by it; code written to defeat CPython audit hooks
  (or native code) can get past it. Reads are not restricted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentcpu.tools.registry import Tool, ToolError

MIB = 1024 * 1024
READ_CHUNK_BYTES = 64 * 1024
# Time the sandbox gets beyond its own wall-clock limit before the executor gives up on it.
WALL_GRACE_S = 5.0
# Fraction of the output bound kept from the start; the rest comes from the end.
OUTPUT_HEAD_FRACTION = 0.75
NETNS_PROBES = (("unshare", "-n"), ("unshare", "-rn"))
NETNS_PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: float = 10.0
    wall_s: float = 30.0
    memory_bytes: int = 1024 * MIB
    file_size_bytes: int = 64 * MIB
    max_processes: int = 16
    max_output_bytes: int = 20_000

    def __post_init__(self) -> None:
        for name in (
            "cpu_s",
            "wall_s",
            "memory_bytes",
            "file_size_bytes",
            "max_processes",
            "max_output_bytes",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxRun:
    """What one run produced: merged stdout+stderr, its exit status, and why it was stopped."""

    output: str
    exit_code: int | None
    stopped_by: str | None
    truncated: bool
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stopped_by is None


# Runs first in the child, before any user code: sets the limits, installs the audit hook,
# then executes the user's code as __main__. argv[1] is its JSON config.
_BOOTSTRAP = r"""
def _bootstrap():
    import ast, builtins, json, linecache, os, re, resource, sys, traceback, types
    cfg = json.loads(sys.argv[1])
    for name, (soft, hard) in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    root, own_pid, code_name = cfg["root"], os.getpid(), "<sandbox>"
    fspath, fsdecode, isabs, join = os.fspath, os.fsdecode, os.path.isabs, os.path.join
    realpath, readlink, getcwd, sep = os.path.realpath, os.readlink, os.getcwd, os.sep
    isdir = os.path.isdir
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    PSEUDO = re.compile(r"(pipe|socket|anon_inode):")
    NET = "network access is disabled in the sandbox"
    PROCESS_EVENTS = frozenset(("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
                                "os.system", "subprocess.Popen", "os.killpg", "pty.spawn"))
    NET_EVENTS = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                            "socket.getnameinfo", "socket.gethostname", "socket.sethostname"))
    DENIED = frozenset(("ctypes.dlopen", "ctypes.dlsym", "resource.setrlimit", "resource.prlimit",
                        "gc.get_referrers", "gc.get_referents", "gc.get_objects", "sys.setprofile",
                        "sys.settrace", "os.chroot", "os.setuid"))
    # event -> positions of (path, dir_fd) pairs it writes to
    WRITES = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
              "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
              "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.truncate": ((0, None),),
              "os.utime": ((0, 3),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
              "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
              "shutil.rmtree": ((0, 1),), "sqlite3.connect": ((0, None),)}

    def resolve(path, dir_fd):
        if isinstance(path, int):
            path = "/proc/self/fd/%d" % path
        path = fsdecode(fspath(path))
        if path == ":memory:":
            return root
        if not isabs(path):
            at_cwd = dir_fd is None or dir_fd < 0
            path = join(getcwd() if at_cwd else readlink("/proc/self/fd/%d" % dir_fd), path)
        return realpath(path)

    def inside(target):
        if target == root or target.startswith(root + sep) or target == "/dev/null":
            return True
        return PSEUDO.match(target.rsplit(sep, 1)[-1]) is not None

    def check_write(path, dir_fd=None):
        if not inside(resolve(path, dir_fd)):
            raise PermissionError("writing outside the sandbox directory is not allowed: %r" % (path,))

    def check_open(path, flags):
        if flags & WRITE:
            return check_write(path)
        # "open" events do not carry os.open's dir_fd, so an outside directory fd would let
        # relative writes land outside: directories outside are not opened at all.
        if not isinstance(path, int) and isdir(path) and not inside(resolve(path, None)):
            raise PermissionError("opening directories outside the sandbox is not allowed: %r" % (path,))

    def hook(event, args):
        if event == "open":
            check_open(args[0], args[2])
        elif event in WRITES:
            for path_at, fd_at in WRITES[event]:
                check_write(args[path_at], None if fd_at is None else args[fd_at])
        elif event == "socket.__new__":
            if args[1] not in (1, -1):  # AF_UNIX (socketpair, used by asyncio) or adopted fd
                raise PermissionError(NET)
        elif event in NET_EVENTS:
            raise PermissionError(NET)
        elif event in PROCESS_EVENTS:
            raise PermissionError("starting processes is not allowed in the sandbox")
        elif event == "os.kill" and args[0] not in (own_pid, 0):
            raise PermissionError("signalling other processes is not allowed in the sandbox")
        elif event in DENIED:
            raise PermissionError("%s is not allowed in the sandbox" % event)

    source = open(cfg["code_path"], encoding="utf-8").read()
    linecache.cache[code_name] = (len(source), None, source.splitlines(True), code_name)
    try:
        tree = ast.parse(source, code_name)
    except SyntaxError as e:
        traceback.print_exception(type(e), e, None)
        sys.exit(1)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv[:] = [code_name]
    builtins.exit = builtins.quit = sys.exit  # defined by site, which -S skips
    sys.path[:0] = [""]
    os.chdir(cfg["cwd"])
    sys.addaudithook(hook)
    try:
        exec(compile(tree, code_name, "exec"), main.__dict__)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), code_name, "eval"), main.__dict__)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as e:
        main.__dict__.clear()  # frees what a memory hog holds, so the traceback can be printed
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.exit(1)

_bootstrap()
"""


class PythonSandbox:
    """Runs code with `SandboxLimits`. Safe to share: each run has its own directory."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        *,
        base_dir: str | None = None,
        python: str = sys.executable,
        isolate_network: bool = True,
    ):
        self.limits = limits
        self.base_dir = base_dir
        self.python = python
        self.isolate_network = isolate_network
        self._netns_prefix: tuple[str, ...] | None = None

    async def run(self, code: str) -> SandboxRun:
        root = Path(tempfile.mkdtemp(prefix="agentcpu-sandbox-", dir=self.base_dir)).resolve()
        try:
            return await self._run_in(root, code)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    async def _run_in(self, root: Path, code: str) -> SandboxRun:
        (root / "work").mkdir()
        (root / "tmp").mkdir()
        (root / "main.py").write_text(code, encoding="utf-8")
        config = {
            "root": str(root),
            "cwd": str(root / "work"),
            "code_path": str(root / "main.py"),
            "rlimits": self._rlimits(),
        }
        prefix = await self._network_prefix()
        argv = [
            *prefix,
            self.python,
            "-I",
            "-S",
            "-u",
            "-X",
            "utf8",
            "-c",
            _BOOTSTRAP,
            json.dumps(config),
        ]
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=root / "work",
            env=self._env(root),
            start_new_session=True,
        )
        output = _BoundedOutput(self.limits.max_output_bytes)
        stopped_by = None
        try:
            async with asyncio.timeout(self.limits.wall_s):
                await output.drain(proc.stdout)
                await proc.wait()
        except TimeoutError:
            stopped_by = f"wall-clock limit of {self.limits.wall_s:g} s exceeded"
        finally:
            _kill_group(proc)
            await proc.wait()
        stopped_by = stopped_by or self._signal_reason(proc.returncode)
        return SandboxRun(
            output=output.text(),
            exit_code=None if stopped_by else proc.returncode,
            stopped_by=stopped_by,
            truncated=output.cut > 0,
            elapsed_s=time.perf_counter() - start,
        )

    def _rlimits(self) -> dict[str, tuple[int, int]]:
        lim = self.limits
        cpu = max(1, round(lim.cpu_s))
        rlimits = {
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (lim.memory_bytes, lim.memory_bytes),
            "RLIMIT_FSIZE": (lim.file_size_bytes, lim.file_size_bytes),
            "RLIMIT_CORE": (0, 0),
        }
        if os.geteuid() != 0:  # the kernel does not apply RLIMIT_NPROC to root
            allowed = _user_task_count() + lim.max_processes
            rlimits["RLIMIT_NPROC"] = (allowed, allowed)
        return rlimits

    def _env(self, root: Path) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(root / "work"),
            "TMPDIR": str(root / "tmp"),
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    def _signal_reason(self, returncode: int | None) -> str | None:
        if returncode is None or returncode >= 0:
            return None
        sig = -returncode
        if sig == signal.SIGXCPU:
            return f"CPU time limit of {self.limits.cpu_s:g} s exceeded"
        if sig == signal.SIGXFSZ:
            return f"file size limit of {self.limits.file_size_bytes} bytes exceeded"
        if sig == signal.SIGKILL:  # the server kills only at the wall clock, handled above
            return "killed (SIGKILL: CPU time hard limit, or the system ran out of memory)"
        return f"killed by signal {signal.Signals(sig).name}"

    async def _network_prefix(self) -> tuple[str, ...]:
        if not self.isolate_network:
            return ()
        if self._netns_prefix is None:
            self._netns_prefix = await _probe_netns()
        return self._netns_prefix


class _BoundedOutput:
    """Keeps the first and last bytes of a stream up to a bound, counting what it drops."""

    def __init__(self, limit: int):
        self.head_limit = int(limit * OUTPUT_HEAD_FRACTION)
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_bytes = 0
        self.cut = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK_BYTES):
            self.add(chunk)

    def add(self, chunk: bytes) -> None:
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail.append(chunk)
            self.tail_bytes += len(chunk)
        while self.tail_bytes > self.tail_limit:
            extra = self.tail_bytes - self.tail_limit
            first = self.tail[0]
            if len(first) <= extra:
                self.tail.popleft()
                dropped = len(first)
            else:
                self.tail[0] = first[extra:]
                dropped = extra
            self.tail_bytes -= dropped
            self.cut += dropped

    def text(self) -> str:
        head = self.head.decode("utf-8", errors="replace")
        tail = b"".join(self.tail).decode("utf-8", errors="replace")
        if not self.cut:
            return head + tail
        return f"{head}\n... [output truncated: {self.cut} bytes cut] ...\n{tail}"


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _user_task_count() -> int:
    """Tasks (processes and threads) of this user now: RLIMIT_NPROC counts them all."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
    return count


async def _probe_netns() -> tuple[str, ...]:
    """The command prefix that gives a child its own, empty network namespace, or ()."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in NETNS_PROBES:
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                "true",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            async with asyncio.timeout(NETNS_PROBE_TIMEOUT_S):
                if await proc.wait() == 0:
                    return (*prefix, "--")
        except (OSError, TimeoutError):
            continue
    return ()


class SandboxTool(Tool):
    """The `python` tool the model sees."""

    def __init__(self, sandbox: PythonSandbox | None = None, *, name: str = "python"):
        self.sandbox = sandbox or PythonSandbox()
        lim = self.sandbox.limits
        self.name = name
        self.timeout_s = lim.wall_s + WALL_GRACE_S
        self.description = (
            "Run Python 3 code in a fresh sandboxed interpreter (standard library only) and return "
            "its printed output; the value of a final expression is printed too. No network, no "
            f"subprocesses; limits: {lim.cpu_s:g} s CPU, {lim.wall_s:g} s wall clock, "
            f"{lim.memory_bytes // MIB} MiB memory. Files may be written only in the current "
            "directory, which is discarded after the call."
        )
        self.parameters = {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source code to run."}},
            "required": ["code"],
        }

    async def call(self, arguments: dict[str, Any]) -> str:
        run = await self.sandbox.run(arguments["code"])
        if run.ok:
            return run.output or "(no output)"
        status = run.stopped_by or f"exit code {run.exit_code}"
        raise ToolError(f"{status}\n{run.output}".rstrip())
