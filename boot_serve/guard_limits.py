"""The HTTP guard's limits, and its account of open client connections.

Every bound the guard holds a client to is a field of `Limits` (defaults below, each with its reason);
`Connections` counts the open connections per client address and in all, and decides whether a new
one may open (boot_serve.http_guard answers 429 when it may not).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

# A valid boot_txt2img request nests 5 levels (body {, inputs [, input {, data [, row [); twice
# that and more leaves room for any client's layout and stays three orders of magnitude below the
# depth that crashes Triton 2.51.
MAX_JSON_DEPTH = 16
# 8 prompts (max_batch_size) of MAX_PROMPT_BYTES (4096) each, JSON-escaped at up to 3 bytes per
# byte (\uXXXX pairs for 4-byte characters), is ~100 KB; a megabyte is ten times that.
MAX_BODY_BYTES = 1 << 20
MAX_HEAD_BYTES = 16 << 10
HEAD_TIMEOUT = 10.0  # from a request's first byte to the end of its head
READ_TIMEOUT = 30.0  # from a request's first byte to the end of its body
IDLE_TIMEOUT = 75.0  # an open connection with no request in it
WRITE_TIMEOUT = 30.0  # a client that does not read its response
UPSTREAM_TIMEOUT = 300.0  # Triton's answer to one request (a 512² model on a CPU takes ~35 s)
MAX_CONNECTIONS = 512  # open client connections in all
MAX_CONNECTIONS_PER_CLIENT = 64  # ... from one address (0: no per-address cap, e.g. behind an ingress)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    max_json_depth: int = MAX_JSON_DEPTH
    read_timeout: float = READ_TIMEOUT
    head_timeout: float = HEAD_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    upstream_timeout: float = UPSTREAM_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT

    def __post_init__(self):
        positive = (self.max_body_bytes, self.max_json_depth, self.read_timeout, self.head_timeout,
                    self.idle_timeout, self.write_timeout, self.upstream_timeout, self.max_connections)
        if min(positive) <= 0 or self.max_connections_per_client < 0:
            raise ValueError(f"guard limits must be positive, got {self}")


class ClientConnection:
    """A client connection: its writer, address, and whether it waits between requests."""

    def __init__(self, writer: asyncio.StreamWriter, ip: str):
        self.writer, self.ip = writer, ip
        self.idle = True
        self.since = time.monotonic()


class Connections:
    """The open client connections, per address and in all, held to `limits`' connection caps."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.open: dict[asyncio.StreamWriter, ClientConnection] = {}
        self.per_ip: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, ip: str) -> str | None:
        """None when a new connection from `ip` may open, else why not."""
        cap = self.limits.max_connections_per_client
        if cap and self.per_ip.get(ip, 0) >= cap:
            return f"{cap} connections from your address are open; close one or try again shortly"
        if len(self.open) >= self.limits.max_connections:
            idle = [c for c in self.open.values() if c.idle]
            if not idle:
                return f"this server has {self.limits.max_connections} connections open; try again shortly"
            oldest = min(idle, key=lambda c: c.since)  # an idle keep-alive connection gives way
            oldest.writer.transport.abort()
            self.forget(oldest)
        return None

    def add(self, writer: asyncio.StreamWriter, ip: str) -> ClientConnection:
        client = ClientConnection(writer, ip)
        self.open[writer] = client
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        return client

    def forget(self, client: ClientConnection) -> None:
        if self.open.pop(client.writer, None) is not None:
            self.per_ip[client.ip] -= 1
            if not self.per_ip[client.ip]:
                del self.per_ip[client.ip]
