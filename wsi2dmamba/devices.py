"""Choosing the torch device from a ``--device`` option, the same way for every stage."""

from __future__ import annotations

from .errors import ConfigError


def resolve_device(device: str):
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; a GPU asked for but absent is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for a GPU, but PyTorch sees none here; use --device cpu.")
    return dev
