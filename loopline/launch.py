"""How a `loopline` command starts: in a warm process when `loopline prefect-server` keeps
one, else in this one.

A command here spends more time importing than working: a 5-row `loopline score` imports
Prefect, MLflow, scikit-learn and ONNX Runtime (≈ 4 s) to do 0.1 s of work. While
`loopline prefect-server` runs, it also keeps a *warm* process that has imported them once
and listens on a Unix socket in PREFECT_HOME (`loopline-warm.sock`, owner only). A command
then hands the warm process its arguments, working directory, environment and its three
standard streams (the file descriptors themselves), and the warm process forks a child that
runs the command exactly as `main()` would here: same streams, same exit status, Ctrl-C
and SIGTERM passed on to the child's process group. The command's own process only waits.

A command runs here, as before, when there is no warm process, when it is not one of
WARM_COMMANDS (servers exec their tools), when LOOPLINE_WARM=0, or when the warm process
holds other code: it records the state of this checkout's source files and the installed
packages when it starts, and refuses (then reloads itself) once they change, so an edited
file is never run from a stale import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from loopline.warm import socket_path

# The commands a warm process runs; the others start or become servers, or print help. Not
# `stage`: `dvc repro` records its stages' outputs by their bytes, which must not depend on
# whether a warm process ran them, and the torch_mlp stages' outputs did (a warm fork's
# predictions.csv differed from a cold run's in the last digits: tests/e2e/test_dvc.py).
WARM_COMMANDS = frozenset(
    {
        "run",
        "train",
        "monitor",
        "replay",
        "backtest",
        "score",
        "promote",
        "shadow",
        "rollback",
        "card",
        "reproduce",
        "package",
        "check-params",
    }
)
# What the warm process imports before it listens: the slow imports of those commands.
WARM_IMPORTS = (
    "loopline.cli",
    "flows.training",
    "flows.monitoring",
    "flows.scoring",
    "great_expectations",
    "evidently",
    "nannyml",
    "sklearn.ensemble",
    "sklearn.model_selection",
    "mlflow.sklearn",
    "skl2onnx",
    "onnxruntime",
    "optuna",
    "torch",
    "pipelines.monitoring.run",
    "pipelines.training.search",
    "pipelines.registry.promotion",
    "pipelines.data.validate",
    "serving.runtime",
    "serving.schema",
    "flows.api",
    "prefect.flow_engine",
    "prefect.task_engine",
    "skops.io",
    "pyarrow.csv",
    # MLflow's SQL stores, and the migrations it reads to check a store's schema (alembic, mako)
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "alembic.command",
    "alembic.script",
    "alembic.migration",
    "mako.template",
)
SOURCE_PACKAGES = ("loopline", "flows", "pipelines", "serving")
MAX_HELLO_BYTES = 16 * 1024 * 1024


def code_root() -> Path:
    return Path(__file__).resolve().parents[1]


def code_stamp() -> str:
    """What the imported code is: every source file of this checkout (path, size, mtime) and
    the installed packages (site-packages changes when a package is installed or removed)."""
    import hashlib
    import sysconfig

    digest = hashlib.sha256(sys.executable.encode())
    root = code_root()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    site = Path(sysconfig.get_paths()["purelib"])
    with contextlib.suppress(OSError):
        digest.update(str(site.stat().st_mtime_ns).encode())
    return digest.hexdigest()


# --- the command's side ------------------------------------------------------------------


def entry_point() -> None:
    """The `loopline` command: in the warm process when there is one for it, else here."""
    code = run_warm(sys.argv[1:])
    if code is None:
        from loopline.cli import exit_code

        exit_now(exit_code())
        return
    if code < 0:  # the command died of a signal: so does this process
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def exit_now(code: int, last=None) -> None:
    """Exit without the interpreter's teardown (3 s after a training here: freeing every
    object scikit-learn, torch, MLflow and Prefect made, one by one). What a normal exit does
    that matters is done first, in Python's own order: the threading module's exit hooks
    (Prefect's log and event workers drain there) and the join of every thread that is not a
    daemon, the atexit handlers (logging's flush, Prefect's temporary API, multiprocessing's
    children), the standard streams flushed; then `last`, if given."""
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, as at a normal exit
            stream.flush()
    if last is not None:
        last()
    os._exit(code)


def wants_warm(args: list[str]) -> bool:
    if os.environ.get("LOOPLINE_WARM", "1") == "0" or not args:
        return False
    if "--help" in args or "-h" in args:
        return False
    return args[0] in WARM_COMMANDS


def run_warm(args: list[str]) -> int | None:
    """The command's exit code from the warm process (negative: the signal that ended it), or
    None when it must run here (no warm process, or one holding other code)."""
    if not wants_warm(args):
        return None
    path = socket_path()
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # a socket left by a warm process that died
        conn.close()
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    hello = json.dumps(
        {
            "argv": ["loopline", *args],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "root": str(code_root()),
            "stamp": code_stamp(),
        }
    ).encode()
    with conn:
        try:
            socket.send_fds(conn, [b"%d\n" % len(hello)], [0, 1, 2])
            conn.sendall(hello)
            replies = _lines(conn)
            first = json.loads(next(replies))
        except (OSError, StopIteration, ValueError):
            return None
        if "pid" not in first:  # refused: another checkout, or code changed since it started
            return None
        return _wait_for_child(conn, replies)


def _wait_for_child(conn: socket.socket, replies: Iterator[bytes]) -> int:
    """Pass on the signals a command's process would get (Ctrl-C, SIGTERM, a hang-up) while
    the warm child runs; its exit status when it ends."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(b"%d\n" % signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    for line in replies:
        reply = json.loads(line)
        if "exit" in reply:
            return int(reply["exit"])
    print("error: the warm loopline process ended before the command did", file=sys.stderr)
    return 1


def _lines(conn: socket.socket) -> Iterator[bytes]:
    buffer = b""
    while True:
        while b"\n" not in buffer:
            try:
                chunk = conn.recv(65536)
            except InterruptedError:
                continue
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield line


# --- the warm process ----------------------------------------------------------------------


def serve_warm(path: Path, echo=print) -> None:
    """Import WARM_IMPORTS, then fork a child per command until SIGTERM. Reloads itself (a new
    interpreter, the same socket) when a command brings other code of this checkout."""
    import importlib
    import selectors

    started = time.perf_counter()
    root, stamp = str(code_root()), code_stamp()  # before the imports: a file edited meanwhile means a reload
    environment = dict(os.environ)
    for module in WARM_IMPORTS:
        with contextlib.suppress(ImportError):  # torch is optional
            importlib.import_module(module)
    # What the imports set in the environment (NML_DISABLE_USAGE_LOGGING=1, say), which a
    # command's own imports would set too: its children get it where their caller has none.
    imported = {k: v for k, v in os.environ.items() if environment.get(k) != v}
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is the owner's only
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    echo(f"warm commands: ready in {time.perf_counter() - started:.1f} s on {path}")
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    children: dict[int, tuple[socket.socket, float, str]] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    reload = False
    try:
        while not stopping and not (reload and not children):  # a reload waits for the commands it runs
            if selector.select(timeout=0.2):
                conn, _ = listener.accept()
                reload = _take(conn, listener, selector, (root, stamp, imported), children, echo) or reload
            _reap(children, echo)
    finally:
        selector.close()
        listener.close()
        if not reload:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        deadline = time.monotonic() + 30
        while children and time.monotonic() < deadline:  # stopping: the commands it runs may end first
            _reap(children, echo)
            time.sleep(0.1)
    if reload and not stopping:
        echo("warm commands: the code changed; reloading")
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "loopline.launch", str(path)])


def _take(conn, listener, selector, warm: tuple[str, str, dict[str, str]], children: dict, echo) -> bool:
    """Read one command's hello and fork its child; True when this process must reload."""
    root, stamp, imported = warm
    conn.settimeout(10)
    fds: list[int] = []
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        header, fds, _, _ = socket.recv_fds(conn, 64, 3)
        size, _, hello = header.partition(b"\n")
        if uid != os.getuid() or len(fds) != 3 or not size.isdigit() or int(size) > MAX_HELLO_BYTES:
            raise ValueError("not a loopline command")
        while len(hello) < int(size):
            chunk = conn.recv(int(size) - len(hello))
            if not chunk:
                raise ValueError("the command hung up")
            hello += chunk
        request = json.loads(hello)
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return False
    if request["root"] != root or request["stamp"] != stamp:
        for fd in fds:
            os.close(fd)
        why = "another checkout" if request["root"] != root else "the code changed"
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
        conn.close()
        return request["root"] == root
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # nothing of this process's buffers may be written again by the child
    pid = os.fork()
    if pid == 0:
        try:
            selector.close()
            listener.close()
            _run_child(conn, fds, request, imported)
        finally:
            os._exit(70)  # never back into the warm process's loop
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    children[pid] = (conn, time.perf_counter(), " ".join(request["argv"][:2]))
    return False


def _reap(children: dict, echo) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid not in children:
            continue
        conn, began, command = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        conn.close()
        echo(f"warm commands: {command} (pid {pid}) exit {code} in {time.perf_counter() - began:.1f} s")


def _run_child(conn: socket.socket, fds: list[int], request: dict, imported: dict[str, str]) -> None:
    """The command, in the forked child: the caller's streams, directory, environment and
    arguments; its own process group, which the caller's signals reach."""
    import threading

    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(imported | request["env"])
        sys.argv = list(request["argv"])
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())  # type: ignore[union-attr]
        _settings_from_environment()
    except BaseException:
        os._exit(70)

    finished = threading.Event()

    def signals() -> None:
        """The caller's signals, for this child's process group; the caller gone before the
        command ended: SIGTERM."""
        for line in _lines(conn):
            with contextlib.suppress(ValueError, OSError):
                os.killpg(0, int(line))
        if not finished.is_set():
            with contextlib.suppress(OSError):
                os.killpg(0, signal.SIGTERM)

    threading.Thread(target=signals, name="loopline-warm-signals", daemon=True).start()

    def report(code: int) -> None:  # the warm process reports it too, and a death by signal
        finished.set()
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")

    try:
        from loopline.cli import exit_code

        code = exit_code()
    except KeyboardInterrupt:  # as Python ends on an uncaught Ctrl-C: the traceback, then SIGINT
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    exit_now(code, last=lambda: report(code))


def _settings_from_environment() -> None:
    """What was read from the warm process's environment when it imported, read again from
    the command's: Prefect's settings and logging."""
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context
        from prefect.logging.configuration import setup_logging

        refresh_global_settings_context()
        setup_logging(incremental=False)


if __name__ == "__main__":
    serve_warm(Path(sys.argv[1]), echo=lambda line: print(line, flush=True))
