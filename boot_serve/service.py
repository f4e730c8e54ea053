"""The served stack of `python -m boot_serve.serve`: a supervised tritonserver with the HTTP guard in front.

    with Service("model_repository") as service:          # free ports, waits until ready
        Client(service.http_url).generate(["a red circle"], [0])

- `Supervisor` restarts a tritonserver that dies (a crash, a kill), on the same ports, after a
  backoff that doubles with each crash in the window (1 s, 2 s, 4 s, ... at most 30 s), and logs why
  it died (the signal) and how long service was down. More than `max_crashes` crashes within
  `window` seconds and it gives up: the launcher then exits 1 rather than crash-loop. During the gap
  clients get ServerUnavailableError, and the same `Client` works again once Triton is back.
- `Guard` (boot_serve.guard) owns the public HTTP port and `GrpcGuard` (boot_serve.grpc_guard) the
  public gRPC port; they forward to Triton's own endpoints on 127.0.0.1, so a request that would crash
  or exhaust Triton never reaches it; while Triton restarts they answer 503 / UNAVAILABLE. The metrics
  endpoint is Triton's own.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from boot_serve.grpc_guard import GrpcGuard
from boot_serve.guard import Guard, Limits
from boot_serve.serve import ServerError, TritonServer

MAX_CRASHES = 5
CRASH_WINDOW = 300.0
BACKOFF = (1.0, 30.0)  # first delay, longest delay (seconds)


def describe_exit(code: int | None) -> str:
    """'SIGSEGV (exit -11)' for a process killed by a signal, 'exit code 3' otherwise."""
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name}, exit {code}"
        except ValueError:
            return f"signal {-code}, exit {code}"
    return f"exit code {code}"


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Supervisor:
    """Keeps `server` (a TritonServer) serving: started by `start()`, restarted by a watcher thread
    whenever it exits without `stop()` having been called.

    `restarts` records each restart: {"cause", "down_s"} (seconds from noticing the exit to ready
    again); `gave_up` is set when the crashes exceed `max_crashes` within `window` seconds.
    """

    def __init__(self, server: TritonServer, max_crashes: int = MAX_CRASHES, window: float = CRASH_WINDOW,
                 backoff: tuple[float, float] = BACKOFF, log=_log):
        if max_crashes < 0 or window <= 0 or backoff[0] < 0 or backoff[1] < backoff[0]:
            raise ValueError(f"bad supervision settings: max_crashes={max_crashes}, window={window}, backoff={backoff}")
        self.server = server
        self.max_crashes = max_crashes
        self.window = window
        self.backoff = backoff
        self.log = log
        self.restarts: list[dict] = []
        self.gave_up = threading.Event()
        self.serving = threading.Event()
        self._stopping = threading.Event()
        self._crashes: deque[float] = deque()
        self._watcher: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Supervisor:
        # The watcher thread starts every tritonserver process: Triton gets SIGTERM when the thread
        # that started it exits (PR_SET_PDEATHSIG, boot_serve.serve), and the watcher outlives each.
        self._watcher = threading.Thread(target=self._watch, name="boot-triton-supervisor", daemon=True)
        self._watcher.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stopping.set()
        self.server.abort.set()  # a restart in progress gives up waiting for readiness
        self.server.stop()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=60)

    def _watch(self) -> None:
        try:
            self.server.start()
        except BaseException as err:  # noqa: BLE001 - handed to start()'s caller
            self._error = err
            self._started.set()
            return
        self.serving.set()
        self._started.set()
        while not self._stopping.is_set():
            code = self.server.wait()
            if self._stopping.is_set():
                return
            self.serving.clear()
            if not self._restart(describe_exit(code)):
                return

    def _restart(self, cause: str) -> bool:
        """Restart after a crash (retrying failed starts); False once it gives up or is stopped."""
        down_since = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes and self._crashes[0] < now - self.window:
                self._crashes.popleft()
            if len(self._crashes) > self.max_crashes:
                self.log(f"boot: tritonserver died ({cause}); {len(self._crashes)} crashes within "
                         f"{self.window:g} s, more than the {self.max_crashes} allowed: not restarting it again")
                self.gave_up.set()
                return False
            delay = min(self.backoff[0] * 2 ** (len(self._crashes) - 1), self.backoff[1])
            self.log(f"boot: tritonserver died ({cause}); restarting it in {delay:g} s "
                     f"(crash {len(self._crashes)} of at most {self.max_crashes} within {self.window:g} s)")
            self.server.stop(timeout=10)  # its temporary backend folder, any stub left behind
            if self._stopping.wait(delay):
                return False
            try:
                self.server.start()
            except ServerError as err:
                cause = f"restart failed: {str(err).splitlines()[0]}"
                continue
            down = time.monotonic() - down_since
            self.restarts.append({"cause": cause, "down_s": round(down, 2)})
            self.log(f"boot: tritonserver is serving again, {down:.1f} s after it died")
            self.serving.set()
            return True
        return False


class Service:
    """tritonserver on `repository` under a Supervisor (`max_crashes` 0: none), with the HTTP guard on
    (host, http_port) in front unless `guard=False`. Ports left None are picked free. Other keyword
    arguments go to TritonServer."""

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, guard: bool = True,
                 limits: Limits = Limits(), max_crashes: int = MAX_CRASHES, window: float = CRASH_WINDOW,
                 backoff: tuple[float, float] = BACKOFF, log=_log, **server_args):
        self.host = host
        inner = "127.0.0.1" if guard else host  # behind the guards Triton listens on loopback only
        self.server = TritonServer(repository, host=host, http_port=None if guard else http_port,
                                   grpc_port=None if guard else grpc_port, metrics_port=metrics_port,
                                   http_host=inner, grpc_host=inner, **server_args)
        self.supervisor = Supervisor(self.server, max_crashes, window, backoff, log) if max_crashes else None
        self.guard = Guard("127.0.0.1", 0, host, http_port or 0, limits, log) if guard else None
        self.grpc_guard = GrpcGuard("127.0.0.1:0", host, grpc_port or 0, limits.max_body_bytes) if guard else None

    @property
    def http_url(self) -> str:
        """Where clients send HTTP: the guard, or Triton itself without one."""
        return self.guard.url if self.guard is not None else self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.grpc_guard.url if self.grpc_guard is not None else self.server.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.server.metrics_url

    @property
    def triton_http_url(self) -> str:
        """Triton's own HTTP endpoint (behind the guard: loopback only)."""
        return self.server.http_url

    @property
    def triton_grpc_url(self) -> str:
        return self.server.grpc_url

    def start(self) -> Service:
        if self.guard is not None:  # first: a busy public port fails before Triton spends time loading
            self.guard.start()
            self.grpc_guard.start()
        try:
            if self.supervisor is not None:
                self.supervisor.start()
            else:
                self.server.start()
            if self.guard is not None:
                self.guard.upstream = ("127.0.0.1", self.server.ports["http"])
                self.grpc_guard.upstream = self.server.grpc_url
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        """False once Triton is gone for good: exited unsupervised, or the supervisor gave up."""
        if self.supervisor is not None:
            return not self.supervisor.gave_up.is_set()
        return self.server.is_running()

    def stop(self) -> int | None:
        code = None
        if self.supervisor is not None:
            self.supervisor.stop()
        code = self.server.stop()
        if self.guard is not None:
            self.guard.stop()
            self.grpc_guard.stop()
        return code

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
