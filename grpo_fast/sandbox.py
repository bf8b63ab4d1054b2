"""Run model-written Python in a separate, limited process: ``run_python``, the ``python`` tool for tool-calling
rollouts (``make_python_tool``) and a test-running code reward (``make_code_reward``).

Each run gets a fresh temporary directory (its working directory, ``HOME`` and ``TMPDIR``), a minimal
environment, an interpreter in isolated mode, its own session (the whole process group is killed at the
wall-clock limit and when the program ends), and resource limits: CPU seconds, address space, file size,
open files, no core files. Output is read as it comes and the run is killed once it passes the cap.

On Linux the launcher (``_sandbox_launcher.py``) adds what the kernel grants without asking anyone: a
user + network + pid namespace, Landlock write confinement, an unprivileged uid when started as root, a
process-count limit. It reports which it got; ``SandboxResult.protections`` carries that report and
``sandbox_protections()`` probes it once. What this does not isolate is listed in the docs
(docs/code-execution.md): it is a guard against accidents and runaway programs, not a security boundary
against a determined attacker.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
_CGROUP_COUNTER = itertools.count()


@dataclass(frozen=True)
class Protections:
    """What the kernel granted one run (``False``/``None``: not enforced there)."""

    rlimits: bool = False  # CPU time, address space, file size, open files, no core files
    process_limit: str | None = None  # "user-namespace" (exact), "uid-count" (shared with the uid), "cgroup"
    uid: int | None = None  # the unprivileged uid a root parent's child switched to
    write_confinement: bool = False  # Landlock: writes only under the sandbox directory
    network: str | None = None  # "namespace" (no network at all), "landlock-tcp" (no TCP bind/connect)
    pid_namespace: bool = False  # every process of the run dies with it, escaped process groups too
    signal_scope: bool = False  # Landlock: no signals to processes outside the sandbox
    no_new_privs: bool = False  # setuid programs gain nothing
    unix_sockets_blocked: bool = False  # seccomp: socket(AF_UNIX) refused (Docker's socket and the like)
    remarks: str = ""  # why a protection the launcher tried was not granted

    @classmethod
    def from_report(cls, report: dict) -> "Protections":
        network = "namespace" if report.get("network_namespace") else "landlock-tcp" if report.get("landlock_tcp") else None
        process_limit = report.get("process_limit") or ("cgroup" if report.get("process_limit_cgroup") else None)
        return cls(rlimits=bool(report.get("rlimits")), process_limit=process_limit, uid=report.get("uid"),
                   write_confinement=bool(report.get("write_confinement")), network=network,
                   pid_namespace=bool(report.get("pid_namespace")), signal_scope=bool(report.get("landlock_scope")),
                   no_new_privs=bool(report.get("no_new_privs")),
                   unix_sockets_blocked=bool(report.get("unix_sockets_blocked")), remarks="; ".join(report.get("remarks", [])))

    def not_enforced(self) -> list[str]:
        """The protections this run lacked, in words."""
        missing = [("resource limits", self.rlimits), ("process-count limit", self.process_limit),
                   ("write confinement", self.write_confinement), ("network isolation", self.network),
                   ("pid namespace", self.pid_namespace), ("Unix-socket block", self.unix_sockets_blocked)]
        return [name for name, present in missing if not present]


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when a signal ended it
    signal: int | None
    limit: str | None  # what stopped it: "timeout", "cpu", "memory", "output", "processes", "file_size"
    wall_s: float
    cpu_s: float
    truncated: bool
    protections: Protections
    pid: int  # the launcher's pid: the run's session and process-group id

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None

    def error_text(self) -> str:
        """What went wrong, in a sentence the model can read (empty when it ran fine)."""
        if self.ok:
            return ""
        what = {"timeout": "it ran past the wall-clock limit", "cpu": "it used up its CPU-time limit",
                "memory": "it ran out of its memory limit", "output": "it printed more than the output limit",
                "processes": "it hit the process-count limit", "file_size": "it wrote a file past the size limit"}
        if self.limit:
            reason = f"the program was stopped: {what[self.limit]}"
        elif self.signal is not None:
            reason = f"the program was killed by signal {signal.Signals(self.signal).name}"
        else:
            reason = f"the program exited with status {self.exit_code}"
        tail = self.stderr.strip()[-2000:]
        return f"Error: {reason}." + (f"\n{tail}" if tail else "")


def _check_positive(name: str, value: Any, kind: type = int) -> None:
    if not isinstance(value, (int, float) if kind is float else int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive {kind.__name__}, received {value!r}")


def check_limits(*, timeout_s: float, cpu_s: int | None, **positive_ints: int) -> int:
    """Validate ``run_python``'s limits (each names itself when wrong); returns ``cpu_s`` with its default."""
    _check_positive("timeout_s", timeout_s, float)
    cpu_s = int(-(-timeout_s // 1)) if cpu_s is None else cpu_s
    for name, value in {"cpu_s": cpu_s, **positive_ints}.items():
        _check_positive(name, value)
    return cpu_s


def _cgroup_for_run(max_pids: int) -> Path | None:
    """A fresh pids cgroup under this process's own (cgroup v1 ``pids`` or v2 with pids delegated), where this
    process may create one (usually root); None elsewhere. It bounds the run's processes even for root."""
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in own:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "pids" not in controllers.split(","):
            continue
        for mount in mounts:
            fields = mount.split(" - ")
            if len(fields) != 2:
                continue
            mount_point, (fstype, _, options) = fields[0].split()[4], fields[1].split()[:3]
            if (v2 and fstype == "cgroup2") or (not v2 and fstype == "cgroup" and "pids" in options.split(",")):
                parent = Path(mount_point + path)
                group = parent / f"grpo-fast-sandbox-{os.getpid()}-{next(_CGROUP_COUNTER)}"
                try:
                    if v2 and "pids" not in (parent / "cgroup.subtree_control").read_text().split():
                        continue
                    group.mkdir()
                except OSError:
                    continue
                try:
                    (group / "pids.max").write_text(str(max_pids))
                    return group
                except OSError:
                    group.rmdir()
    return None


def _kill_cgroup(group: Path) -> None:
    for _ in range(200):  # each pass kills what is there; a process mid-fork can add one more
        try:
            pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            break
        _kill(pids)
        time.sleep(0.005)
    for _ in range(200):  # killed tasks leave the group when the kernel has torn them down
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.005)


def _limit_from_stderr(stderr: str) -> str | None:
    if re.search(r"^MemoryError\b", stderr, re.MULTILINE):
        return "memory"
    if re.search(r"BlockingIOError: \[Errno 11\]", stderr):
        return "processes"
    if re.search(r"\[Errno 27\] File too large", stderr):
        return "file_size"
    return None


def run_python(code: str, *, stdin: str | None = None, timeout_s: float = 10.0, cpu_s: int | None = None,
               memory_mb: int = 1024, max_processes: int = 16, max_output_bytes: int = 64 * 1024,
               max_file_mb: int = 64, max_open_files: int = 256, site_packages: bool = True,
               unprivileged_uid: int | None = 65534) -> SandboxResult:
    """Run ``code`` as a Python program in a limited child process and return what it did.

    ``cpu_s`` defaults to ``ceil(timeout_s)``; ``max_processes`` counts processes and threads, the program's
    own included; ``max_output_bytes`` caps stdout and stderr together (the run is killed past it).
    ``unprivileged_uid`` is the uid a root parent runs the code as (None: stay root, which no process-count
    rlimit applies to). ``site_packages=False`` leaves the installed packages out (``-S``).
    """
    if sys.platform == "win32":
        raise OSError("grpo_fast.sandbox: running model-written code is not supported on Windows "
                      "(it relies on POSIX resource limits and process groups); use Linux, or WSL")
    if not isinstance(code, str):
        raise TypeError(f"code: expected a str, received {type(code).__name__}")
    cpu_s = check_limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_processes=max_processes,
                         max_output_bytes=max_output_bytes, max_file_mb=max_file_mb, max_open_files=max_open_files)
    rlimits = {"RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": max_file_mb << 20, "RLIMIT_NOFILE": max_open_files,
               "RLIMIT_CORE": 0}
    if sys.platform != "darwin":  # macOS accepts RLIMIT_AS but does not enforce it
        rlimits["RLIMIT_AS"] = memory_mb << 20

    with tempfile.TemporaryDirectory(prefix="grpo-fast-sandbox-") as directory, tempfile.TemporaryFile() as stdin_file:
        program = Path(directory) / "main.py"
        program.write_text(code)
        stdin_file.write((stdin or "").encode())
        stdin_file.seek(0)
        status_read, status_write = os.pipe()
        # + 1: the launcher, which stays as the relay when there is a pid namespace
        group = _cgroup_for_run(max_processes + 1) if sys.platform == "linux" else None
        config = {"status_fd": status_write, "rlimits": rlimits, "directory": directory, "program": str(program),
                  "max_processes": max_processes, "site_packages": site_packages,
                  "unprivileged_uid": unprivileged_uid, "unprivileged_gid": unprivileged_uid,
                  "cgroup_procs": str(group / "cgroup.procs") if group else None}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_LAUNCHER), json.dumps(config)], stdin=stdin_file,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=directory, env=env, pass_fds=(status_write,),
                start_new_session=True)
        except BaseException:  # it never started (EAGAIN, EMFILE, ENOMEM...): leave nothing behind
            os.close(status_read)
            if group is not None:
                _kill_cgroup(group)
            raise
        finally:
            os.close(status_write)
        child = _Child(process.pid)
        try:
            out, err, limit, truncated = _collect(process, child, start + timeout_s, max_output_bytes, group)
            if sys.platform == "linux":
                _end_session(process.pid)  # before reaping: the session id stays ours while the leader is a zombie
            wait_status, usage = child.reap()
            process.returncode = -1  # reaped above; keeps Popen from waiting on a pid that is gone
        finally:
            if group is not None:
                _kill_cgroup(group)
            with os.fdopen(status_read) as status:
                reports = [json.loads(line) for line in status.read().splitlines() if line.strip()]
        wall_s = time.monotonic() - start
    report = reports[0] if reports else {}
    if "launcher_error" in report:
        raise OSError(f"grpo_fast.sandbox: the launcher failed before running the code: {report['launcher_error']}")
    if len(reports) > 1:  # the relay's report of its child, the program
        wait_status = reports[1]["wait_status"]
    exit_code = os.waitstatus_to_exitcode(wait_status)
    signal_number = -exit_code if exit_code < 0 else None
    cpu_used = usage.ru_utime + usage.ru_stime
    stderr = err.decode("utf-8", "replace")
    if limit is None and signal_number in (signal.SIGXCPU, signal.SIGKILL) and cpu_used >= cpu_s - 0.05:
        limit = "cpu"
    if limit is None and exit_code != 0:
        limit = _limit_from_stderr(stderr)
    return SandboxResult(stdout=out.decode("utf-8", "replace"), stderr=stderr,
                         exit_code=None if signal_number else exit_code, signal=signal_number, limit=limit,
                         wall_s=wall_s, cpu_s=cpu_used, truncated=truncated,
                         protections=Protections.from_report(report), pid=process.pid)


class _Child:
    """The launcher's process: whether it has ended, and its exit status and resource usage once reaped."""

    def __init__(self, pid: int):
        self.pid = pid
        self.reaped: tuple[int, Any] | None = None

    def ended(self) -> bool:
        if hasattr(os, "waitid"):
            # Without reaping it: while it is a zombie its process-group id cannot be reused, so killing the
            # group afterwards cannot hit an unrelated process.
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        if self.reaped is None:  # macOS has no WNOWAIT: reaped here, the group id could in theory be reused
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.reaped = (status, usage)
        return self.reaped is not None

    def reap(self) -> tuple[int, Any]:
        if self.reaped is None:
            _, status, usage = os.wait4(self.pid, 0)
            self.reaped = (status, usage)
        return self.reaped


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(process: subprocess.Popen, child: _Child, deadline: float, cap: int, group: Path | None):
    """Read stdout and stderr as they come until both close, the deadline passes or the output passes ``cap``;
    wait for the launcher to end (until the deadline: with a pid namespace it still has to report its child's
    status), then kill whatever is left of the process group and the cgroup."""
    buffers = {process.stdout: bytearray(), process.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in buffers:
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    limit, truncated, swept = None, False, False
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                limit = "timeout"
                break
            for key, _ in selector.select(min(remaining, 0.05)):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                room = cap - sum(len(b) for b in buffers.values())
                buffers[key.fileobj] += chunk[:max(room, 0)]
                if len(chunk) > room:
                    limit, truncated = "output", True
                    break
            if limit:
                break
            if not swept and child.ended():
                _kill_group(process.pid)  # what it left behind in its group holds the pipes open
                if group is not None:
                    _kill_cgroup_members(group)
                if sys.platform == "linux":  # and in other groups of its session (no pid namespace)
                    _end_session(process.pid)
                swept = True
        while limit is None and not child.ended():
            if time.monotonic() >= deadline:  # it closed its output but runs on
                limit = "timeout"
                break
            time.sleep(0.005)
    finally:
        _kill_group(process.pid)
        if group is not None:
            _kill_cgroup_members(group)
        selector.close()
        process.stdout.close()
        process.stderr.close()
    return bytes(buffers[process.stdout]), bytes(buffers[process.stderr]), limit, truncated


def _session_members(session: int) -> list[int]:
    """Live processes of a session (Linux), zombies left out: they are already dead, waiting for a parent."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # it exited while being read
            if int(fields[3]) == session and fields[0] not in "ZX":
                members.append(int(entry))
    return members


def _end_session(session: int) -> None:
    """Kill what is left of the run's session and wait until it is gone: processes that moved to another
    process group escape ``killpg`` but not this (only ``setsid`` escapes it, which the pid namespace and
    the cgroup cover where active)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        members = [pid for pid in _session_members(session) if pid != session]
        if not members:
            return
        _kill(members)
        time.sleep(0.005)


def _kill(pids) -> None:
    """SIGKILL each of ``pids`` (one that has already gone is fine)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_cgroup_members(group: Path) -> None:
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    except OSError:
        pass


@functools.cache
def sandbox_protections() -> Protections:
    """The protections a run gets on this machine with the default settings (probed once, with ``pass``)."""
    return run_python("pass", timeout_s=30).protections
