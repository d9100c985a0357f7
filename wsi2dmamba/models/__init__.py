"""MIL models over feature grids, built by name from a registry.

>>> import numpy as np
>>> from wsi2dmamba.models import GridBatch, create
>>> model = create("2dmambamil", in_dim=1024, n_classes=2).eval()
>>> features, tissue = np.random.rand(6, 8, 1024).astype(np.float32), np.ones((6, 8), bool)
>>> out = model(GridBatch.from_arrays([(features, tissue)]))   # or GridBatch.from_grids(feature_grids)
>>> tuple(out.logits.shape), tuple(out.attention.shape)       # (B, n_classes), (B, H, W)
((1, 2), (1, 6, 8))

Models: ``2dmambamil`` (2DMamba), ``m2dmil`` (Mamba2D mixer), and the baselines ``abmil``, ``transmil``,
``clam-sb``, ``mambamil``, ``cnn2d`` and ``meanpool``. A model key ``name:preset`` picks a named
configuration, e.g. the ablation ``2dmambamil:noscan``; ``wsi2dmamba models --presets`` lists them all.
"""

from . import attention_mil  # noqa: F401  (registers meanpool, abmil)
from .base import AttentionPool, MILConfig, MILModel, MILOutput, survival_risk
from .batch import GridBatch
from .checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
from .registry import create, create_from_config, list_models, model_info, register_model

for _module in ("mamba2d_mil", "mamba_mil", "clam", "transmil", "cnn2d"):
    try:
        __import__(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise

__all__ = [
    "AttentionPool",
    "GridBatch",
    "MILConfig",
    "MILModel",
    "MILOutput",
    "create",
    "create_from_config",
    "list_models",
    "load_checkpoint",
    "model_info",
    "read_checkpoint_config",
    "register_model",
    "save_checkpoint",
    "survival_risk",
]
