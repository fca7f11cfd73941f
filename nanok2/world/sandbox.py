"""The `python` tool: run a model's code in a child process with a time, memory and output budget,
able to write only inside one scratch folder.

Threat model: this guards against a model's *mistakes* (an endless loop, a huge list, a stray
`open("/etc/...", "w")`, an `rm` through `os.system`), not against a determined attacker. The child is
`python -I -B` (no user site, no environment variables, no bytecode files) with a clean environment;
`resource` limits bound its address space (RLIMIT_AS), CPU time (RLIMIT_CPU) and the size of any file
it writes (RLIMIT_FSIZE, which also caps what it prints); a wall-clock timeout kills its whole process
group. Because nanok2 may run as root, file permissions stop nothing, so writes are refused by an
audit hook (PEP 578) installed before the model's code runs: it rejects opening a file for writing,
and removing, renaming, linking or changing any path, outside the scratch folder, and it rejects
starting processes, opening sockets and loading ctypes. Code that escapes audit hooks (a C extension
writing through its own calls, `os.open` with `dir_fd`) is outside what this defends; run untrusted
users' code in a container instead.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0
MEMORY_MB = 512
MAX_OUTPUT = 4000        # characters of stdout (stderr gets half) returned to the model
MAX_FILE_BYTES = 16 << 20  # the largest file the code may write, its stdout and stderr included

# Runs in the child: read the code, set limits, install the audit hook, run the code. Arguments:
# scratch folder, address-space bytes, CPU seconds, file-size bytes.
_CHILD = r'''
import io, linecache, os, resource, sys, traceback
scratch, memory, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
code = sys.stdin.read()
sys.stdin = io.StringIO("")
linecache.cache["<python>"] = (len(code), None, code.splitlines(True), "<python>")  # source in tracebacks
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
os.chdir(scratch)
ROOT = os.path.realpath(scratch)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.chmod": 1,
             "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.setxattr": 1, "os.removexattr": 1,
             "shutil.rmtree": 1, "os.chflags": 1, "os.lchflags": 1}
FORBIDDEN = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
             "os.killpg", "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind", "socket.sendto",
             "ctypes.dlopen", "os.symlink", "os.startfile", "sys.addaudithook")

def inside(path):
    if isinstance(path, int):
        return True  # a descriptor already open (stdout, or a file opened inside the scratch folder)
    real = os.path.realpath(os.fsdecode(path))
    return real == ROOT or real.startswith(ROOT + os.sep)

def refuse(what, why="only the current folder may be written"):
    raise PermissionError(f"sandbox: {what} is not allowed; {why}")

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (flags or 0) & WRITE_FLAGS or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writing and path is not None and not inside(path):
            refuse(f"writing {os.fsdecode(path)!r}")
    elif event in PATH_ARGS:
        for path in args[:PATH_ARGS[event]]:
            if path is not None and not inside(path):
                refuse(f"{event} on {os.fsdecode(path)!r}")
    elif event in FORBIDDEN:
        refuse(event, "no processes, sockets or ctypes")
    elif event == "import" and args[0] in ("ctypes", "_ctypes"):
        raise ImportError(f"sandbox: {args[0]} is not available")

sys.addaudithook(hook)
del hook
try:
    exec(compile(code, "<python>", "exec"), {"__name__": "__main__"})
except SystemExit:
    raise
except BaseException as e:
    # show only the model's own frames: not this wrapper's, not the audit hook's
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != "<string>"]
    sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
                     + "".join(traceback.format_exception_only(type(e), e)))
    sys.exit(1)
'''


def _read(f, limit: int) -> str:
    f.seek(0)
    data = f.read(limit * 4 + 4).decode("utf-8", errors="replace")  # utf-8: at most 4 bytes a character
    size = os.fstat(f.fileno()).st_size
    if len(data) > limit or size > limit * 4 + 4:
        return data[:limit] + f"\n[output truncated: {size} bytes in all, first {limit} characters shown]"
    return data


def run_python(code: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
               max_output: int = MAX_OUTPUT, scratch: str | None = None) -> str:
    """Run `code` and return what it printed, followed by a readable error line if it failed.

    `scratch` is the only folder the code may write (its working directory); by default a fresh one,
    deleted afterwards. Never raises for anything the code does.
    """
    own = scratch is None
    folder = tempfile.mkdtemp(prefix="nanok2-python-") if own else scratch
    env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}  # one BLAS thread: its per-thread buffers would eat the address space
    cpu = max(1, int(timeout_s + 0.999))
    argv = [sys.executable, "-I", "-B", "-c", _CHILD, folder, str(memory_mb << 20), str(cpu), str(MAX_FILE_BYTES)]
    timed_out = False
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=folder, env=env,
                                    start_new_session=True)  # its own process group, killed as a whole
            try:
                proc.communicate(code.encode("utf-8", errors="replace"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stdout, stderr = _read(out, max_output), _read(err, max_output // 2)
    except OSError as e:  # no interpreter, no temp space: still an answer the model can read
        return f"Error: the python tool could not start: {e}"
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
    return _report(proc.returncode, stdout, stderr, timed_out, timeout_s, memory_mb)


def _report(rc: int, stdout: str, stderr: str, timed_out: bool, timeout_s: float, memory_mb: int) -> str:
    parts = [stdout.rstrip("\n")] if stdout.strip() else []
    if stderr.strip():
        parts.append("[stderr]\n" + stderr.rstrip("\n"))
    if timed_out or rc == -signal.SIGXCPU:
        parts.append(f"Error: the code ran past the time limit of {timeout_s:g} s and was stopped.")
    elif "MemoryError" in stderr or rc in (-signal.SIGKILL, -signal.SIGSEGV):
        parts.append(f"Error: the code ran out of memory (limit {memory_mb} MB).")
    elif rc:
        parts.append(f"Error: the code exited with status {rc}.")
    return "\n".join(parts) if parts else "(no output; use print() to show a result)"
