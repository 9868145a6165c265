"""The sandboxed `python` tool: output, limits, no network, no processes, no writes outside."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from agentcpu.tools.executor import ToolExecutor
from agentcpu.tools.registry import ToolRegistry
from agentcpu.tools.sandbox import MIB, PythonSandbox, SandboxLimits, SandboxTool

# Generous: the test machine is shared and loaded; a sandboxed interpreter starts in ~0.3 s.
LIMITS = SandboxLimits(
    cpu_s=2, wall_s=20, memory_bytes=256 * MIB, file_size_bytes=MIB, max_output_bytes=4000
)
QUICK_S = 10.0  # "refused quickly": far below the wall-clock limit a hang would hit


def run_code(code: str, limits: SandboxLimits = LIMITS, **kwargs):
    return asyncio.run(PythonSandbox(limits, **kwargs).run(code))


def test_prints_output_and_final_expression():
    run = run_code("import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n6 * 7")
    assert run.ok and run.output == "hello\noops\n42\n"


def test_exception_is_reported_with_its_traceback():
    run = run_code("def f():\n    raise ValueError('bad')\nf()")
    assert run.exit_code == 1 and not run.ok
    assert 'File "<sandbox>", line 2, in f' in run.output and "ValueError: bad" in run.output
    assert "SyntaxError" in run_code("def f(:").output


def test_network_is_refused_quickly():
    with socket.socket() as server:  # a listener that would accept, were the sandbox open
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=60)"
        start = time.perf_counter()
        run = run_code(code)
    assert time.perf_counter() - start < QUICK_S
    assert "PermissionError: network access is disabled in the sandbox" in run.output
    dns = run_code("import socket\nsocket.getaddrinfo('example.com', 80)")
    assert "network access is disabled in the sandbox" in dns.output
    # local socket pairs stay usable, so asyncio works
    assert run_code("import asyncio\nasync def f(): return 5\nasyncio.run(f())").output == "5\n"


def test_runaway_code_is_stopped_within_its_limits():
    looping = PythonSandbox(SandboxLimits(cpu_s=1, wall_s=3))
    sleeping = PythonSandbox(SandboxLimits(wall_s=2))

    async def main():
        return await asyncio.gather(
            looping.run("while True:\n    pass"),
            sleeping.run("import time\nprint('before', flush=True)\ntime.sleep(60)"),
        )

    start = time.perf_counter()
    loop, sleeper = asyncio.run(main())
    assert time.perf_counter() - start < looping.limits.wall_s + QUICK_S
    # on an idle machine the CPU limit hits first; on a loaded one the wall clock may
    assert loop.stopped_by is not None and not loop.ok
    assert "CPU time limit" in loop.stopped_by or "wall-clock limit" in loop.stopped_by
    assert sleeper.stopped_by == "wall-clock limit of 2 s exceeded" and sleeper.output == "before\n"


def test_memory_hogs_are_stopped():
    big = run_code("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert "MemoryError" in big.output and "allocated" not in big.output
    growing = run_code("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))")
    assert "MemoryError" in growing.output and not growing.ok


def test_fork_bomb_is_refused(tmp_path):
    # Bounded on purpose: if the sandbox let it through, 20 sleepers would appear, not a storm.
    bomb = (
        "import os, time\n"
        "for i in range(20):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "print('forked')"
    )
    start = time.perf_counter()
    run = run_code(bomb, base_dir=str(tmp_path))
    assert time.perf_counter() - start < QUICK_S
    assert "starting processes is not allowed in the sandbox" in run.output
    assert "forked" not in run.output
    spawn = run_code("import subprocess\nsubprocess.run(['true'])")
    assert "starting processes is not allowed in the sandbox" in spawn.output
    assert _processes_mentioning(str(tmp_path)) == []


def test_writes_stay_inside_the_sandbox_directory(tmp_path):
    outside = tmp_path / "outside.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    code = f"""
import os, shutil, tempfile
open('inside.txt', 'w').write('ok')
os.mkdir('sub'); shutil.rmtree('sub')
with tempfile.NamedTemporaryFile() as f: f.write(b'tmp ok')
attempts = {{
    'open': lambda: open({str(outside)!r}, 'w'),
    'os.open': lambda: os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT),
    'remove': lambda: os.remove({str(victim)!r}),
    'rename': lambda: os.rename({str(victim)!r}, 'stolen.txt'),
    'mkdir': lambda: os.mkdir({str(tmp_path / "newdir")!r}),
    'rmtree': lambda: shutil.rmtree({str(tmp_path)!r}),
    'symlink': lambda: (os.symlink({str(outside)!r}, 'link'), open('link', 'w')),
    'hardlink': lambda: os.link({str(victim)!r}, 'hard'),
    'dir_fd': lambda: os.open('victim.txt', os.O_WRONLY, dir_fd=os.open({str(tmp_path)!r}, 0)),
}}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, 'ALLOWED')
    except PermissionError as e:
        print(name, 'refused')
print(sorted(os.listdir('.')))
"""
    run = run_code(code, base_dir=str(tmp_path))
    assert run.ok, run.output
    assert "ALLOWED" not in run.output and run.output.count("refused") == 9
    assert "['inside.txt', 'link']" in run.output
    assert not outside.exists() and victim.read_text() == "keep me"
    assert not (tmp_path / "newdir").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["victim.txt"]  # sandbox dir removed


def test_file_size_limit():
    run = run_code("open('big', 'wb').write(b'x' * (2 * 1024**2))")
    assert "File too large" in run.output or "file size limit" in (run.stopped_by or "")


def test_output_is_truncated_with_a_marker():
    run = run_code("print('a' * 50_000)\nprint('THE END')")
    assert run.truncated and len(run.output) < LIMITS.max_output_bytes + 100
    assert "[output truncated:" in run.output and run.output.startswith("aaa")
    assert run.output.endswith("THE END\n")


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("AGENTCPU_TEST_SECRET", "hunter2")
    run = run_code("import os\nprint(sorted(os.environ))\nprint(os.getcwd())")
    assert "AGENTCPU_TEST_SECRET" not in run.output
    assert not Path(run.output.splitlines()[1]).exists()


def test_tool_through_the_executor_and_cancellation_kills_the_group(tmp_path):
    tool = SandboxTool(PythonSandbox(LIMITS, base_dir=str(tmp_path)))
    assert tool.schema()["function"]["parameters"]["required"] == ["code"]

    async def main():
        async with ToolExecutor(ToolRegistry([tool]), timeout_s=30) as ex:
            good = await ex.run("python", {"code": "print(1 + 1)"})
            bad = await ex.run("python", {"code": "1 / 0"})
            hung = await ex.run("python", {"code": "import time\ntime.sleep(60)"}, timeout_s=1.0)
        return good, bad, hung

    good, bad, hung = asyncio.run(main())
    assert (good.ok, good.content) == (True, "2\n")
    assert not bad.ok and "exit code 1" in bad.content and "ZeroDivisionError" in bad.content
    assert not hung.ok and "timed out" in hung.content
    assert _processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_process_limit_is_set_for_non_root_users(monkeypatch):
    # The kernel ignores RLIMIT_NPROC for root, so the sandbox sets it only for other users.
    monkeypatch.setattr("agentcpu.tools.sandbox.os.geteuid", lambda: 1000)
    run = run_code("import resource\nresource.getrlimit(resource.RLIMIT_NPROC)")
    soft, hard = eval(run.output)
    assert soft == hard and LIMITS.max_processes < soft < 10_000_000


def test_limits_are_checked():
    with pytest.raises(ValueError, match="cpu_s"):
        SandboxLimits(cpu_s=0)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found
