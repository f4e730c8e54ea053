"""Which tritonserver, on which ports, and what Linux says about its processes.

Which `tritonserver` (docs/export-serving.md):
- the one on PATH when there is one (NVIDIA's container, a local build): started as is, with its
  own backends (the GPU variant of the repository needs its onnxruntime / tensorrt backends);
- otherwise the CPU build bundled in the PyPI wheel `nvidia-pytriton` (Triton 2.51, Python
  backend only). It needs three things, prepared by boot_serve.triton_server in a temporary backend
  directory: the Python-backend stub built for *this* Python copied next to `libtriton_python.so`,
  `LD_LIBRARY_PATH` including the wheel's `nvidia_pytriton.libs`, and this interpreter's `bin/`
  first on PATH, which is how the embedded interpreter of the stub finds this environment's
  site-packages (numpy < 2, onnxruntime, transformers).

The rest reads /proc: the sockets a process listens on (is a port really Triton's?), the Python-backend
shared memory files its process group maps (removed after a crash), and the parent-death signal that
stops Triton when the process that started it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import sys
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SHM_REGION = re.compile(r"/dev/shm/triton_python_backend_shm_region_\S+")


class ServerError(RuntimeError):
    """tritonserver could not be found, did not start, or exited."""



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


def url_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


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


def die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent exits (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def warn_public_bind(host: str) -> None:
    bar = "!" * 78
    sys.stderr.write(
        f"{bar}\nWARNING: binding Triton to {host!r}, not 127.0.0.1. Triton has no authentication: "
        f"anyone who can reach\nthis address can run inference, read model metadata and statistics. "
        f"Put it behind a\nfirewall or an authenticating proxy.\n{bar}\n")
