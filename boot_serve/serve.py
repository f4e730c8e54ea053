"""Start a real NVIDIA Triton Inference Server on an exported model repository.

    python -m boot_serve.serve --repository model_repository            # 127.0.0.1:8000/8001/8002

Which `tritonserver` (docs/export-serving.md):
- the one on PATH when there is one (NVIDIA's container, a local build): started as is, with its
  own backends (the GPU variant of the repository needs its onnxruntime / tensorrt backends);
- otherwise the CPU build bundled in the PyPI wheel `nvidia-pytriton` (Triton 2.51, Python
  backend only). It needs three things, prepared here in a temporary backend directory:
  the Python-backend stub built for *this* Python copied next to `libtriton_python.so`,
  `LD_LIBRARY_PATH` including the wheel's `nvidia_pytriton.libs`, and this interpreter's `bin/`
  first on PATH, which is how the embedded interpreter of the stub finds this environment's
  site-packages (numpy < 2, onnxruntime, transformers).

The server loads `boot_txt2img` and the models it composes, nothing else (model control mode
`explicit` with `--load-model=boot_txt2img`: in the cpu-onehop variant the composing models'
configs are in the repository but unused), and a model that fails to load stops the server with
its error. Triton's control APIs are closed by its own restriction flags (boot_serve.access): shared
memory, model repository, trace and logging answer only a random key that this launcher never hands
out; statistics answer the operator key (`operator_key`). Endpoints bind 127.0.0.1 unless told
otherwise; anything else is announced with a loud warning, since Triton has no authentication of
its own. The CLI runs Triton behind the guards (boot_serve.service), which is how clients should
reach it.

`--variant` rewrites the repository's configs first (boot_serve.triton_repo), e.g. `--variant
cpu-onehop` to serve the whole request from one Python model instead of the default ensemble.

In Python (tests, benchmarks) the launcher is a context manager:

    with TritonServer("model_repository") as server:    # free ports, waits until ready
        Client(server.http_url).generate(["a red circle"], [0])

tritonserver runs in its own process group and gets SIGTERM if the Python process that
started it dies (Linux PR_SET_PDEATHSIG; strictly: if the starting *thread* exits, so start
it from a thread that outlives it); `stop()` also kills any Python-backend stub left behind.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from boot_serve.access import KEY_HEADER, new_key, triton_restriction_args, write_key_file
from boot_serve.triton_repo import ENSEMBLE, VARIANTS, RepositoryError, check_repository, write_configs

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SHM_REGION = re.compile(r"/dev/shm/triton_python_backend_shm_region_\S+")


class ServerError(RuntimeError):
    """tritonserver could not be found, did not start, or exited."""


# --------------------------------------------------------------------------------------------
# Which tritonserver
# --------------------------------------------------------------------------------------------
def bundled_tritonserver() -> tuple[Path, Path, Path, Path]:
    """(binary, backends dir, stub for this Python, libs dir) of the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as err:
        raise ServerError(
            "no `tritonserver` on PATH and the PyPI wheel nvidia-pytriton (which bundles a CPU "
            "tritonserver) is not installed: `pip install 'nvidia-pytriton>=0.7,<0.8'`, or run "
            "inside NVIDIA's Triton container") from err
    root = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    binary = root / "bin" / "tritonserver"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # editable install of pytriton
        libs = root / "external_libs"
    for path in (binary, stub, root / "backends" / "python" / "libtriton_python.so"):
        if not path.is_file():
            raise ServerError(f"the nvidia-pytriton wheel lacks {path} (Python {version} supported?)")
    return binary, root / "backends", stub, libs


def find_free_ports(*hosts: str) -> list[int]:
    """One free port per host, all different: every socket is held until all are chosen (ports
    picked one at a time can repeat, since the kernel may hand a just-closed port out again)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def find_free_port(host: str = "127.0.0.1") -> int:
    return find_free_ports(host)[0]


def _url_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
class TritonServer:
    """A tritonserver process on `repository`; `start()` returns once the server is ready.

    Ports left as None are picked free at start. `tritonserver`: a binary to use; None picks
    the one on PATH, else the bundled one (`bundled=True` forces the bundled one).
    """

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 tritonserver: str | Path | None = None, bundled: bool = False, log_verbose: int = 0,
                 extra_args: tuple[str, ...] = (), startup_timeout: float = 600.0, exit_timeout: int = 30,
                 echo: bool = False, check: bool = True, log_path: str | Path | None = None,
                 http_host: str | None = None, grpc_host: str | None = None, metrics_host: str | None = None,
                 operator_key: str | None = None):
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_host = http_host or host  # 127.0.0.1 behind the guards (boot_serve.service)
        self.grpc_host = grpc_host or host
        self.metrics_host = metrics_host or host
        # Opens the statistics APIs (header access.KEY_HEADER); shared memory, repository, trace
        # and logging stay closed behind a key made per start that nothing hands out.
        self.operator_key = operator_key or new_key()
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.tritonserver = tritonserver
        self.bundled = bundled
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.abort = threading.Event()  # set (e.g. from a signal handler) to give up waiting for readiness
        self.echo = echo
        self.check = check
        self.log_path = Path(log_path) if log_path else None  # the whole server log goes there too
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log: deque[str] = deque(maxlen=400)
        self._reader: threading.Thread | None = None
        self._shm: set[str] = set()  # Python-backend shared memory files, removed at stop (a crash leaves them)

    # endpoints ---------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{_url_host(self.http_host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.grpc_host)}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.metrics_host)}:{self.ports['metrics']}/metrics"

    def log_tail(self, lines: int = 60) -> str:
        return "".join(list(self._log)[-lines:])

    # command -----------------------------------------------------------------------------------
    def command(self) -> tuple[list[str], dict[str, str]]:
        """The tritonserver command line and environment (prepares the bundled server)."""
        env = dict(os.environ)
        binary = None if self.bundled else (self.tritonserver or shutil.which("tritonserver"))
        args: list[str] = []
        if binary is None:
            binary, backends, stub, libs = bundled_tritonserver()
            self._tmp = tempfile.TemporaryDirectory(prefix="boot-tritonserver-")
            python_backend = Path(self._tmp.name) / "backends" / "python"
            shutil.copytree(backends / "python", python_backend,
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, python_backend / "triton_python_backend_stub")
            args.append(f"--backend-directory={python_backend.parent}")
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
            # The stub's embedded interpreter finds its prefix (this venv) through `python3` on PATH.
            env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        hosts = {"http": self.http_host, "grpc": self.grpc_host, "metrics": self.metrics_host}
        missing = [name for name in hosts if self.ports[name] is None]
        taken = {port for port in self.ports.values() if port is not None}
        while missing:  # fresh ports, distinct from each other and from the ones given
            picked = find_free_ports(*(hosts[n] if hosts[n] not in ("", "::") else "127.0.0.1" for n in missing))
            if not taken & set(picked):
                self.ports.update(zip(missing, picked))
                break
        args += [
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit", f"--load-model={ENSEMBLE}",
            *triton_restriction_args(self.operator_key),
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--http-address={self.http_host}", f"--http-port={self.ports['http']}",
            f"--grpc-address={self.grpc_host}", f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.metrics_host}", f"--metrics-port={self.ports['metrics']}",
            "--allow-metrics=true",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout}",
            *self.extra_args,
        ]
        return [str(binary), *args], env

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> TritonServer:
        for host in {self.host, self.http_host, self.grpc_host} - set(LOCAL_HOSTS):
            warn_public_bind(host)
        if self.check:
            check_repository(self.repository)
        cmd, env = self.command()
        # Own process group (a Ctrl-C in the terminal reaches only us, and we stop Triton in
        # order); SIGTERM to Triton if this process dies without stopping it.
        self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        _RUNNING.add(self)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
            self._shm = shm_regions(self.process.pid)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "a") if self.log_path else contextlib.nullcontext() as sink:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                self._log.append(line)
                if self.echo:
                    sys.stderr.write(line)
                if sink is not None:
                    sink.write(line)
                    sink.flush()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.abort.is_set():
                raise ServerError("interrupted while tritonserver was starting")
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting "
                                  f"on {self.repository}; its log ends with:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, OSError):
                with urllib.request.urlopen(url, timeout=2) as response:
                    # HTTP can answer "ready" a moment before the gRPC port listens: ready means both
                    # endpoints take connections, and both are this process's own sockets (another
                    # local process may have bound a port between its choice and Triton's bind).
                    if response.status == 200 and self._grpc_listens() and self.owns_ports():
                        return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s; log:\n{self.log_tail()}")

    def owns_ports(self) -> bool:
        """Whether this tritonserver process holds the listening sockets of its HTTP and gRPC ports."""
        if self.process is None:
            return False
        inodes = listening_inodes()
        mine = process_socket_inodes(self.process.pid)
        return all(inodes.get(self.ports[name], set()) & mine and inodes[self.ports[name]] <= mine
                   for name in ("http", "grpc"))

    def _grpc_listens(self) -> bool:
        try:
            socket.create_connection((_url_host(self.grpc_host).strip("[]"), self.ports["grpc"]), timeout=1).close()
            return True
        except OSError:
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait() if self.process is not None else 0

    def stop(self, timeout: float | None = None) -> int | None:
        """Graceful shutdown (SIGINT: Triton finishes in-flight requests), then SIGKILL."""
        timeout = self.exit_timeout + 30 if timeout is None else timeout
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=30)
            code = self.process.returncode
            # Python-backend stubs left behind by a server that had to exit hard (same group).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            _RUNNING.discard(self)
            if self._reader is not None:
                self._reader.join(timeout=5)
        for path in self._shm:  # a graceful exit removed them already; a crash or a kill did not
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._shm = set()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_RUNNING: set[TritonServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


def shm_regions(group: int) -> set[str]:
    """The Python-backend shared memory files (/dev/shm) mapped by the processes of process group `group`."""
    found: set[str] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != group:  # field 5, pgrp
                continue
            found.update(SHM_REGION.findall((stat.parent / "maps").read_text()))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return found


def listening_inodes() -> dict[int, set[int]]:
    """Port -> inodes of the TCP sockets listening on it (Linux /proc/net/tcp and tcp6)."""
    found: dict[int, set[int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                found.setdefault(int(fields[1].rsplit(":", 1)[1], 16), set()).add(int(fields[9]))
    return found


def process_socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent exits (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def warn_public_bind(host: str) -> None:
    bar = "!" * 78
    sys.stderr.write(
        f"{bar}\nWARNING: binding Triton to {host!r}, not 127.0.0.1. Triton has no authentication: "
        f"anyone who can reach\nthis address can run inference, read model metadata and statistics. "
        f"Put it behind a\nfirewall or an authenticating proxy.\n{bar}\n")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from boot_serve.guard import MAX_BODY_BYTES, MAX_CONNECTIONS_PER_CLIENT, MAX_JSON_DEPTH, Limits
    from boot_serve.service import CRASH_WINDOW, MAX_CRASHES, Service

    p = argparse.ArgumentParser(prog="python -m boot_serve.serve",
                                description="Start tritonserver on an exported boot model repository, supervised, "
                                            "with the HTTP guard in front (docs/robustness.md).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", default="model_repository",
                   help="model repository filled by `python -m boot_serve.export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address every endpoint binds (anything but loopback is exposed to the network)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics port binds (operators only: Triton's metrics have no authentication)")
    p.add_argument("--health-port", type=int, default=None,
                   help="port of the probe listener (/v2/health/live, /ready) on --host, outside the client caps "
                        "(0: a free one; default: none)")
    p.add_argument("--tritonserver", default=None,
                   help="tritonserver binary (default: the one on PATH, else the one bundled in nvidia-pytriton)")
    p.add_argument("--bundled", action="store_true", help="use the bundled CPU tritonserver even if one is on PATH")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    p.add_argument("--variant", choices=("cpu", *VARIANTS), default=None,
                   help="first rewrite the repository's configs for this variant (python -m boot_serve.triton_repo "
                        "--variant); default: serve the configs as they are")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    p.add_argument("--exit-timeout", type=int, default=30,
                   help="seconds Triton waits for in-flight requests and open connections at shutdown")
    g = p.add_argument_group("protection (docs/robustness.md)")
    g.add_argument("--no-guard", action="store_true",
                   help="let clients reach Triton's HTTP and gRPC endpoints directly, without the guards that "
                        "refuse requests able to crash or exhaust it (never on an address beyond loopback)")
    g.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="guards: largest HTTP body / gRPC message accepted")
    g.add_argument("--max-json-depth", type=int, default=MAX_JSON_DEPTH, help="guard: deepest JSON nesting accepted")
    g.add_argument("--max-connections-per-client", type=int, default=MAX_CONNECTIONS_PER_CLIENT,
                   help="guard: open connections from one address (0: no cap, e.g. behind an ingress)")
    g.add_argument("--operator-key-file", default=None,
                   help="where to write the key that opens Triton's statistics (mode 0600; default: a private "
                        "temporary file, printed at start and removed at exit)")
    g.add_argument("--max-crashes", type=int, default=MAX_CRASHES,
                   help="restart a tritonserver that dies, until it has died more than this many times within "
                        "--crash-window (0: no restarts)")
    g.add_argument("--crash-window", type=float, default=CRASH_WINDOW, help="seconds --max-crashes counts over")
    args = p.parse_args(argv)
    for name in ("http_port", "grpc_port", "metrics_port", "health_port"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 65535:
            p.error(f"--{name.replace('_', '-')} must be in [0, 65535]")
    if args.max_crashes < 0 or args.crash_window <= 0:
        p.error("--max-crashes must be >= 0 and --crash-window > 0")
    try:
        limits = Limits(args.max_body_bytes, args.max_json_depth,
                        max_connections_per_client=args.max_connections_per_client)
    except ValueError as err:
        p.error(str(err))
    if args.no_guard and args.host not in LOCAL_HOSTS:
        warn_unguarded(args.host)

    service = Service(args.repository, host=args.host, http_port=args.http_port or None,
                      grpc_port=args.grpc_port or None, metrics_port=args.metrics_port or None,
                      guard=not args.no_guard, limits=limits, max_crashes=args.max_crashes,
                      window=args.crash_window, tritonserver=args.tritonserver, bundled=args.bundled,
                      log_verbose=args.log_verbose, startup_timeout=args.startup_timeout,
                      exit_timeout=args.exit_timeout, echo=True, metrics_host=args.metrics_host,
                      health_port=args.health_port)
    key_dir = None if args.operator_key_file else tempfile.mkdtemp(prefix="boot-operator-")  # 0700
    key_file = write_key_file(args.operator_key_file or Path(key_dir) / "operator-key", service.operator_key)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()
        service.server.abort.set()

    # Installed before start so that Ctrl-C during model loading also shuts the server down.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.variant is not None:
            write_configs(args.repository, args.variant)
        service.start()
    except (RepositoryError, ServerError, ValueError, OSError) as err:
        service.stop()
        _remove_key(key_file, key_dir)
        print(f"error: {err}", file=sys.stderr)
        return 130 if stopping.is_set() else 2
    restarts = f"up to {args.max_crashes} crashes within {args.crash_window:g} s" if args.max_crashes else "off"
    guarded = service.guard is not None
    http = f"{service.http_url}  (guarded; Triton's own: {service.triton_http_url})" if guarded else service.http_url
    grpc = f"{service.grpc_url}  (guarded; Triton's own: {service.triton_grpc_url})" if guarded else service.grpc_url
    print(f"\nboot: Triton is ready on {service.server.repository}\n"
          f"  HTTP     {http}\n"
          f"  gRPC     {grpc}\n"
          f"  metrics  {service.metrics_url}  (operators)\n"
          + (f"  probes   {service.health_url}/v2/health/live, /ready\n" if service.health_url else "")
          + f"  statistics: operators send header {KEY_HEADER} with the key in {key_file}\n"
          f"  restarts {restarts}\n"
          f"  try: python -m boot_serve.client \"a red circle\" --seed 0 --out img.png --url {service.http_url}\n"
          f"Ctrl-C stops it.", flush=True)
    while not stopping.is_set() and service.running():
        stopping.wait(0.5)
    if not service.running():
        print(f"error: tritonserver exited ({_exit_text(service.server.process.returncode)})", file=sys.stderr)
        service.stop()
        _remove_key(key_file, key_dir)
        return 1
    print("boot: shutting down tritonserver ...", file=sys.stderr, flush=True)
    code = service.stop()
    _remove_key(key_file, key_dir)
    return 0 if code in (0, None, -signal.SIGINT) else int(code)


def _remove_key(key_file: Path, key_dir: str | None) -> None:
    """The temporary operator key goes with the server that used it; a key file the operator named stays."""
    if key_dir is not None:
        shutil.rmtree(key_dir, ignore_errors=True)


def _exit_text(code: int | None) -> str:
    from boot_serve.service import describe_exit

    return describe_exit(code)


def warn_unguarded(host: str) -> None:
    sys.stderr.write(f"WARNING: --no-guard on {host!r}: requests that crash Triton 2.51 (deeply nested JSON) or "
                     "make it buffer 64 MB bodies reach it from the network unchecked.\n")


if __name__ == "__main__":
    sys.exit(main())
