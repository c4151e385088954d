"""Run untrusted Python (model-written code) contained: Linux namespaces via util-linux ``unshare``.

What the ``"namespaces"`` sandbox contains (Linux, util-linux >= 2.32, which Debian and Ubuntu ship in the
essential ``util-linux`` package, so no extra install):

- **Files**: a private mount namespace in which every mount is re-mounted read-only; the only writable places are a
  fresh size-limited tmpfs at ``/tmp`` (the program's working dir, also bound at ``/var/tmp`` and ``/dev/shm``),
  gone when the run ends. Writes anywhere else fail with EROFS / EACCES.
- **Processes**: a private PID namespace whose init is our launcher; when the launcher exits or is killed (the
  wall-clock timeout kills it), the kernel kills every process in the namespace, including ``setsid``/daemonised
  grandchildren. The launcher also dies with ``unshare`` (``--kill-child``).
- **Network**: a private network namespace with no interfaces up (no loopback server, no internet).
- **Identity and limits**: when the trainer runs as root, the program runs as a random unprivileged uid (so file
  permissions and ``RLIMIT_NPROC`` apply to it; root ignores both); as a normal user it runs in a user namespace
  with every capability dropped. Per process: address space (``memory_mb``), CPU seconds, file size, no core
  files; at most ``max_procs`` processes/threads, so a fork bomb fails at that count. No new privileges (setuid
  binaries do not elevate).

What it does not contain: reads of world-readable files (the program sees the host's read-only file tree, minus
anything only root may read), CPU and memory use up to the limits above (worst case ``max_procs * memory_mb`` of
memory for ``timeout`` seconds), and kernel exploits: it is process isolation, not a VM. Run untrusted model code
on machines you are willing to lose anyway.

``mode="none"`` is the explicit opt-out: a plain subprocess with the same rlimits, a fresh temp dir as its working
dir and a killed process group, for hosts without namespaces (some containers); it contains nothing.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MODES = ("namespaces", "none")


class SandboxUnavailable(RuntimeError):
    """The requested sandbox cannot run on this host (the message says why and how to opt out)."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0
    """wall-clock seconds; the whole process tree is killed after it"""
    memory_mb: int = 1024
    """address-space limit per process (RLIMIT_AS)"""
    max_procs: int = 32
    """processes + threads the program may have at once (RLIMIT_NPROC for its own uid / user namespace)"""
    file_mb: int = 16
    """largest file the program may write (RLIMIT_FSIZE)"""
    tmp_mb: int = 64
    """size of its writable tmpfs (namespaces mode)"""


@dataclass
class Result:
    returncode: int | None
    """the program's exit status (negative: killed by that signal); None when it timed out"""
    channel: bytes
    """what the program wrote to its result channel (at most 4 KiB are kept)"""
    timed_out: bool


# The launcher runs as PID 1 of the new namespaces, as (namespace) root, with `python -I -S` (nothing imported
# from site-packages, so nothing untrusted runs with privileges). It sets up the mounts, forks the program's
# process, drops privileges there and execs the interpreter on the harness, then waits and exits with its status;
# PID 1 exiting tears the namespace down.
_LAUNCHER = r'''
import ctypes, json, os, resource, stat, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
KEEP = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

def fail(msg):
    os.write(2, ("sppo_fast sandbox: " + msg + "\n").encode())
    os._exit(125)

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        fail(f"mount {target} ({fstype or 'remount/bind'}) failed: {os.strerror(err)}")

def unescape(path):  # mountinfo escapes space, tab, newline and backslash as \ooo
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)

mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
# Interpreter paths that an unprivileged uid cannot reach (pyenv under /root, mode 700): before anything is
# hidden, keep a handle on each, then cover its first non-traversable ancestor with a tmpfs and bind it back.
uid = cfg["uid"]
handles = []
if uid is not None:
    for path in cfg["expose"]:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            if not os.stat(anc).st_mode & stat.S_IXOTH:
                handles.append((anc, path, os.open(path, os.O_PATH)))
                break
    covered = set()
    for anc, path, fd in handles:
        if anc not in covered:
            mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            covered.add(anc)
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        os.close(fd)
# Everything read-only. Per-mount flags such as nosuid must be kept on remount (the kernel refuses to clear
# locked ones in a user namespace).
with open("/proc/self/mountinfo") as f:
    mounts = [(unescape(l.split()[4]), l.split()[5].split(",")) for l in f]
for target, opts in mounts:
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for o in opts:
        flags |= KEEP.get(o, 0)
    if os.path.exists(target) and libc.mount(None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        if err not in (2, 20):  # ENOENT / ENOTDIR: a mount point shadowed by another mount
            fail(f"cannot make {target} read-only: {os.strerror(err)}")
# The only writable place: a size-limited tmpfs, also standing in for the other world-writable dirs. Those mounts
# would hide an interpreter living there (a venv under /tmp): keep a handle on each such path and bind it back,
# read-only, on top.
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
under_scratch = [(path, os.open(path, os.O_PATH)) for path in cfg["expose"]
                 if any(path == d or path.startswith(d + "/") for d in SCRATCH)]
mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmp_mb']}m,mode=1777")
for d in SCRATCH[1:]:
    if os.path.isdir(d):
        os.makedirs("/tmp/.bind" + d, exist_ok=True)
        os.chmod("/tmp/.bind" + d, 0o1777)
        mount("/tmp/.bind" + d, d, None, MS_BIND)
for path, fd in under_scratch:
    os.makedirs(path, exist_ok=True)
    mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(fd)
work = "/tmp/work"
os.mkdir(work, 0o700)
if uid is not None:
    os.chown(work, uid, uid)

pid = os.fork()
if pid == 0:
    try:
        PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAPBSET_DROP = 38, 28, 24
        if uid is not None:  # real root: become an unprivileged uid
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        else:  # user-namespace root: drop every capability for good (noroot + locked, empty bounding set)
            for cap in range(64):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    break
            if libc.prctl(PR_SET_SECUREBITS, 0x2F, 0, 0, 0) != 0:
                fail("cannot drop capabilities (prctl PR_SET_SECUREBITS)")
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            fail("cannot set no_new_privs")
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        os.chdir(work)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        devnull = os.open("/dev/null", os.O_WRONLY)
        os.dup2(devnull, 2)  # the program's stderr is not read (a flood must not fill the parent's memory)
        os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["source"], str(cfg["channel_fd"])], env)
    except BaseException as e:
        fail(f"cannot start the program: {e!r}")
if cfg["channel_fd"] >= 0:
    os.close(cfg["channel_fd"])  # only the program holds the channel: EOF for the parent when it is gone
_, status = os.waitpid(pid, 0)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''


def _expose_paths() -> list[str]:
    """Directories the program's interpreter needs: its prefixes and the site dirs it would import from."""
    paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {p for p in sys.path if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p)}
    paths = sorted(os.path.realpath(p) for p in paths)
    # only the outermost of nested paths is bound
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


def _rlimits(limits: Limits) -> dict[str, int]:
    import math

    return {"RLIMIT_AS": limits.memory_mb * 2**20, "RLIMIT_CPU": int(math.ceil(limits.timeout)) + 1,
            "RLIMIT_FSIZE": limits.file_mb * 2**20, "RLIMIT_CORE": 0, "RLIMIT_NPROC": limits.max_procs}


def _namespaces_cmd(source: str, limits: Limits, channel_fd: int) -> list[str]:
    exe = shutil.which("unshare")
    if exe is None:
        raise SandboxUnavailable("the code sandbox needs `unshare` from util-linux (apt-get install util-linux); "
                                 "or pass sandbox='none' to run model code uncontained")
    root = os.geteuid() == 0
    # As root, sys.executable as is: a venv's bin/python is a symlink to the base interpreter, and only the
    # unresolved path finds the venv's pyvenv.cfg (so its site-packages) under `-I`; its paths are exposed, bound back
    # over the scratch tmpfs where they live there. Unprivileged (a user namespace: untested here, CI runs as root)
    # keeps the resolved base interpreter, which a tmpfs over /tmp cannot hide.
    cfg = {"uid": 10**9 + secrets.randbelow(10**8) if root else None, "expose": _expose_paths() if root else [],
           "rlimits": _rlimits(limits), "tmp_mb": limits.tmp_mb,
           "python": sys.executable if root else os.path.realpath(sys.executable),
           "source": source, "channel_fd": channel_fd}
    ns = ["--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if not root:
        ns = ["--user", "--map-root-user", *ns]
    return [exe, *ns, sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]


def _none_cmd(source: str, limits: Limits, channel_fd: int) -> list[str]:
    # No namespaces: the rlimits are set by a tiny preamble (not preexec_fn: that is unsafe with threads).
    preamble = ("import resource\n"
                f"for _n, _v in {_rlimits(limits)!r}.items():\n"
                "    try: resource.setrlimit(getattr(resource, _n), (_v, _v))\n"
                "    except (ValueError, OSError): pass\n"
                "del _n, _v, resource\n")
    return [sys.executable, "-I", "-c", preamble + source, str(channel_fd)]


def run(source: str, stdin: bytes = b"", *, mode: str = "namespaces", limits: Limits = Limits(),
        channel: bool = True) -> Result:
    """Run Python ``source`` (``python -I -c``) contained per ``mode``; feed it ``stdin``; return its exit status
    and what it wrote to the result channel: a pipe whose fd number is the program's ``sys.argv[1]`` (-1 without
    ``channel``) and that only this parent reads; the program's stdout and stderr are discarded.

    Raises SandboxUnavailable when ``mode`` cannot run here. A program that runs past ``limits.timeout`` seconds
    is killed with all its descendants and gives ``timed_out=True``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; use one of {MODES}")
    if mode == "none":  # still a fresh empty working dir, removed afterwards (but nothing stops writes elsewhere)
        with tempfile.TemporaryDirectory(prefix="sppo_code_") as work:
            return _run(source, stdin, mode, limits, channel, work)
    return _run(source, stdin, mode, limits, channel, None)


def _run(source: str, stdin: bytes, mode: str, limits: Limits, channel: bool, work: str | None) -> Result:
    r_fd = w_fd = None
    if channel:
        r_fd, w_fd = os.pipe()
    fd = -1 if w_fd is None else w_fd
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if work is not None:
        env.update(HOME=work, TMPDIR=work, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        cmd = _namespaces_cmd(source, limits, fd) if mode == "namespaces" else _none_cmd(source, limits, fd)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE if mode == "namespaces" else subprocess.DEVNULL,
                                start_new_session=True, pass_fds=() if w_fd is None else (w_fd,), env=env, cwd=work)
    except BaseException as e:
        for x in (r_fd, w_fd):
            if x is not None:
                os.close(x)
        if isinstance(e, OSError):
            raise SandboxUnavailable(f"cannot start the code sandbox ({mode}): {e}") from e
        raise
    if w_fd is not None:
        os.close(w_fd)
    reader = _ChannelReader(r_fd) if r_fd is not None else None
    timed_out = False
    try:
        _, err = proc.communicate(stdin, timeout=limits.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        err = b""
    finally:
        if proc.poll() is None:
            _kill(proc)
    data = reader.finish() if reader is not None else b""
    if proc.returncode == 125 and err.startswith(b"sppo_fast sandbox:"):
        raise SandboxUnavailable(err.decode(errors="replace").strip() + " (or pass sandbox='none')")
    if mode == "namespaces" and proc.returncode == 1 and b"unshare:" in err[:200]:
        raise SandboxUnavailable(f"unshare cannot create namespaces here: {err.decode(errors='replace').strip()}; "
                                 f"needs root or unprivileged user namespaces (sysctl kernel."
                                 f"unprivileged_userns_clone=1), or pass sandbox='none'")
    return Result(None if timed_out else proc.returncode, data, timed_out)


class _ChannelReader:
    """Reads the result pipe on a thread, keeping at most 4 KiB, so a program flooding it cannot block."""

    def __init__(self, fd: int):
        import threading

        self.fd, self.buf = fd, bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            if len(self.buf) < 4096:
                self.buf += chunk[: 4096 - len(self.buf)]
        os.close(self.fd)

    def finish(self) -> bytes:
        self.thread.join(timeout=5.0)
        return bytes(self.buf)


def _kill(proc: subprocess.Popen) -> None:
    # The group holds unshare and, in namespaces mode, the launcher (PID 1 of the namespace): killing it takes the
    # whole namespace down. In "none" mode a program that called setsid escapes the group: that is the opt-out.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()


@functools.lru_cache(maxsize=None)
def check_available(mode: str = "namespaces") -> None:
    """Raise SandboxUnavailable (saying why) unless ``mode`` works on this host; cached per process."""
    if mode == "none":
        return
    result = run("import os, sys; os.write(int(sys.argv[1]), b'ok')", mode=mode,
                 limits=Limits(timeout=20.0))
    if result.channel != b"ok":
        raise SandboxUnavailable(f"the {mode} code sandbox did not run a trivial program (exit status "
                                 f"{result.returncode}, timed out: {result.timed_out}); pass sandbox='none' to "
                                 f"run model code uncontained")
