"""The sandbox for model-written code (grpo_fast.sandbox), its python tool and its code reward (grpo_fast.code_tools).

Hostile snippets (an infinite loop, a fork bomb, a huge allocation, a write outside the sandbox directory, a
socket connect, a flood of output, an escape from the process group): each is stopped, comes back as an error
result, and a normal program runs fine after it. A protection is asserted to hold exactly where the run reports
it active; where it is not active on the machine, the run must say so (never claim what it does not enforce)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if sys.platform != "linux":
    pytest.skip("the hostile snippets are written for Linux's protections", allow_module_level=True)

from grpo_fast.code_tools import make_code_reward, make_python_tool  # noqa: E402
from grpo_fast.sandbox import run_python, sandbox_protections  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(timeout_s=10, cpu_s=1, memory_mb=512, max_processes=8, max_output_bytes=4096)


@pytest.fixture(scope="module")
def protections():
    return sandbox_protections()


def _session_processes(session: int) -> list[str]:
    """Live processes whose session is ``session`` (zombies are dead already)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                found.append(entry)
    return found


def _runs_after(result) -> None:
    assert not result.ok and result.error_text().startswith("Error: ")
    assert _session_processes(result.pid) == []
    after = run_python("print(sum(range(10)))", **LIMITS)
    assert after.ok and after.stdout == "45\n", after


def test_a_normal_program_runs_isolated_in_a_fresh_directory():
    code = ("import os, sys\nprint(input()[::-1])\nprint(sys.flags.isolated, os.getcwd() == os.environ['HOME'] == "
            "os.environ['TMPDIR'], os.listdir('.'))\nopen('scratch.txt', 'w').write('ok')\n"
            "print(open('scratch.txt').read(), 'SECRET' in os.environ)\n")
    os.environ["SECRET"] = "1"
    try:
        result = run_python(code, stdin="abc\n", **LIMITS)
    finally:
        del os.environ["SECRET"]
    assert result.ok and result.limit is None and result.error_text() == ""
    assert result.stdout == "cba\n1 True ['main.py']\nok False\n"
    second = run_python("import os; print(os.listdir('.'))", **LIMITS)
    assert second.stdout == "['main.py']\n"  # nothing of the first run's directory is left to the next


def test_a_failing_program_reports_its_exit_status_and_traceback():
    result = run_python("raise ValueError('bad input')", **LIMITS)
    assert result.exit_code == 1 and result.limit is None
    assert "ValueError: bad input" in result.error_text() and "exited with status 1" in result.error_text()


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run_python("while True:\n    pass\n", **{**LIMITS, "timeout_s": 60})  # CPU, not wall time, stops it
    assert result.limit == "cpu" and result.signal is not None and "CPU-time limit" in result.error_text()
    _runs_after(result)


def test_a_sleeping_program_is_stopped_at_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(60)\n", **{**LIMITS, "timeout_s": 1})
    assert result.limit == "timeout" and "wall-clock" in result.error_text()
    _runs_after(result)


def test_process_count_limit_and_a_fork_bomb(protections):
    if protections.process_limit is None:
        assert "process-count limit" in protections.not_enforced()
        pytest.skip(f"no process-count limit here ({protections.remarks}); a fork bomb would exhaust the machine")
    spawn = ("import os, time\nstarted = 0\ntry:\n    for _ in range(40):\n        if os.fork() == 0:\n"
             "            time.sleep(30)\n            os._exit(0)\n        started += 1\nexcept OSError as error:\n"
             "    print(started, error.errno)\n    raise\n")
    result = run_python(spawn, **LIMITS)
    started, errno = map(int, result.stdout.split())
    assert errno == 11 and result.limit == "processes"  # EAGAIN from fork
    limit = LIMITS["max_processes"] - 1  # the program itself is one of them
    assert started == limit if protections.process_limit != "uid-count" else started <= limit
    _runs_after(result)  # the sleeping children are gone with the run

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, **{**LIMITS, "timeout_s": 3})  # whichever comes first on a loaded machine
    assert result.limit in ("cpu", "timeout")
    _runs_after(result)


def _is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_that_leaves_the_process_group_is_killed_with_the_run(protections):
    # The child prints its pid as this test sees it (/proc is the host's), then the parent ends the program.
    code = ("import os, time\nread, write = os.pipe()\nif os.fork() == 0:\n    os.setpgid(0, 0)\n"
            "    print(os.readlink('/proc/self'), flush=True)\n    os.write(write, b'x')\n    time.sleep(60)\n"
            "os.read(read, 1)\n")
    result = run_python(code, **LIMITS)
    assert result.ok and _is_gone(int(result.stdout))
    if protections.pid_namespace:  # a new session escapes killpg and the session sweep; the namespace ends it
        result = run_python(code.replace("os.setpgid(0, 0)", "os.setsid()"), **LIMITS)
        assert result.ok and _is_gone(int(result.stdout))


def test_a_huge_allocation_hits_the_memory_limit():
    result = run_python("data = bytearray(64 * 1024 ** 3)\n", **LIMITS)
    assert result.limit == "memory" and "memory limit" in result.error_text() and "MemoryError" in result.stderr
    _runs_after(result)


def test_a_write_outside_the_directory(tmp_path, protections):
    target = tmp_path / "outside.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('escaped')\n", **LIMITS)
    if protections.write_confinement:
        assert not target.exists() and "PermissionError" in result.stderr
        _runs_after(result)
    else:
        assert not result.protections.write_confinement and "write confinement" in result.protections.not_enforced()


def test_a_socket_connect_to_a_local_listener(protections):
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        udp.bind(("127.0.0.1", 0))
        code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ntry:\n"
                f"    s.sendto(b'hello', ('127.0.0.1', {udp.getsockname()[1]}))\nexcept OSError:\n    pass\n"
                f"socket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=5)\nprint('connected')\n")
        result = run_python(code, **LIMITS)
        if protections.network is None:
            assert "network isolation" in result.protections.not_enforced()
            return
        listener.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):  # a loopback connect is queued before connect() returns
            listener.accept()
        if protections.network == "namespace":
            with pytest.raises(BlockingIOError):
                udp.recvfrom(16)
        assert "connected" not in result.stdout
        _runs_after(result)


def test_a_unix_socket_connect_by_path(tmp_path, protections):
    stream_path, datagram_path = tmp_path / "stream.sock", tmp_path / "datagram.sock"
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        listener.bind(str(stream_path))
        listener.listen(8)
        datagram.bind(str(datagram_path))
        code = ("import asyncio, socket\nasyncio.run(asyncio.sleep(0))\nprint('asyncio runs')\ntry:\n"
                "    socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0].sendto(b'hello', %r)\n"
                "except OSError:\n    pass\nsocket.socket(socket.AF_UNIX).connect(%r)\nprint('connected')\n"
                % (str(datagram_path), str(stream_path)))
        result = run_python(code, **LIMITS)
        if not protections.unix_sockets_blocked:
            assert "Unix-socket block" in result.protections.not_enforced()
            return
        listener.setblocking(False)
        datagram.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
        with pytest.raises(BlockingIOError):  # a datagram to a local socket is queued before sendto() returns
            datagram.recvfrom(16)
        assert result.stdout == "asyncio runs\n" and "PermissionError" in result.stderr  # stream pairs stay
        _runs_after(result)


def test_a_flood_of_output_is_cut_at_the_cap():
    result = run_python("import sys\nwhile True:\n    print('x' * 1000)\n    sys.stderr.write('y' * 100)\n", **LIMITS)
    assert result.limit == "output" and result.truncated and "output limit" in result.error_text()
    assert len(result.stdout) + len(result.stderr) == LIMITS["max_output_bytes"]
    assert set(result.stdout) <= {"x", "\n"} and result.stdout.startswith("x" * 1000)
    _runs_after(result)


def test_no_signals_to_processes_outside(protections):
    if not (protections.signal_scope or protections.uid is not None):
        pytest.skip("nothing but the uid stops a signal to the parent here: same uid, no Landlock scope")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        result = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGUSR1)\n", **LIMITS)
        arrived = signal.SIGUSR1 in signal.sigpending()
        if arrived:
            signal.sigwait([signal.SIGUSR1])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    # Landlock's scope refuses it (EPERM), a pid namespace does not even see the pid (ESRCH)
    assert not arrived and re.search(r"^(PermissionError|ProcessLookupError)", result.stderr, re.MULTILINE)
    _runs_after(result)


def test_the_reported_namespaces_and_uid_are_real(protections):
    result = run_python("import os, socket\nprint(os.getpid(), os.getuid(), [n for _, n in socket.if_nameindex()])\n",
                        **LIMITS)
    pid, uid, interfaces = result.stdout.split(" ", 2)
    assert (pid == "1") == protections.pid_namespace
    assert int(uid) == (protections.uid if protections.uid is not None else os.geteuid())
    if protections.network == "namespace":
        assert interfaces.strip() == "['lo']"
    assert protections.rlimits and result.protections == protections


def test_limits_are_checked_by_name():
    with pytest.raises(ValueError, match=r"timeout_s: expected a positive float, received 0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match=r"max_processes: expected a positive int, received -1"):
        make_python_tool(max_processes=-1)
    with pytest.raises(TypeError, match=r"unknown limit\(s\) \['memory'\]"):
        make_code_reward(memory=5)


def test_the_python_tool_schema_and_results():
    from transformers.utils import get_json_schema

    tool = make_python_tool(**{**LIMITS, "timeout_s": 60})
    schema = get_json_schema(tool)["function"]
    assert schema["name"] == "python" and schema["parameters"]["required"] == ["code"]
    assert schema["parameters"]["properties"]["code"]["type"] == "string"
    assert "Python program" in schema["description"]
    assert tool("print(6 * 7)") == "42\n"
    loop = tool("print('started', flush=True)\nwhile True:\n    pass\n")
    assert loop.startswith("started\nError: the program was stopped: it used up its CPU-time limit")
    assert tool("import sys; print('fine')") == "fine\n"


def test_the_code_reward_on_correct_wrong_and_hostile_completions(protections):
    reward = make_code_reward(**LIMITS, max_workers=2)
    solution = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
    completions = [
        solution,
        [{"role": "assistant", "content": solution}],
        "```python\ndef add(a, b):\n    return a * b\n```",  # passes only add(2, 2)
        "```python\ndef add(a, b):\n    return a + b\nimport sys\nsys.exit(0)\n```",  # exits before the tests
        "```python\nimport os, sys\nprint('0' * 32, 3)\nos._exit(0)\n```",  # a forged summary line
        "```python\nwhile True:\n    pass\n```",
        "no code here",
        solution,
    ]
    expected = [1.0, 1.0, pytest.approx(1 / 3), 0.0, 0.0, 0.0, 0.0, 1.0]
    if protections.process_limit is not None:  # without one a fork bomb would take the machine down
        completions.insert(0, "```python\nimport os\nwhile True:\n    os.fork()\n```")
        expected.insert(0, 0.0)
    rows = [tests] * (len(completions) - 1) + ["assert add(2, 3) == 5\nassert add(0, 0) == 0"]
    scores = reward([None] * len(completions), completions, tests=rows, task=["add"] * len(completions))
    assert scores == expected
    assert reward([None], [solution], tests=[None]) == [None]
    with pytest.raises(ValueError, match="needs a 'tests' column"):
        reward([None], [solution], answer=["3"])


_OTHER_PATHS_SCRIPT = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["sandbox"] = sandbox
spec.loader.exec_module(sandbox)
spawn = ("import os, time\\nstarted = 0\\ntry:\\n    for _ in range(40):\\n        if os.fork() == 0:\\n"
         "            time.sleep(30)\\n            os._exit(0)\\n        started += 1\\nexcept OSError:\\n    print(started)\\n")
write = sandbox.run_python("import os\\nprint(os.getuid())\\nopen(%r, 'w')\\n" % sys.argv[2], timeout_s=10, max_processes=8)
count = sandbox.run_python(spawn, timeout_s=10, max_processes=8)
print(json.dumps({"protections": write.protections.__dict__, "uid": int(write.stdout.split()[0]),
                  "write_refused": "PermissionError" in write.stderr, "started": int(count.stdout)}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root, setpriv and a system Python to try the unprivileged paths")
@pytest.mark.parametrize("as_nobody", [False, True], ids=["root-switches-to-nobody", "unprivileged-trainer"])
def test_the_unprivileged_paths(as_nobody):
    """The trainer as root with an interpreter that nobody can run (the uid switch), and as an ordinary user."""
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                            f"import os; open({str(ROOT / 'grpo_fast' / 'sandbox.py')!r})"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("uid 65534 cannot run the system Python or read this checkout here")
    with tempfile.TemporaryDirectory() as directory:  # not pytest's: its parent is private to root
        os.chmod(directory, 0o777)  # only the sandbox's own confinement may stop the write
        target = Path(directory) / "outside.txt"
        script = Path(directory) / "paths.py"
        script.write_text(_OTHER_PATHS_SCRIPT)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
        result = subprocess.run([*prefix, "/usr/bin/python3", str(script), str(ROOT / "grpo_fast" / "sandbox.py"),
                                 str(target)], capture_output=True, text=True, timeout=120, cwd=directory)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        protections = report["protections"]
        assert report["uid"] == 65534 and protections["uid"] == (None if as_nobody else 65534)
        if protections["write_confinement"]:
            assert report["write_refused"] and not target.exists()
        if protections["process_limit"] == "user-namespace":
            assert report["started"] == 7  # max_processes 8, the program included
        elif protections["process_limit"] is not None:
            assert report["started"] <= 7


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher's Linux process limit")
def test_no_process_limit_inside_a_user_namespace_before_linux_5_14(monkeypatch):
    """Before 5.14 a user namespace's processes count with all of the uid's, so a limit set inside would
    strike the trainer's own threads: none is set (a pids cgroup, where active, bounds the run)."""
    import resource

    from grpo_fast import _sandbox_launcher as launcher

    limits = []
    monkeypatch.setattr(resource, "setrlimit", lambda *args: limits.append(args))
    monkeypatch.setattr(launcher.os, "getuid", lambda: 1000)
    for release, counted in (("5.10.0-28-amd64", False), ("5.14.0", True), ("6.18.44-fc", True)):
        monkeypatch.setattr(launcher.os, "uname", lambda: os.uname_result(("Linux", "h", release, "", "x86_64")))
        active = {"user_namespace": True}
        launcher._process_limit({"max_processes": 4}, active)
        assert (active.get("process_limit") == "user-namespace") is counted
    assert len(limits) == 2
