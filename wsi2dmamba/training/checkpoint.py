"""Checkpoints as safetensors plus JSON: nothing is ever unpickled.

A checkpoint ``<name>.safetensors`` holds the model's tensors; its header metadata holds the model's
configuration (``model.config_dict()``) as JSON, so the file alone rebuilds the model. A copy of that
configuration, with any extra information, is written beside it as ``<name>.json`` for people and tools.

The resume state of an unfinished fold (model, AdamW moments, random generator state, epoch) is stored
the same way: tensors in safetensors, everything else as JSON in the header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from ..fileio import atomic_path, write_json_atomic

_CONFIG_KEY = "wsi2dmamba.model_config"
_STATE_KEY = "wsi2dmamba.state"


def _state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Cloned so that tied weights become separate entries (safetensors refuses shared storage).
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and configuration to ``path`` (``.safetensors``) and ``<stem>.json``.

    Args:
        path: the checkpoint file.
        model: a registry model (it must have ``config_dict()``).
        extra: more JSON-able information for the ``.json`` file (epoch, validation loss, …).
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = model.config_dict()
    with atomic_path(path) as tmp:
        save_file(_state_tensors(model), str(tmp), metadata={_CONFIG_KEY: json.dumps(config, sort_keys=True)})
    write_json_atomic(path.with_suffix(".json"), {"model": config, **(extra or {})})
    return path


def read_checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model configuration stored in a checkpoint's header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"{path} is not a readable safetensors checkpoint ({exc}); retrain this fold.") from exc
    if _CONFIG_KEY not in meta:
        raise WeightsError(f"{path} has no model configuration in its header; it was not written by wsi2dmamba.")
    return json.loads(meta[_CONFIG_KEY])


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in ``path`` and load its weights (strictly; no pickle involved)."""
    from safetensors.torch import load_file

    from ..models import create_from_config

    path = Path(path)
    model = create_from_config(read_checkpoint_config(path))
    tensors = load_file(str(path), device=str(device))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"The weights in {path} do not fit the model its header describes: {exc}") from exc
    return model.to(device).eval()


# -------------------------------------------------------------------------------------- resume state

def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def save_training_state(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """Write everything needed to continue a fold exactly where it stopped.

    Args:
        path: the ``.safetensors`` file.
        model: the model being trained.
        optimizer: its optimiser (tensor state per parameter; ``param_groups`` go to the header).
        state: JSON-able loop state (epoch, step, best value, log rows, …).
        rng: random generator states as uint8 tensors (``torch.get_rng_state()`` …).
    """
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in opt["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().to("cpu").clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    for name, value in rng.items():
        tensors[f"rng.{name}"] = value.detach().to("cpu").clone().contiguous()
    header = {"loop": state, "param_groups": _json_safe(opt["param_groups"]), "optim_scalars": scalars,
              "model_config": model.config_dict()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_STATE_KEY: json.dumps(header)})  # key order kept: log columns


def load_training_state(path: str | os.PathLike[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a state written by :func:`save_training_state` into ``model`` and ``optimizer``.

    Returns:
        The loop state and the random generator states.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # damaged or foreign file
        raise WeightsError(f"Cannot read the resume state {path} ({exc}); delete it to restart this fold.") from exc
    if header["model_config"] != model.config_dict():
        raise WeightsError(f"The resume state {path} belongs to another model configuration; delete it to "
                           "restart this fold.")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    device = next(model.parameters()).device
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
    for idx, values in header["optim_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": header["param_groups"]})
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return header["loop"], rng
