"""The guards on their own, in front of a tritonserver started otherwise (as in deploy/): the HTTP guard
(boot_serve.http_guard), and with --grpc-listen the gRPC guard (boot_serve.grpc_guard), and with
--health-listen the probe listener (boot_serve.health).

    python -m boot_serve.guard --listen 0.0.0.0:8000 --upstream 127.0.0.1:18000 --models boot_txt2img

`python -m boot_serve.serve` starts the same guards in front of the tritonserver it supervises
(docs/robustness.md).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from boot_serve import access
from boot_serve.grpc_guard import GrpcGuard
from boot_serve.guard_limits import MAX_BODY_BYTES, MAX_CONNECTIONS_PER_CLIENT, MAX_JSON_DEPTH, READ_TIMEOUT, Limits
from boot_serve.health import HealthListener
from boot_serve.http_guard import Guard


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m boot_serve.guard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", type=_address, default=("127.0.0.1", 8000), help="HOST:PORT the HTTP guard binds")
    p.add_argument("--upstream", type=_address, required=True, help="HOST:PORT of Triton's HTTP endpoint")
    p.add_argument("--grpc-listen", type=_address, default=None,
                   help="HOST:PORT the gRPC guard binds (boot_serve.grpc_guard; with --grpc-upstream)")
    p.add_argument("--grpc-upstream", type=_address, default=None, help="HOST:PORT of Triton's gRPC endpoint")
    p.add_argument("--health-listen", type=_address, default=None,
                   help="HOST:PORT of the probe listener (/v2/health/live and /ready), outside the client caps")
    p.add_argument("--models", default=None, help="comma-separated model names clients may reach (default: any)")
    p.add_argument("--operator-key-file", default=None,
                   help=f"file holding the key that opens statistics (default: ${access.OPERATOR_KEY_ENV}; "
                        "none: statistics closed)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="largest HTTP body / gRPC message accepted")
    p.add_argument("--max-json-depth", type=int, default=MAX_JSON_DEPTH, help="deepest JSON nesting accepted")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                   help="seconds a request's head and body may take to arrive")
    p.add_argument("--max-connections-per-client", type=int, default=MAX_CONNECTIONS_PER_CLIENT,
                   help="open connections from one address (0: no cap, e.g. behind an ingress)")
    args = p.parse_args(argv)
    if (args.grpc_listen is None) != (args.grpc_upstream is None):
        p.error("--grpc-listen and --grpc-upstream go together")
    try:
        limits = Limits(args.max_body_bytes, args.max_json_depth, args.read_timeout,
                        max_connections_per_client=args.max_connections_per_client)
        key = access.read_key(args.operator_key_file)
    except (ValueError, OSError) as err:
        p.error(str(err))
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    guards = []
    try:
        http = Guard(*args.upstream, *args.listen, limits=limits, models=models, operator_key=key).start()
        guards.append(http)
        print(f"boot guard: HTTP {http.url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
        grpc_guard = None
        if args.grpc_listen is not None:
            upstream = "{}:{}".format(*args.grpc_upstream)
            grpc_guard = GrpcGuard(upstream, *args.grpc_listen, max_message_bytes=limits.max_body_bytes,
                                   models=models, operator_key=key).start()
            guards.append(grpc_guard)
            print(f"boot guard: gRPC {grpc_guard.url} -> {upstream}", flush=True)
        if args.health_listen is not None:
            health = HealthListener(http, *args.health_listen).start()
            guards.append(health)
            print(f"boot guard: probes {health.url}", flush=True)
    except OSError as err:
        for guard in guards:
            guard.stop()
        print(f"error: {err}", file=sys.stderr)
        return 2
    stop.wait()
    for guard in guards:
        guard.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
