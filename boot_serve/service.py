"""The served stack of `python -m boot_serve.serve`: a supervised tritonserver with the HTTP guard in front.

    with Service("model_repository") as service:          # free ports, waits until ready
        Client(service.http_url).generate(["a red circle"], [0])

- `Supervisor` restarts a tritonserver that dies (a crash, a kill) after a backoff that doubles with
  each crash in the window (1 s, 2 s, 4 s, ... at most 30 s), and logs why it died (the signal) and
  how long service was down. Behind the guards each restart takes fresh loopback ports, and the
  guards are pointed at it only once the new process is seen to own its listening sockets: a local
  process that binds the old port during the backoff gets no client traffic. More than
  `max_crashes` crashes within `window` seconds and it gives up: the guards and the probe listener
  then answer 503 with the reason, and the launcher exits 1 (Kubernetes or systemd restarts it).
  During a restart clients get ServerUnavailableError, and the same `Client` works again once
  Triton is back.
- `Guard` (boot_serve.http_guard) owns the public HTTP port and `GrpcGuard` (boot_serve.grpc_guard) the
  public gRPC port; they forward to Triton's own endpoints on 127.0.0.1, so a request that would crash
  or exhaust Triton never reaches it, and only the served model and the public APIs are reachable
  (boot_serve.access). `HealthListener` (boot_serve.health) answers probes on a port of its own. The
  metrics endpoint is Triton's own, on loopback unless told otherwise.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from boot_serve.access import new_key
from boot_serve.grpc_guard import GrpcGuard
from boot_serve.guard_limits import Limits
from boot_serve.health import HealthListener
from boot_serve.http_guard import Guard
from boot_serve.triton_configs import ENSEMBLE
from boot_serve.triton_process import ServerError
from boot_serve.triton_server import TritonServer

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
                 backoff: tuple[float, float] = BACKOFF, log=_log, fresh_ports: bool = False,
                 on_up=lambda server: None, on_down=lambda reason: None):
        if max_crashes < 0 or window <= 0 or backoff[0] < 0 or backoff[1] < backoff[0]:
            raise ValueError(f"bad supervision settings: max_crashes={max_crashes}, window={window}, backoff={backoff}")
        self.server = server
        self.max_crashes = max_crashes
        self.window = window
        self.backoff = backoff
        self.log = log
        self.fresh_ports = fresh_ports  # restart on new free HTTP/gRPC ports (behind the guards)
        self.on_up, self.on_down = on_up, on_down  # called when Triton serves / stops serving
        self.give_up_reason: str | None = None
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
        # that started it exits (PR_SET_PDEATHSIG, boot_serve.triton_server), and the watcher outlives each.
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
        self.on_up(self.server)
        self._started.set()
        while not self._stopping.is_set():
            code = self.server.wait()
            if self._stopping.is_set():
                return
            self.serving.clear()
            self.on_down(f"tritonserver died ({describe_exit(code)}) and is restarting; try again shortly")
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
                self.give_up_reason = (f"tritonserver died ({cause}); {len(self._crashes)} crashes within "
                                       f"{self.window:g} s, more than the {self.max_crashes} allowed: not restarting "
                                       "it again; this service gave up and must be restarted")
                self.log(f"boot: {self.give_up_reason}")
                self.gave_up.set()
                self.on_down(self.give_up_reason)
                return False
            delay = min(self.backoff[0] * 2 ** (len(self._crashes) - 1), self.backoff[1])
            self.log(f"boot: tritonserver died ({cause}); restarting it in {delay:g} s "
                     f"(crash {len(self._crashes)} of at most {self.max_crashes} within {self.window:g} s)")
            self.server.stop(timeout=10)  # its temporary backend folder, any stub left behind
            if self._stopping.wait(delay):
                return False
            if self.fresh_ports:  # the old ports may be taken by now; Triton must not share them
                self.server.ports["http"] = self.server.ports["grpc"] = None
            try:
                self.server.start()
            except ServerError as err:
                cause = f"restart failed: {str(err).splitlines()[0]}"
                continue
            down = time.monotonic() - down_since
            self.restarts.append({"cause": cause, "down_s": round(down, 2)})
            self.log(f"boot: tritonserver is serving again, {down:.1f} s after it died")
            self.serving.set()
            self.on_up(self.server)
            return True
        return False


class Service:
    """tritonserver on `repository` under a Supervisor (`max_crashes` 0: none), with the HTTP and gRPC
    guards on (host, http_port) and (host, grpc_port) in front unless `guard=False`, and the probe
    listener on (host, health_port) when a health port is given. Ports left None are picked free.
    `models`: what clients may reach (default: the served text-to-image model); `operator_key`:
    opens statistics (default: one made here, in `.operator_key`). Other keyword arguments go to
    TritonServer."""

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, guard: bool = True,
                 limits: Limits = Limits(), max_crashes: int = MAX_CRASHES, window: float = CRASH_WINDOW,
                 backoff: tuple[float, float] = BACKOFF, log=_log, models: tuple[str, ...] | None = (ENSEMBLE,),
                 operator_key: str | None = None, health_port: int | None = None,
                 metrics_host: str = "127.0.0.1", **server_args):
        self.host = host
        self.operator_key = operator_key or new_key()
        inner = "127.0.0.1" if guard else host  # behind the guards Triton listens on loopback only
        self.server = TritonServer(repository, host=host, http_port=None if guard else http_port,
                                   grpc_port=None if guard else grpc_port, metrics_port=metrics_port,
                                   http_host=inner, grpc_host=inner, metrics_host=metrics_host,
                                   operator_key=self.operator_key, **server_args)
        self.guard = self.grpc_guard = self.health = None
        if guard:
            self.guard = Guard(None, None, host, http_port or 0, limits, log, models=models,
                               operator_key=self.operator_key)
            self.grpc_guard = GrpcGuard("127.0.0.1:0", host, grpc_port or 0, limits.max_body_bytes, models=models,
                                        operator_key=self.operator_key)
            self.grpc_guard.set_upstream(None)
            if health_port is not None:
                self.health = HealthListener(self.guard, host, health_port, gave_up=self._gave_up)
        self.supervisor = Supervisor(self.server, max_crashes, window, backoff, log, fresh_ports=guard,
                                     on_up=self._up, on_down=self._down) if max_crashes else None

    def _up(self, server: TritonServer) -> None:
        if self.guard is not None:
            self.guard.set_upstream(("127.0.0.1", server.ports["http"]))
            self.grpc_guard.set_upstream(server.grpc_url)

    def _down(self, reason: str) -> None:
        if self.guard is not None:
            self.guard.set_upstream(None, reason)
            self.grpc_guard.set_upstream(None)

    def _gave_up(self) -> str | None:
        if self.supervisor is not None:
            return self.supervisor.give_up_reason
        return None if self.server.is_running() else "tritonserver exited"

    @property
    def http_url(self) -> str:
        """Where clients send HTTP: the guard, or Triton itself without one."""
        return self.guard.url if self.guard is not None else self.server.http_url

    @property
    def grpc_url(self) -> str:
        return self.grpc_guard.url if self.grpc_guard is not None else self.server.grpc_url

    @property
    def health_url(self) -> str | None:
        return self.health.url if self.health is not None else None

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
            if self.health is not None:
                self.health.start()
        try:
            if self.supervisor is not None:
                self.supervisor.start()
            else:
                self.server.start()
                self._up(self.server)
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
        for part in (self.health, self.guard, self.grpc_guard):
            if part is not None:
                part.stop()
        return code

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
