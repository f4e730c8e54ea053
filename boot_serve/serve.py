"""Serve an exported model repository: a supervised NVIDIA Triton Inference Server behind the guards.

    python -m boot_serve.serve --repository model_repository            # 127.0.0.1:8000/8001/8002

Clients reach Triton through the HTTP and gRPC guards on the public ports (boot_serve.service,
docs/robustness.md); the metrics port is Triton's own, for operators. A tritonserver that dies is
restarted. `--variant` rewrites the repository's configs first (boot_serve.triton_repo), e.g.
`--variant cpu-onehop` to serve the whole request from one Python model instead of the default
ensemble. `--help` lists the product flags, `--help-all` also the operators' ones.

In Python, the launcher (boot_serve.triton_server, also importable from here) is a context manager:

    with TritonServer("model_repository") as server:    # free ports, waits until ready
        Client(server.http_url).generate(["a red circle"], [0])

and boot_serve.service.Service is the whole guarded, supervised stack.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from boot.cli import Parser
from boot_serve.access import KEY_HEADER, write_key_file
from boot_serve.guard_limits import MAX_BODY_BYTES, MAX_CONNECTIONS_PER_CLIENT, MAX_JSON_DEPTH, Limits
from boot_serve.service import CRASH_WINDOW, MAX_CRASHES, Service, describe_exit
from boot_serve.triton_configs import VARIANTS, RepositoryError
from boot_serve.triton_process import LOCAL_HOSTS, ServerError
from boot_serve.triton_repo import write_configs


def parser() -> Parser:
    p = Parser(prog="python -m boot_serve.serve",
               description="Start tritonserver on an exported boot model repository, supervised, "
                           "with the HTTP and gRPC guards in front (docs/robustness.md).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repository", default="model_repository",
                   help="model repository filled by `python -m boot_serve.export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address every endpoint binds (anything but loopback is exposed to the network)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (0: a free one)")
    p.add_argument("--variant", choices=("cpu", *VARIANTS), default=None,
                   help="first rewrite the repository's configs for this variant (python -m boot_serve.triton_repo "
                        "--variant); default: serve the configs as they are")
    t = p.operator_group("tritonserver (operators)")
    t.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics port binds (operators only: Triton's metrics have no authentication)")
    t.add_argument("--health-port", type=int, default=None,
                   help="port of the probe listener (/v2/health/live, /ready) on --host, outside the client caps "
                        "(0: a free one; default: none)")
    t.add_argument("--tritonserver", default=None,
                   help="tritonserver binary (default: the one on PATH, else the one bundled in nvidia-pytriton)")
    t.add_argument("--bundled", action="store_true", help="use the bundled CPU tritonserver even if one is on PATH")
    t.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    t.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    t.add_argument("--exit-timeout", type=int, default=30,
                   help="seconds Triton waits for in-flight requests and open connections at shutdown")
    g = p.operator_group("protection (operators; docs/robustness.md)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
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
        print(f"error: tritonserver exited ({describe_exit(service.server.process.returncode)})", file=sys.stderr)
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


def warn_unguarded(host: str) -> None:
    sys.stderr.write(f"WARNING: --no-guard on {host!r}: requests that crash Triton 2.51 (deeply nested JSON) or "
                     "make it buffer 64 MB bodies reach it from the network unchecked.\n")


if __name__ == "__main__":
    sys.exit(main())
