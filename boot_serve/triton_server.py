"""The launcher: a real NVIDIA Triton Inference Server on an exported model repository.

    with TritonServer("model_repository") as server:    # free ports, waits until ready
        Client(server.http_url).generate(["a red circle"], [0])

Which binary it runs: boot_serve.triton_process. The server loads `boot_txt2img` and the models it
composes, nothing else (model control mode `explicit` with `--load-model=boot_txt2img`: in the
cpu-onehop variant the composing models' configs are in the repository but unused), and a model that
fails to load stops the server with its error. Triton's control APIs are closed by its own restriction
flags (boot_serve.access): shared memory, model repository, trace and logging answer only a random key
that this launcher never hands out; statistics answer the operator key (`operator_key`). Endpoints bind
127.0.0.1 unless told otherwise; anything else is announced with a loud warning, since Triton has no
authentication of its own. Clients should reach it through the guards (boot_serve.service).

tritonserver runs in its own process group and gets SIGTERM if the Python process that
started it dies (Linux PR_SET_PDEATHSIG; strictly: if the starting *thread* exits, so start
it from a thread that outlives it); `stop()` also kills any Python-backend stub left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
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

from boot_serve.access import new_key, triton_restriction_args
from boot_serve.triton_configs import ENSEMBLE
from boot_serve.triton_process import (
    LOCAL_HOSTS,
    ServerError,
    bundled_tritonserver,
    die_with_parent,
    find_free_ports,
    listening_inodes,
    process_socket_inodes,
    shm_regions,
    url_host,
    warn_public_bind,
)
from boot_serve.triton_repo import check_repository


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
        return f"{url_host(self.http_host)}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{url_host(self.grpc_host)}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.metrics_host)}:{self.ports['metrics']}/metrics"

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
            "--rate-limit=execution_count",  # the order of preference among a model's CPU copies (triton_configs)
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
                                        start_new_session=True, preexec_fn=die_with_parent)
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
            socket.create_connection((url_host(self.grpc_host).strip("[]"), self.ports["grpc"]), timeout=1).close()
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
