"""The servers of a --variants run: one repository copy and one tritonserver per variant."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path


def variant_repository(repository: Path, variant: str, dest: Path) -> Path:
    """`dest` made a repository serving `variant`: links to `repository`'s exported files (graphs,
    tokenizer, manifest), its own configs and model.py files."""
    from boot_serve.triton_repo import write_configs

    for src in sorted(repository.rglob("*")):
        if src.is_dir() or src.name in ("config.pbtxt", "model.py") or "__pycache__" in src.parts:
            continue
        link = dest / src.relative_to(repository)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src.resolve())
    write_configs(dest, variant)
    return dest


@contextmanager
def started_servers(repository: Path, variants: Sequence[str], log=print, operator_key: str | None = None):
    """{variant: TritonServer} of one server per variant, all ready (statistics open to
    `operator_key`); stopped on exit."""
    import tempfile

    from boot_serve.triton_server import TritonServer

    with tempfile.TemporaryDirectory(prefix="boot-bench-") as tmp, contextlib.ExitStack() as stack:
        servers = {}
        for variant in variants:
            repo = variant_repository(repository, variant, Path(tmp) / variant)
            servers[variant] = stack.enter_context(TritonServer(repo, exit_timeout=5,
                                                                          operator_key=operator_key))
            log(f"[bench] {variant}: tritonserver ready at {servers[variant].http_url}")
        yield servers

