"""Atomic, pickle-free training checkpoints.

A checkpoint is a folder `<dir>/step-XXXXXXXX/` holding `tensors.safetensors` (model, EMA and
optimizer tensors) and `meta.json` (step, optimizer hyperparameters, config), written under a
temporary name and renamed into place, so a half-written checkpoint is never visible: a
crash during the write leaves only a `.tmp-*` folder that `latest()` ignores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "step-"


def _flatten_optimizer(state: dict, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            key = f"{prefix}.{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim") -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(f"{prefix}."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(
    directory: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict | None = None,
    keep: int = 2,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` ones.

    `extra_optimizers` (e.g. the DMD fake model's, {"fake": opt}) are stored beside the main one, each under its
    own prefix: tensors "optim-<name>.<param>.<state>", hyperparameters in meta.json's "optimizer-<name>"."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().contiguous().cpu()
    info = {"step": step, "meta": meta or {}}
    if optimizer is not None:
        opt_tensors, info["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    for name, opt in (extra_optimizers or {}).items():
        opt_tensors, info[f"optimizer-{name}"] = _flatten_optimizer(opt.state_dict(), f"optim-{name}")
        tensors.update(opt_tensors)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(info, indent=1, default=str))
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    final = directory / f"{_PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(directory.glob(f"{_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: str | Path) -> Path | None:
    """Newest complete checkpoint folder in `directory`, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob(f"{_PREFIX}*") if (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def _module_part(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def module_state(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict that `save` stored for modules[name] in a checkpoint folder (empty if none)."""
    return _module_part(load_file(str(Path(path) / "tensors.safetensors")), name)


def load(
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    extra_optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> dict:
    """Restore modules (and optimizers) from a checkpoint folder; return its meta dict. An extra optimizer the
    checkpoint does not hold (one written before it existed) is refused with a ValueError."""
    path = Path(path)
    info = json.loads((path / "meta.json").read_text())
    tensors = load_file(str(path / "tensors.safetensors"))
    for name, module in modules.items():
        module.load_state_dict(_module_part(tensors, name))
    if optimizer is not None and "optimizer" in info:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    for name, opt in (extra_optimizers or {}).items():
        if f"optimizer-{name}" not in info:
            raise ValueError(f"checkpoint {path} holds no optimizer {name!r}")
        opt.load_state_dict(_unflatten_optimizer(tensors, info[f"optimizer-{name}"], f"optim-{name}"))
    return info
