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
import threading
from pathlib import Path
from typing import Any

import torch

from .. import run_layout as layout
from ..errors import WeightsError
from ..fileio import atomic_path, write_json_atomic
from ..fold_files import CHECKPOINT_CONFIG_KEY

_CONFIG_KEY = CHECKPOINT_CONFIG_KEY
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
    write_json_atomic(layout.checkpoint_sidecar(path), {"model": config, **(extra or {})})
    return path


# safetensors' names of the tensor types (its header's "dtype" field).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_MAX_LISTED = 5  # mismatched keys named in an error message


def _refuse_foreign_format(path: Path) -> None:
    """Raise :class:`WeightsError` unless ``path`` starts like a safetensors file.

    Reads the first 9 bytes only: a safetensors file is an 8-byte header length followed by a JSON object.
    Pickles and ``torch.save`` archives are recognised by their magic bytes and never unpickled.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise WeightsError(f"Cannot read the checkpoint {path} ({exc.strerror or exc}).") from exc
    if head.startswith(b"PK\x03\x04"):
        kind = "it is a zip archive, the format of torch.save"
    elif head[:1] == b"\x80":
        kind = "it is a Python pickle"
    elif len(head) < 9 or head[8:9] != b"{":
        kind = "it has no safetensors header" if head else "it is empty"
    else:
        return
    raise WeightsError(f"{path} is not a safetensors file ({kind}). Checkpoints must be safetensors files "
                       "written by wsi2dmamba (`wsi2dmamba train`); other formats are refused unread because "
                       "loading them can run code.")


def read_checkpoint_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model configuration stored in a checkpoint's header.

    Raises:
        WeightsError: the file is missing, is not a safetensors file, is damaged, or its header holds no
            valid model configuration.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Checkpoint not found: {path}")
    _refuse_foreign_format(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"{path} is not a readable safetensors checkpoint ({exc}); retrain this fold.") from exc
    if _CONFIG_KEY not in meta:
        raise WeightsError(f"{path} has no model configuration in its header; it was not written by wsi2dmamba.")
    try:
        config = json.loads(meta[_CONFIG_KEY])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise WeightsError(f"The model configuration in the header of {path} is not valid JSON ({exc}); the file "
                           "is damaged or was not written by wsi2dmamba. Retrain this fold.") from None
    if not isinstance(config, dict):
        raise WeightsError(f"The model configuration in the header of {path} is a JSON {type(config).__name__}, "
                           "not an object; the file is damaged or was not written by wsi2dmamba. Retrain this fold.")
    return config


def _build_on_meta(path: Path, config: dict[str, Any], n_stored: int) -> torch.nn.Module:
    """Build the model that ``config`` describes on the meta device (no memory for its tensors).

    A forged configuration (thousands of layers) could still take long to build, so construction stops once
    it has registered far more parameters and buffers than the ``n_stored`` tensors of the file.
    """
    from torch.nn.modules import module as nn_module

    from .registry import create_from_config

    thread, registered = threading.get_ident(), [0]
    max_tensors = 4 * n_stored + 64  # slack: a module may register a tensor and then replace it

    def count(*_args: Any) -> None:
        if threading.get_ident() == thread:
            registered[0] += 1
            if registered[0] > max_tensors:
                raise WeightsError(f"The model configuration in the header of {path} describes a model with more "
                                   f"tensors than the {n_stored} stored in the file; the header is damaged "
                                   "or was edited. Retrain this fold.")

    hooks = [nn_module.register_module_parameter_registration_hook(count),
             nn_module.register_module_buffer_registration_hook(count)]
    try:
        with torch.device("meta"):
            return create_from_config(config)
    except WeightsError:
        raise
    except Exception as exc:  # ConfigError for an unknown model or bad value; whatever a forged value provokes
        raise WeightsError(f"The model configuration in the header of {path} is invalid ({exc}); the file is "
                           "damaged or was not written by this version of wsi2dmamba.") from exc
    finally:
        for hook in hooks:
            hook.remove()


def _mismatches(expected: dict[str, tuple[tuple[int, ...], str]],
                stored: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Human-readable differences between the tensors a model needs and those a file holds."""
    problems = [f"{k!r} missing from the file" for k in expected if k not in stored]
    problems += [f"{k!r} in the file is not part of the model" for k in stored if k not in expected]
    for k in (k for k in expected if k in stored):  # in the model's order, so the first problems come first
        (shape, dtype), (file_shape, file_dtype) = expected[k], stored[k]
        if shape != file_shape:
            problems.append(f"{k!r} has shape {list(file_shape)} in the file, the model needs {list(shape)}")
        elif dtype != file_dtype:
            problems.append(f"{k!r} is {file_dtype} in the file, the model needs {dtype}")
    return problems


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in ``path`` and load its weights (strictly; no pickle involved).

    The model is first built on the meta device and every tensor name, shape and dtype is compared with the
    file's header, so a damaged or forged header is refused before any memory is allocated for the model.

    Raises:
        WeightsError: the file is missing, not a safetensors file written by wsi2dmamba, damaged, or its
            tensors do not fit the model its header describes.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    config = read_checkpoint_config(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # a header read a moment ago that no longer parses: the file changed or is damaged
        raise WeightsError(f"{path} is not a readable safetensors checkpoint ({exc}); retrain this fold.") from exc
    skeleton = _build_on_meta(path, config, n_stored=len(stored))
    state = skeleton.state_dict()
    expected = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype))) for k, v in state.items()}
    problems = _mismatches(expected, stored)
    if problems:
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise WeightsError(f"The weights in {path} do not fit the {config.get('model')!r} model its header "
                           f"describes: {'; '.join(problems[:_MAX_LISTED])}{more}. The file is damaged or was "
                           "edited; retrain this fold.")

    tensors = load_file(str(path), device=str(device))
    n_saved = sum(1 for _ in skeleton.parameters()) + sum(1 for _ in skeleton.buffers())
    if n_saved == len(state):
        model = skeleton.to_empty(device=device)  # every tensor is overwritten by the file below
    else:  # non-persistent buffers are not in the file: build the model normally so that they are set
        from .registry import create_from_config

        model = create_from_config(config).to(device)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"The weights in {path} do not fit the model its header describes: {exc}") from exc
    return model.eval()


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
    _refuse_foreign_format(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_STATE_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        _check_training_header(header)
    except Exception as exc:  # damaged or foreign file
        raise WeightsError(f"Cannot read the resume state {path} ({exc}); delete it to restart this fold.") from exc
    if header["model_config"] != model.config_dict():
        raise WeightsError(f"The resume state {path} belongs to another model configuration; delete it to "
                           "restart this fold.")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"The model weights in the resume state {path} do not fit the model ({exc}); delete "
                           "it to restart this fold.") from exc
    device = next(model.parameters()).device
    opt_state: dict[int, dict[str, Any]] = {}
    try:
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v if name == "step" else v.to(device)
        for idx, values in header["optim_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": opt_state, "param_groups": header["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise WeightsError(f"The optimiser state in the resume state {path} does not fit the model ({exc}); delete "
                           "it to restart this fold.") from exc
    rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    if not isinstance(rng.get("torch"), torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise WeightsError(f"The resume state {path} holds no random generator state; delete it to restart this fold.")
    return header["loop"], rng


def _check_training_header(header: Any) -> None:
    """ValueError naming what is wrong when a resume state's header is not what :func:`save_training_state`
    writes (a hand-edited header must not reach the training loop)."""
    if not isinstance(header, dict) or not {"loop", "param_groups", "optim_scalars", "model_config"} <= set(header):
        raise ValueError("its header lacks the training state")
    loop = header["loop"]
    counters = ("epoch", "step", "best_epoch")
    if not isinstance(loop, dict) or not all(type(loop.get(k)) is int and loop[k] >= 0 for k in counters):
        raise ValueError(f"its loop state must hold the counters {', '.join(counters)} as integers ≥ 0")
    if loop.get("best_value") is not None and type(loop["best_value"]) not in (int, float):
        raise ValueError("its best value is not a number")
    if not isinstance(loop.get("log"), list) or not all(isinstance(r, dict) for r in loop["log"]) \
            or len(loop["log"]) != loop["epoch"]:
        raise ValueError("its log is not one row per finished epoch")
    if not isinstance(header["param_groups"], list) or not all(isinstance(g, dict) for g in header["param_groups"]):
        raise ValueError("its optimiser parameter groups are not a list of objects")
    scalars = header["optim_scalars"]
    if not isinstance(scalars, dict) or not all(k.isdigit() and isinstance(v, dict) for k, v in scalars.items()):
        raise ValueError("its optimiser scalars are not an object per parameter index")
