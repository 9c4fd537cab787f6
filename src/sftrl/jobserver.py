"""Job server: run `sftrl` commands in processes forked from one that has already imported torch and transformers.

Why: on the embedded default most jobs compute for about a second, while importing torch and transformers' model
stack costs ~4 s of CPU (torch.distributed.tensor, torch._dynamo, sympy and scipy.optimize come with it), and
`make results` and `make test` start hundreds of jobs. Snakemake starts one process per shell job, and
multiprocessing's forkserver serves only the process that started it, so nothing we use does this: it is written
here, standard library only.

How: `python -m sftrl.jobserver COMMAND [ARGS]` starts a server on a private Unix socket, runs COMMAND (e.g.
snakemake) with SFTRL_JOBSERVER naming the socket, and stops the server when COMMAND exits, with its exit status.
The `sftrl` entry point (sftrl.cli) sees the variable and hands the server its arguments, working directory,
environment, umask and its stdin / stdout / stderr themselves (file descriptors, SCM_RIGHTS), so a rule's log
redirection holds. The server forks; the fork becomes the job; the client waits and exits with the job's status
(killed by a signal: the same signal). A signal sent to the client is passed on to the job, and a client killed
outright (kill -9, a killed Snakemake) has its job killed by the server: a job never outlives its client.

What makes a warm job the same as a cold one: the server imports no sftrl module that a job runs (the job imports
them afresh from disk, so an edited module takes effect at once), the job gets the client's environment, and the
per-job thread counts Snakemake sets (OMP_NUM_THREADS and its siblings) are applied to torch and to the BLAS and
OpenMP pools (threadpoolctl). Anything else read at import time could differ, so the server refuses a client whose
environment differs from the server's in any other variable, or whose Python is another one, and the client then
runs the command itself, the ordinary way; so does a client whose server cannot be reached. A job that SLURM
placed (SLURM_JOB_ID set) never uses a server: it runs in its own allocation.

One thing does differ: Snakemake's `benchmark:` files measure the job's process tree, which is now the client, so
their wall-clock seconds (what scripts/stage_timings.py reads) stay right, but their memory and CPU columns do not;
run Snakemake without this wrapper to measure a job's memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ENV = "SFTRL_JOBSERVER"
PROTOCOL = 1
# Set by Snakemake for each job (its `threads`) and applied to the job after the fork: apply_threads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                    "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
# Read after the fork, or by no imported module: may differ between the server and a job. (tempfile's cached
# directory is reset in the job; sftrl modules, which read SFTRL_*, are imported by the job itself.)
PER_JOB_VARIABLES = frozenset(THREAD_VARIABLES) | {"TMPDIR", "TMP", "TEMP", "TEMPDIR", "PWD", "OLDPWD", "SHLVL", "_"}
# What a job imports before it computes anything: torch, and transformers' model classes and generation code
# (the costly part: sftrl.modeling loads every model through them). Left out: pandas, scipy.stats, matplotlib and
# seaborn (figures and tables, ~2 s each job): importing them here started two more threads, not identified, and a
# fork copies no thread. (The threads the preload starts are OpenBLAS's, which shuts them down across a fork.)
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.llama.modeling_llama", "safetensors.torch", "threadpoolctl")
_HEADER = struct.Struct("!I")
# Signals a client passes on to its job (Snakemake stops a job with SIGTERM; Ctrl-C is SIGINT).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class Refused(Exception):
    """The server will not run this request (the message says why); the client runs the command itself."""


def environment_difference(server_env: dict, job_env: dict) -> list[str]:
    """Variables, other than the per-job ones and sftrl's own, whose values differ between the two environments:
    an imported module may have read them, so a job whose environment differs in them must start cold."""
    keys = (server_env.keys() | job_env.keys()) - PER_JOB_VARIABLES
    return sorted(k for k in keys if not k.startswith("SFTRL_") and server_env.get(k) != job_env.get(k))


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [payload], list(fds)) if fds else sock.send(payload)
    if sent < len(payload):
        sock.sendall(payload[sent:])


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (JSON, never pickle) and the file descriptors sent with it; (None, []) at end of stream."""
    data, fds, _, _ = socket.recv_fds(sock, 65536, max_fds) if max_fds else (sock.recv(65536), [], 0, None)
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        more = sock.recv(65536)
        if not more:
            for fd in fds:
                os.close(fd)
            return None, []
        data += more
    (length,) = _HEADER.unpack_from(data)
    return json.loads(data[_HEADER.size:_HEADER.size + length]), fds


# ---------------------------------------------------------------------------------------------------- the client

def run_in_server(argv: list[str]) -> int | None:
    """Run `sftrl ARGV` in the server named by SFTRL_JOBSERVER and return its exit status; None when there is no
    server to use (unset, unreachable, under SLURM, or refused): the caller then runs the command itself."""
    path = os.environ.get(ENV)
    if not path or "SLURM_JOB_ID" in os.environ:
        return None
    # From here on a signal for this process is the job's: held until the job's pid is known, then passed on
    job, held = {}, []
    previous = {number: signal.signal(number, lambda number, frame: os.kill(job["pid"], number) if job
                                      else held.append(number)) for number in FORWARDED}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            print(f"sftrl: no job server at {path!r} ({err.strerror}; {ENV}); running cold", file=sys.stderr)
            raise
        open_fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
        umask = os.umask(0)
        os.umask(umask)
        _send(sock, {"protocol": PROTOCOL, "python": _python(), "argv": argv, "cwd": os.getcwd(),
                     "umask": umask, "env": dict(os.environ), "fds": open_fds}, open_fds)
        reply, _ = _receive(sock)
    except OSError:
        reply = None
    if reply is None or "pid" not in reply:
        sock.close()
        if reply:  # said in the job's log: a run whose jobs all start cold should know why
            print(f"sftrl: job server refused ({reply.get('refused')}); running cold", file=sys.stderr)
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in held:  # the command runs here after all: it gets them itself
            signal.raise_signal(number)
        return None
    pid = job["pid"] = reply["pid"]
    for number in held:
        os.kill(pid, number)
    status, _ = _receive(sock)  # a forwarded signal's handler runs and the wait goes on (PEP 475)
    if status is None:  # the server died (killed?): its job must not run on unseen
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        print(f"sftrl: the job server went away before its job {pid} ended; the job was stopped", file=sys.stderr)
        return 1
    code = status["returncode"]
    if code < 0:  # killed by a signal: end the same way, so that the caller sees what a cold job would show
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _python() -> str:
    """Which Python (its environment and version): a job runs warm only in the server's own."""
    return f"{sys.prefix} {sys.version}"


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- the server

def serve(path: str, parent: int) -> None:
    """Listen on PATH until SIGTERM, or until PARENT, the process that started the server, is gone (then it is no
    longer the server's parent: a killed wrapper leaves no server behind); each accepted request is forked into a
    job (or refused). Ctrl-C is not for the server: the jobs get it from the terminal, as cold ones would, and end
    the way they end then; the server stops when its command has."""
    server_env = dict(os.environ)  # as it was before anything was imported
    server_pid = os.getpid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # before the imports: clients that come meanwhile wait in the backlog, none runs cold
    listener.listen(128)
    os.chmod(path, 0o600)
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    wake_read, wake_write = socket.socketpair()
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    stopping = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # pid -> its client's connection
    try:
        while not stopping and os.getppid() == parent:
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is wake_read:
                    wake_read.recv(4096)
                    _reap(jobs, selector)
                elif key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _start_job(conn, server_env, inherited=[selector, listener, wake_read, wake_write,
                                                                  *jobs.values()])
                    if pid:
                        jobs[pid] = conn
                        selector.register(conn, selectors.EVENT_READ, pid)
                else:  # a client's connection is readable: it has gone (a client sends nothing after its request)
                    with contextlib.suppress(OSError):
                        key.fileobj.recv(1)
                    if key.data in jobs:
                        _kill(key.data)
                    selector.unregister(key.fileobj)
    finally:
        if os.getpid() == server_pid:
            for pid in list(jobs):
                _kill(pid)
            with contextlib.suppress(OSError, KeyError):
                os.unlink(path)


def _start_job(conn: socket.socket, server_env: dict, inherited: list) -> int | None:
    """Fork a job for the request on CONN; the job never returns from here. Returns its pid (None if refused).
    INHERITED: the server's sockets and selector, which the job closes (another job's client must see its end)."""
    conn.settimeout(10)
    fds = []
    try:
        request, fds = _receive(conn, max_fds=3)
        if request is None:
            raise Refused("no request")
        if request.get("protocol") != PROTOCOL or request.get("python") != _python():
            raise Refused(f"another client: {request.get('python')}, protocol {request.get('protocol')}")
        differing = environment_difference(server_env, request["env"])
        if differing:
            raise Refused(f"environment differs in {', '.join(differing[:5])}")
    except (Refused, OSError, ValueError, KeyError) as err:
        for fd in fds:  # the client's stdout / stderr: held here, its caller would wait for their end forever
            os.close(fd)
        with contextlib.suppress(OSError, KeyError):
            _send(conn, {"refused": str(err)})
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    # a signal passed on by the client as soon as it has the pid must find the job's own handlers: held until then
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        for resource in inherited:
            resource.close()
        conn.close()
        _become_job(request, fds, mask)  # exits
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    with contextlib.suppress(OSError, KeyError):
        _send(conn, {"pid": pid})
    return pid


def _become_job(request: dict, fds: list[int], mask) -> None:
    """In the fork: take on the client's file descriptors, directory, environment and threads, import sftrl
    afresh and run the command. Ends the process the way a cold `sftrl` run ends."""
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, *FORWARDED):  # a cold Python's handlers
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    for target in (0, 1, 2):
        if target in request["fds"]:
            os.dup2(fds[request["fds"].index(target)], target)
        else:
            os.close(target)
    for fd in fds:
        if fd not in (0, 1, 2):
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # re-read TMPDIR
    print(f"sftrl: warm job {os.getpid()}, forked by job server {os.getppid()}", file=sys.stderr, flush=True)
    apply_threads(request["env"])
    for name in [name for name in sys.modules if name == "sftrl" or name.startswith("sftrl.")]:
        del sys.modules[name]  # the job imports sftrl from disk, as it is now
    sys.argv = ["sftrl", *request["argv"]]
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal held since the fork arrives now
        from sftrl.cli import run_command

        run_command(request["argv"])
    except SystemExit as exit:
        code = exit.code
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # unwinds through serve(), whose clean-up is the server's only


def apply_threads(env: dict) -> None:
    """What Snakemake's thread variables do in a cold process, done after the import: torch's intra-op threads and
    every loaded BLAS / OpenMP pool (numpy's OpenBLAS, torch's OpenMP) limited to OMP_NUM_THREADS."""
    threads = env.get("OMP_NUM_THREADS")
    if not threads or not threads.isdigit():
        return
    import threadpoolctl
    import torch

    torch.set_num_threads(int(threads))
    threadpoolctl.threadpool_limits(int(threads))


def _reap(jobs: dict, selector) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = jobs.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError, KeyError):
                _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
            with contextlib.suppress(OSError, KeyError):
                selector.unregister(conn)
            conn.close()


def _kill(pid: int) -> None:
    with contextlib.suppress(OSError, KeyError):
        os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- the wrapper

def start_server(path: str, env: dict) -> subprocess.Popen:
    """A server listening on PATH (a new file; a Unix socket path is at most 107 bytes) for jobs whose environment is
    ENV; returns once it accepts connections (jobs that come before its imports end wait for them). Stop it with
    terminate()."""
    server = subprocess.Popen([sys.executable, "-m", "sftrl.jobserver", "--serve", path, str(os.getpid())],
                              env={k: v for k, v in env.items() if k != ENV})
    while not os.path.exists(path):
        if server.poll() is not None:
            raise RuntimeError(f"the job server for {path!r} exited at start (status {server.returncode})")
        time.sleep(0.01)
    return server


def main(argv: list[str] | None = None) -> int:
    """`python -m sftrl.jobserver COMMAND [ARGS]`: COMMAND's jobs run warm; exits with COMMAND's status.
    (`python -m sftrl.jobserver --serve PATH PARENT_PID` is the server itself.)"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"] and len(argv) == 3:
        serve(argv[1], int(argv[2]))
        return 0
    if not argv:
        print("usage: python -m sftrl.jobserver COMMAND [ARGS]", file=sys.stderr)
        return 2
    # a Unix socket's path holds at most 107 bytes: a cluster's long TMPDIR would not do
    short = None if len(tempfile.gettempdir()) <= 64 else "/tmp"
    with tempfile.TemporaryDirectory(prefix="sftrl-jobserver-", dir=short) as folder:
        path = os.path.join(folder, "socket")
        try:
            server = start_server(path, dict(os.environ))
        except (RuntimeError, OSError) as err:  # the study still runs, every job cold
            print(f"sftrl.jobserver: no job server ({err}); {argv[0]}'s jobs start cold", file=sys.stderr)
            server = None
        try:
            command = subprocess.Popen(argv, env={**os.environ, ENV: path} if server else dict(os.environ))
            # Ctrl-C reaches COMMAND itself (same process group); SIGTERM / SIGHUP sent here are passed on: wait
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            for number in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(number, lambda received, frame: command.send_signal(received))
            code = command.wait()
        finally:
            if server:
                server.terminate()
                server.wait()
    if code < 0:  # COMMAND was killed by a signal: end the same way
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
