"""The code sandbox contains what it says (sppo_fast/sandbox.py): each escape is tried and must fail, and where it
is safe to do so the same program is run uncontained (mode="none") as a control that the escape is real."""
import errno
import os
import secrets
import socket
import stat
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sppo_fast import sandbox as S

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux namespaces")


def run(src, mode="namespaces", **limits):
    """Run `src` with `report(x)` available to send a string back; returns (Result, reported text)."""
    prelude = ("import os, sys\n_fd = int(sys.argv[1])\n"
               "def report(x):\n    os.write(_fd, str(x).encode())\n")
    result = S.run(prelude + textwrap.dedent(src), mode=mode, limits=S.Limits(**limits))
    return result, result.channel.decode()


def test_runs_and_reports():
    result, out = run("report(sum(range(10)))")
    assert (result.returncode, out, result.timed_out) == (0, "45", False)


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged mode runs the resolved base interpreter")
def test_program_sees_the_trainers_environment_read_only():
    """Model code imports what the trainer's environment has: the sandboxed interpreter is the trainer's own (a venv's
    bin/python, whose pyvenv.cfg only the unresolved path finds), even when that venv lives under /tmp, which the
    sandbox covers with its scratch tmpfs; and that environment stays read-only."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    _, out = run(f"""
        import sys, numpy
        try:
            open({os.path.join(site, "sppo_fast_sandbox_probe")!r}, "w")
            wrote = "wrote"
        except OSError as e:
            wrote = type(e).__name__
        report(sys.prefix + "|" + wrote)
        """)
    assert out == f"{sys.prefix}|OSError", out


def test_no_write_outside_its_temp_dir(tmp_path):
    targets = [tmp_path / "escaped", Path.cwd() / f"escaped_{secrets.token_hex(4)}", Path.home() / "escaped"]
    src = f"""
        import os
        results = []
        for path in {[str(t) for t in targets]!r}:
            try:
                with open(path, 'w') as f:
                    f.write('x')
                results.append('wrote')
            except OSError as e:
                results.append(type(e).__name__)
        open('inside.txt', 'w').write('fine')  # its own dir is writable
        report(','.join(results))
        """
    try:
        _, out = run(src)
        assert "wrote" not in out, out
        assert not any(t.exists() for t in targets)
        _, out = run(src, mode="none")  # control: uncontained, the same program does write there
        assert out.split(",")[0] == "wrote" and targets[0].exists()
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


def test_cannot_remount_writable():
    _, out = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.mount(None, b'/', None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY
        try:
            open('/escaped_remount', 'w')
            report(f'{rc} wrote')
        except OSError as e:
            report(f'{rc} {e.errno}')
        """)
    rc, what = out.split()
    assert rc != "0" and what in (str(errno.EROFS), str(errno.EACCES)), out
    assert not Path("/escaped_remount").exists()


def _alive(marker):
    """pids of host processes whose command line contains `marker`."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


SETSID_GRANDCHILD = """
    import subprocess, sys, time
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    report('started')
    {then}
    """


@pytest.mark.parametrize("then", ["pass", "time.sleep(60)"], ids=["program exits", "program times out"])
def test_setsid_grandchild_dies_with_the_sandbox(then):
    marker = f"sppo_sandbox_marker_{secrets.token_hex(6)}"
    result, out = run(SETSID_GRANDCHILD.format(marker=marker, then=then), timeout=2.0)
    assert out == "started" and result.timed_out == (then != "pass")
    deadline = time.monotonic() + 2.0
    while _alive(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _alive(marker) == []


def test_setsid_grandchild_survives_without_the_sandbox():
    # control: in the uncontained mode the same grandchild outlives its parent's process group
    marker = f"sppo_sandbox_marker_{secrets.token_hex(6)}"
    result, out = run(SETSID_GRANDCHILD.format(marker=marker, then="pass"), mode="none", timeout=5.0)
    try:
        assert out == "started"
        time.sleep(0.2)
        assert _alive(marker)
    finally:
        for pid in _alive(marker):
            os.kill(pid, 9)


def test_fork_bomb_is_capped_and_cleaned_up():
    t0 = time.perf_counter()
    result, out = run("""
        import os, time
        n = 0
        try:
            while n < 100000:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            report(f'{n} {e.errno}')
        """, max_procs=16, timeout=5.0)
    n, err = map(int, out.split())
    assert n < 16 and err == errno.EAGAIN, out
    assert result.returncode == 0 and time.perf_counter() - t0 < 5.0  # the children died with the namespace


@pytest.fixture
def listening_port():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]
    server.close()


def test_no_network(listening_port):
    src = f"""
        import socket
        try:
            socket.create_connection(('127.0.0.1', {listening_port}), timeout=2).close()
            report('connected')
        except OSError as e:
            report(type(e).__name__)
        """
    assert run(src)[1] != "connected"
    assert run(src, mode="none")[1] == "connected"  # control: the server is reachable from the host
    _, out = run("""
        import socket
        try:
            socket.getaddrinfo('example.com', 80)
            report('resolved')
        except OSError as e:
            report('no dns')
        """)
    assert out == "no dns"


def test_memory_is_bounded():
    src = """
        try:
            b = bytearray(512 << 20)
            report('allocated')
        except MemoryError:
            report('MemoryError')
        """
    assert run(src, memory_mb=256)[1] == "MemoryError"
    assert run(src, memory_mb=2048)[1] == "allocated"  # control: the limit is what stopped it


def test_tmp_space_is_bounded():
    _, out = run("""
        try:
            with open('big', 'wb') as f:
                for _ in range(64):
                    f.write(b'x' * (1 << 20))
            report('wrote 64 MiB')
        except OSError as e:
            report(e.errno)
        """, tmp_mb=8, file_mb=128)
    assert out == str(errno.ENOSPC)


def test_cpu_runaway_is_killed_at_the_timeout():
    t0 = time.perf_counter()
    result, _ = run("while True: pass", timeout=1.0)
    assert result.timed_out and result.returncode is None
    assert time.perf_counter() - t0 < 3.0


def _visible_host_dir() -> Path:
    """A writable host dir the sandboxed program can see: not under the sandbox's own tmpfs (/tmp, /var/tmp,
    /dev/shm) and reachable by any uid (every ancestor world-searchable; the sandbox hides dirs such as a mode-700
    /root). A file there that it fails to read failed on its permission bits, not because it was out of sight."""
    hidden = [Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm")]

    def visible(d: Path) -> bool:
        return (d.is_dir() and os.access(d, os.W_OK) and not any(d == h or h in d.parents for h in hidden)
                and all(os.stat(a).st_mode & stat.S_IXOTH for a in (d, *d.parents)))

    for d in (Path(__file__).resolve().parent, Path.cwd(), Path("/srv"), Path("/mnt"), Path("/opt")):
        if visible(d):
            return d
    pytest.skip("no writable directory that every uid can reach outside /tmp, /var/tmp and /dev/shm")


def test_runs_unprivileged_and_cannot_read_private_files():
    secret = _visible_host_dir() / f"secret_{secrets.token_hex(4)}"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    src = f"""
        import os
        try:
            read = open({str(secret)!r}).read()
        except OSError as e:
            read = type(e).__name__
        report(f'{{os.getuid()}} {{read}}')
        """
    try:
        uid, read = run(src)[1].split()
        assert uid != "0" and read == "PermissionError"
        if os.geteuid() == 0:
            assert run(src, mode="none")[1].split() == ["0", "s3cret"]  # control
    finally:
        secret.unlink()


def test_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.SandboxUnavailable, match=r"needs `unshare`.*sandbox='none'"):
        S.run("pass")
    with pytest.raises(ValueError, match="unknown sandbox mode 'docker'"):
        S.run("pass", mode="docker")
