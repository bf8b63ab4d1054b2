"""The sandbox's launcher: ``python -I -S _sandbox_launcher.py CONFIG_JSON``, started by ``grpo_fast.sandbox``.

It runs in the child, single-threaded, before the untrusted code: it puts itself under the limits and the
protections the kernel grants, writes to the status pipe which ones it got, and executes a fresh interpreter
on the program (so nothing of this script stays in the untrusted process). Every step is attempted and its
outcome reported; none is claimed that failed. Only the standard library: this runs with ``-I -S``.

Linux pieces (each optional, probed here): dropping from root to an unprivileged uid (RLIMIT_NPROC means
nothing to root); ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)`` (a network with no interface up,
a process count of its own, and a pid namespace whose processes all die with its first one); Landlock
(writes only under the sandbox directory, no TCP bind/connect, no signals or abstract sockets out of it).
"""

import ctypes
import json
import os
import resource
import struct
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
# The same numbers on every architecture (the syscalls came after the tables were unified).
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE = 1 << 14


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _can_run_as(uid: int, gid: int, paths: list) -> bool:
    """Whether ``uid`` may read the interpreter and its standard library (root's home is often
    private, and an interpreter installed there cannot be run by anyone else)."""
    os.setegid(gid)
    os.seteuid(uid)
    try:
        return all(os.access(path, os.R_OK, effective_ids=True) for path in paths)
    finally:
        os.seteuid(0)
        os.setegid(0)


def _drop_root(libc, cfg: dict, active: dict) -> None:
    uid, gid = cfg["unprivileged_uid"], cfg["unprivileged_gid"]
    if not _can_run_as(uid, gid, [sys.executable, os.path.dirname(os.__file__)]):
        active.setdefault("remarks", []).append(
            f"running as root: uid {uid} cannot read the interpreter or its standard library, so the code runs "
            "as root (no RLIMIT_NPROC for root; only a pids cgroup can bound its processes)")
        return
    os.chown(cfg["directory"], uid, gid)
    os.chown(cfg["program"], uid, gid)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # A uid change leaves /proc/self owned by root, which would forbid writing our own uid_map next.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    active["uid"] = uid


def _unshare(libc, active: dict) -> None:
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        # Map the uid to itself, so that files keep their owners and the code has no capability inside.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        active.update(user_namespace=True, network_namespace=True, pid_namespace=True)
        return
    # Root that kept its uid (no user namespaces here): namespaces of its own without a user namespace.
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWNET) == 0:
        active["network_namespace"] = True
    if os.geteuid() == 0 and libc.unshare(CLONE_NEWPID) == 0:
        active["pid_namespace"] = True


def _tasks_of(uid: int) -> int:
    """The tasks (processes and threads) that RLIMIT_NPROC counts for ``uid`` outside a user namespace."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    count += int(fields["Threads"])
            except (OSError, KeyError, ValueError):
                continue  # it exited while being read
    return count


def _counts_per_user_namespace() -> bool:
    """Linux 5.14 on counts RLIMIT_NPROC per user namespace (ucounts); before, a namespace's processes
    were counted with every other process of the uid it maps to, so a limit set inside one would count
    the trainer's own processes and threads too."""
    try:
        major, minor = (int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 14)


def _process_limit(cfg: dict, active: dict) -> None:
    # Set after unshare: a new user namespace takes the creator's RLIMIT_NPROC as its ceiling in the parent.
    allowed = cfg["max_processes"] + (1 if active.get("pid_namespace") else 0)  # + this launcher, the relay
    if os.getuid() == 0:
        return  # the kernel never applies RLIMIT_NPROC to root
    if active.get("user_namespace"):
        if not _counts_per_user_namespace():
            return  # no exact count to set here: the pids cgroup, where active, is the bound
        active["process_limit"] = "user-namespace"  # the count is this namespace's own
    else:
        allowed += _tasks_of(os.getuid())
        active["process_limit"] = "uid-count"  # shared with the uid's other processes
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))


def _landlock(libc, cfg: dict, active: dict) -> None:
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return
    handled_fs = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    handled_net = 0b11 if abi >= 4 else 0  # TCP bind, TCP connect: handled and never allowed
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals: only within the sandbox
    attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        return
    read_only = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    rules = [("/", read_only), (cfg["directory"], handled_fs),
             ("/dev/null", FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0))]
    for path, access in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", access, fd)
        if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0) != 0:
            return
        os.close(fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return
    active["no_new_privs"] = True
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0:
        active.update(landlock_abi=abi, write_confinement=True, landlock_tcp=abi >= 4, landlock_scope=abi >= 6)


# seccomp: a Unix socket reached by its path (Docker's, a desktop bus, the journal) is neither a write nor a
# network, so neither Landlock nor the network namespace stops it. Refused: socket(AF_UNIX, ...), datagram
# socketpair(AF_UNIX) (it can sendto() any path), io_uring (it opens sockets without these system calls), and
# every system call of another ABI (32-bit calls go around the numbers below). Stream socketpairs (asyncio,
# multiprocessing's pipes) stay.
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_ALU_AND_K, BPF_JEQ_K, BPF_RET_K = 0x20, 0x54, 0x15, 0x06
EPERM, EACCES, ENOSYS, AF_UNIX, SOCK_DGRAM, SOCK_TYPE_MASK = 1, 13, 38, 1, 2, 0xF
X32 = 0x40000000
# machine -> (the audit arch seccomp reports, socket, socketpair, io_uring_setup; x86_64 adds their x32 twins)
SECCOMP_ARCHES = {"x86_64": (0xC000003E, (41, 41 | X32), (53, 53 | X32), (425, 425 | X32)),
                  "aarch64": (0xC00000B7, (198,), (199,), (425,))}


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _assemble(program: list) -> bytes:
    """Classic BPF from (code, k) and (JEQ, k, "label") steps, "label:" strings marking targets."""
    steps = [step for step in program if not isinstance(step, str)]
    labels, index = {}, 0
    for step in program:
        if isinstance(step, str):
            labels[step.rstrip(":")] = index
        else:
            index += 1
    code = []
    for position, step in enumerate(steps):
        if len(step) == 3:  # jump to the label when equal, else fall through
            code.append(struct.pack("=HBBI", step[0], labels[step[2]] - position - 1, 0, step[1]))
        else:
            code.append(struct.pack("=HBBI", step[0], 0, 0, step[1]))
    return b"".join(code)


def _seccomp(libc, active: dict) -> None:
    arch = SECCOMP_ARCHES.get(os.uname().machine)
    if arch is None:
        return
    audit_arch, sockets, socketpairs, io_uring = arch
    program = [
        (BPF_LD_W_ABS, 4),  # seccomp_data.arch
        (BPF_JEQ_K, audit_arch, "native"),
        (BPF_RET_K, SECCOMP_RET_ERRNO | EPERM),
        "native:",
        (BPF_LD_W_ABS, 0),  # seccomp_data.nr
        *[(BPF_JEQ_K, nr, "io_uring") for nr in io_uring],
        *[(BPF_JEQ_K, nr, "socket") for nr in sockets],
        *[(BPF_JEQ_K, nr, "socketpair") for nr in socketpairs],
        (BPF_RET_K, SECCOMP_RET_ALLOW),
        "io_uring:",
        (BPF_RET_K, SECCOMP_RET_ERRNO | ENOSYS),
        "socket:",
        (BPF_LD_W_ABS, 16),  # the low half of args[0] (little-endian), the family, as the kernel's int reads it
        (BPF_JEQ_K, AF_UNIX, "refuse"),
        (BPF_RET_K, SECCOMP_RET_ALLOW),
        "socketpair:",
        (BPF_LD_W_ABS, 16),
        (BPF_JEQ_K, AF_UNIX, "unix_pair"),
        (BPF_RET_K, SECCOMP_RET_ALLOW),
        "unix_pair:",
        (BPF_LD_W_ABS, 24),  # args[1]: the type, with SOCK_CLOEXEC / SOCK_NONBLOCK above the mask
        (BPF_ALU_AND_K, SOCK_TYPE_MASK),
        (BPF_JEQ_K, SOCK_DGRAM, "refuse"),
        (BPF_RET_K, SECCOMP_RET_ALLOW),
        "refuse:",
        (BPF_RET_K, SECCOMP_RET_ERRNO | EACCES),
    ]
    code = ctypes.create_string_buffer(_assemble(program))
    fprog = _SockFprog(len([step for step in program if not isinstance(step, str)]), ctypes.addressof(code))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0:
        active["unix_sockets_blocked"] = True


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status = os.fdopen(cfg["status_fd"], "w", buffering=1)
    active: dict = {}
    try:
        if cfg.get("cgroup_procs"):
            try:
                with open(cfg["cgroup_procs"], "w") as f:
                    f.write(str(os.getpid()))
                active["process_limit_cgroup"] = True
            except OSError as error:  # a delegated cgroup may still refuse a move across subtrees
                active.setdefault("remarks", []).append(f"could not join the pids cgroup: {error}")
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        active["rlimits"] = True
        if sys.platform == "darwin":
            active.setdefault("remarks", []).append(
                "macOS: no memory (address-space) limit, process-count limit, write confinement, network "
                "isolation or pid namespace; only CPU time, file size, open files and the process group kill")
        if sys.platform == "linux":
            libc = _libc()
            if os.geteuid() == 0 and cfg.get("unprivileged_uid") is not None:
                _drop_root(libc, cfg, active)
            _unshare(libc, active)
            _process_limit(cfg, active)
            _landlock(libc, cfg, active)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:  # seccomp needs it too
                active["no_new_privs"] = True
                _seccomp(libc, active)
        argv = [sys.executable, "-I", "-B", *(["-S"] if not cfg["site_packages"] else []), cfg["program"]]
        if active.get("pid_namespace"):
            # The first process of the namespace runs the program; when it ends (or this relay is killed)
            # the kernel kills everything left in the namespace, escaped process groups included.
            child = os.fork()
            if child == 0:
                _libc().prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
                status.close()
                os.execv(sys.executable, argv)
            status.write(json.dumps(active) + "\n")
            _, wait_status = os.waitpid(child, 0)
            status.write(json.dumps({"wait_status": wait_status}) + "\n")
            os._exit(0)
        status.write(json.dumps(active) + "\n")
        status.close()
        os.execv(sys.executable, argv)
    except BaseException as error:  # reported to the parent, which turns it into the run's error
        status.write(json.dumps({**active, "launcher_error": f"{type(error).__name__}: {error}"}) + "\n")
        os._exit(126)


if __name__ == "__main__":
    main()
