"""Run untrusted, model-written Python in a separate, limited process (opt-in callers only).

Each program runs in a fresh `python -I -S` (no user site, no site-packages, no PYTHON*
variables) whose working directory is an empty temporary directory, deleted afterwards, with:

- a scrubbed environment (no inherited secrets: only PATH, HOME/TMPDIR = that directory),
- resource limits set by the child itself, first thing (`setrlimit` before any program
  code; not in `preexec_fn`, which Python documents as unsafe while the parent runs other
  threads): address space `memory_mb`, CPU seconds, 16 MiB per written file, 64 open files,
  no core dumps; a wall-clock `timeout` that kills the whole process group,
- a guard installed before the program: `open`/`os.open` for writing outside the directory,
  deleting/renaming/chmod anywhere, process creation (`os.system`, `fork`, `exec*`, `spawn*`,
  `subprocess`), `os.kill`/`chdir` and the network (`socket`) raise PermissionError,
- with `isolation="bwrap"` (where bubblewrap is installed), inside a bubblewrap container
  as well: the file system read-only but for the program's directory and a private /tmp,
  new network (none), PID, IPC and user namespaces, killed with its parent.

The guard is defense in depth, not a security boundary: Python code can reach the OS through
`ctypes` and similar; bubblewrap's namespaces are enforced by the kernel. Evaluate models you
do not trust inside a container or VM as well (docs/benchmarks.md#sandbox).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Runs first in the child: its own resource limits (argv: MiB of address space, CPU
# seconds), then limits Python's reach, then executes program.py as __main__.
GUARD = r"""
import resource, sys
_MB = 1 << 20
_mem, _cpu = int(sys.argv[1]) * _MB, int(sys.argv[2])
for _lim, _v in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CPU, _cpu),
                 (resource.RLIMIT_FSIZE, 16 * _MB), (resource.RLIMIT_NOFILE, 64),
                 (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_lim, (_v, _v))
sys.argv = ["program.py"]
import builtins, io, os
ROOT = os.path.realpath(os.getcwd())
def _deny(*a, **k):
    raise PermissionError("blocked by the qexp sandbox")
def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path))
    except TypeError:
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if isinstance(file, int) or (set(mode) & set("wax+") and not _inside(file)):
        _deny()
    return _open(file, mode, *a, **k)
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *a, **k):
    if flags & _WRITE and not _inside(path):
        _deny()
    return _os_open(path, flags, *a, **k)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink",
              "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod",
              "fchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid",
              "putenv", "unsetenv", "symlink", "link", "execv", "execve", "execl", "execle",
              "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
              "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, _deny)
for _mod in ("subprocess", "socket", "_socket", "ctypes", "_ctypes", "multiprocessing",
             "shutil", "resource", "signal"):
    sys.modules[_mod] = None
del _name, _mod
_src = _open("program.py", encoding="utf-8").read()
_globals = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(_src, "program.py", "exec"), _globals)
"""


@dataclass
class SandboxResult:
    """How one program ended: `status` is passed | failed | timeout."""

    status: str
    returncode: int | None
    seconds: float
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


ISOLATION = ("process", "bwrap")


def bwrap_available() -> bool:
    """Whether bubblewrap is installed (`isolation="bwrap"`)."""
    return shutil.which("bwrap") is not None


def _bwrap(workdir: str) -> list[str]:
    """bubblewrap around the child: everything read-only but `workdir` and a private /tmp,
    no network, its own PID/IPC/UTS/user namespaces, gone when its parent dies."""
    return [
        shutil.which("bwrap") or "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--bind", workdir, workdir,
        "--chdir", workdir,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
    ]  # fmt: skip


def run_untrusted(
    code: str, timeout: float = 5.0, memory_mb: int = 512, isolation: str = "process"
) -> SandboxResult:
    """Execute `code` as a script in the sandbox; exit status 0 within the limits = passed."""
    if isolation not in ISOLATION:
        raise ValueError(f"isolation={isolation!r}: one of {', '.join(ISOLATION)}")
    if isolation == "bwrap" and not bwrap_available():
        raise RuntimeError("isolation=bwrap: bubblewrap is not installed (apt install bubblewrap)")
    with tempfile.TemporaryDirectory(prefix="qexp-sandbox-") as d:
        Path(d, "program.py").write_text(code, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": d, "TMPDIR": d, "LANG": "C.UTF-8"}
        cpu = max(1, int(timeout) + 1)
        child = [sys.executable, "-I", "-S", "-c", GUARD, str(memory_mb), str(cpu)]
        if isolation == "bwrap":
            child = [*_bwrap(d), *child]
        start = time.monotonic()
        proc = subprocess.Popen(
            child,
            cwd=d,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # ended just before the kill
                os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            status = "timeout"
        tail = err.decode("utf-8", "replace")[-400:]
        return SandboxResult(status, proc.returncode, time.monotonic() - start, tail)
