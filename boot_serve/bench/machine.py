"""What ran the benchmark: hardware, load average, package versions, the server's metadata."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            gpus = [line.strip() for line in q.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "memory_gib": mem,
            "gpus": gpus, "platform": platform.platform(), "benchmark_process_nice": os.nice(0)}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "onnxruntime-gpu", "onnxruntime", "tritonclient", "nvidia-pytriton", "torch", "diffusers",
                 "transformers", "boot"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def server_metadata(url: str, protocol: str) -> dict:
    """Triton's name, version and extensions."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as lib

            return lib.InferenceServerClient(url).get_server_metadata(as_json=True)
        import tritonclient.http as lib

        return lib.InferenceServerClient(url).get_server_metadata()
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        return {"error": str(err)}

