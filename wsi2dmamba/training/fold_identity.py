"""Which configuration a trained fold *is*: the identity fields of its training and model configurations.

A fold's ``config.json`` and ``done.json`` carry ``config_hash``, the hash of the fold's identity (training
options, model key and overrides, classes, feature width, partitions, feature folder). Runtime fields
(:mod:`wsi2dmamba.identity`: ``TrainConfig.device``, the models' ``scan_backend``, ``checkpoint_blocks`` and
``channel_groups``) are not part of it, so a fold resumes or is reused on another device or with another
memory setting.

Folds whose recorded hash still counts the runtime values they were trained with are recognised: when the
hash of today's identity plus those recorded values is the recorded hash, the fold differs only in how it
is run. Its records are rewritten with today's hash (nothing is trained again) and one line says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..fileio import file_sha256, params_hash, write_json_atomic
from ..identity import runtime_part, without_runtime
from .config import TrainConfig

log = logging.getLogger(__name__)


def model_identity(model_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The model overrides that belong to a fold's identity: ``overrides`` without the model's runtime fields.

    Args:
        model_name: registry name of the model (no preset).
        overrides: model configuration fields given on the command line or in a pipeline file.
    """
    from ..models.registry import config_class

    return without_runtime(config_class(model_name), overrides)


def _with_recorded_runtime(identity: dict[str, Any], prior: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with the runtime values that ``prior`` (a fold's ``config.json``) recorded put back."""
    from ..models.registry import config_class

    train = {**identity["train"], **runtime_part(TrainConfig, prior.get("train") or {})}
    recorded = runtime_part(config_class(identity["model_name"]), prior.get("model_overrides") or {})
    return {**identity, "train": train, "model_overrides": {**identity["model_overrides"], **recorded}}


def adopt_runtime_only_change(fold_dir: Path, prior: dict[str, Any], identity: dict[str, Any],
                              config_hash: str) -> bool:
    """True when the fold in ``fold_dir`` is this identity, hashed with the runtime values it was trained
    with; its ``config.json`` and ``done.json`` then carry ``config_hash`` from now on.

    Args:
        fold_dir: the fold's folder.
        prior: its ``config.json``.
        identity: today's identity of the fold (what ``config_hash`` hashes).
        config_hash: today's hash of ``identity``.
    """
    if not prior.get("config_hash") or params_hash(_with_recorded_runtime(identity, prior)) != prior["config_hash"]:
        return False
    config_path = layout.fold_file(fold_dir, layout.FOLD_CONFIG)
    write_json_atomic(config_path, {**prior, "config_hash": config_hash})
    done_path = layout.fold_file(fold_dir, layout.FOLD_DONE)
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        done["config_hash"] = config_hash
        if "outputs" in done:  # compared by `wsi2dmamba verify`
            done["outputs"] = {**done["outputs"], layout.FOLD_CONFIG: file_sha256(config_path)}
        write_json_atomic(done_path, done)
    log.warning("%s: trained with a configuration hash that counted runtime options (device, scan backend, "
                "memory settings); it is the same fold, kept as is, and its records now carry hash %s",
                fold_dir, config_hash)
    return True
