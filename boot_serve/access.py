"""Who may reach which of Triton's APIs: the policy the launcher, both guards and deploy/ share.

A client of the service reaches health, server and model metadata, model config and inference of
the served models. Statistics are for operators, who present the operator key. Everything else
Triton offers (system and CUDA shared-memory registration, trace and logging settings, the model
repository's index, load and unload) is closed to everyone.

It is closed twice:
1. Triton itself is started with its restriction flags (`triton_restriction_args`): the closed
   categories demand a header whose value is a random key that nothing hands out, the operator
   categories one carrying the operator key.
2. The guards answer only an allow-list of HTTP paths (boot_serve.http_guard) and gRPC methods
   (boot_serve.grpc_policy); a request for anything else is refused there with 403 / 404
   (PERMISSION_DENIED / UNIMPLEMENTED) before Triton sees it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

# The header (gRPC: metadata key) that carries a key for a restricted category, to the guards
# and to Triton alike. Lower case: gRPC metadata keys must be.
KEY_HEADER = "boot-operator-key"
# Triton's gRPC endpoint reads a restriction key from metadata under this prefixed name.
TRITON_GRPC_KEY_HEADER = "triton-grpc-protocol-" + KEY_HEADER

# Triton's restriction categories (tritonserver --help, "--http-restricted-api").
PUBLIC = ("health", "metadata", "model-config", "inference")
OPERATOR = ("statistics",)
CLOSED = ("shared-memory", "model-repository", "trace", "logging")

# Where an operator key comes from when none is given: generated per start, written to this file
# (mode 0600) for the operator's tools (python -m boot_serve.bench / soak --operator-key-file).
OPERATOR_KEY_ENV = "BOOT_OPERATOR_KEY"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def triton_restriction_args(operator_key: str, closed_key: str | None = None) -> list[str]:
    """tritonserver flags that close the CLOSED categories (with a key nobody holds) and put the
    OPERATOR ones behind `operator_key`, on the HTTP and the gRPC endpoint."""
    closed_key = closed_key or new_key()
    args = []
    for categories, key in ((CLOSED, closed_key), (OPERATOR, operator_key)):
        spec = f"{','.join(categories)}:{KEY_HEADER}={key}"
        args += [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]
    return args


def key_matches(presented: str | bytes | None, key: str | None) -> bool:
    """Whether `presented` is the operator key (constant-time; no key configured: never)."""
    if not key or presented is None:
        return False
    if isinstance(presented, str):
        presented = presented.encode("latin-1", errors="replace")
    return hmac.compare_digest(presented, key.encode())


def write_key_file(path: str | Path, key: str) -> Path:
    """Write `key` to `path`, readable by its owner only (created 0600, never widened)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    return path


def read_key(path: str | Path | None = None) -> str | None:
    """The operator key: from `path` if given, else $BOOT_OPERATOR_KEY, else None."""
    if path is not None:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"the operator key file {path} is empty")
        return key
    return os.environ.get(OPERATOR_KEY_ENV) or None
