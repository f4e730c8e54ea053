"""The probe listener: Kubernetes (or any supervisor) asks here whether the guarded service lives and
is ready, on a port of its own that client connections cannot crowd out.

    GET /v2/health/live   200 while the HTTP guard's event loop runs freely and the service has not
                          given up; 503 with the reason otherwise (a liveness probe then restarts it)
    GET /v2/health/ready  200 when live and Triton behind the guard answers ready; 503 otherwise

It runs on its own thread (stdlib ThreadingHTTPServer), so a busy or stalled guard loop cannot
make it lie: a stalled loop shows as a stale heartbeat, and liveness fails.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROBE_TIMEOUT = 2.0  # seconds for Triton's own readiness answer
STALL = 5.0  # a guard heartbeat older than this: the guard is not live


class HealthListener:
    """Answers probes for `guard` (a boot_serve.http_guard.Guard) on (host, port) (port 0: a free one).
    `gave_up`: a callable giving the reason the service stopped for good, or None."""

    def __init__(self, guard, host: str = "127.0.0.1", port: int = 0, gave_up=lambda: None):
        self.guard, self.gave_up = guard, gave_up
        self.host, self.port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    def live(self) -> tuple[bool, str]:
        reason = self.gave_up()
        if reason:
            return False, reason
        if not self.guard.responsive(STALL):
            return False, f"the HTTP guard's event loop has not run for over {STALL:g} s"
        return True, "live"

    def ready(self) -> tuple[bool, str]:
        alive, why = self.live()
        if not alive:
            return False, why
        upstream = self.guard.upstream
        if upstream is None:
            return False, self.guard.down_reason
        try:
            url = "http://{}:{}/v2/health/ready".format(*upstream)
            with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as r:
                return r.status == 200, "ready" if r.status == 200 else f"tritonserver answers {r.status}"
        except (urllib.error.URLError, OSError) as err:
            return False, f"tritonserver is not ready ({err})"

    def start(self) -> HealthListener:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5.0  # a probe that does not finish its request in time is dropped

            def do_GET(self):  # noqa: N802 - http.server's name
                check = {"/v2/health/live": listener.live, "/v2/health/ready": listener.ready}.get(self.path)
                ok, why = check() if check else (False, "probes: /v2/health/live, /v2/health/ready")
                body = b"" if ok else json.dumps({"error": why}).encode()
                self.send_response(200 if ok else 404 if check is None else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="boot-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HealthListener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
