"""The 2D selective scans of 2DMamba and Mamba2D: PyTorch references and CuPy CUDA kernels.

``selective_scan_2d`` and ``mamba2d_scan`` take (batch, E, H, W) activations and (batch, N, H, W)
input-dependent B and C; ``backend="auto"`` runs the kernels on CUDA tensors when CuPy is installed,
laid out by a ``ScanTuning`` (the defaults unless one is passed as ``tuning=``).
"""

from wsi2dmamba.ops.api import BACKENDS, cupy_available, mamba2d_scan, selective_scan_2d
from wsi2dmamba.ops.cupy_scans import ScanTuning
from wsi2dmamba.ops.reference import mamba2d_scan_reference, selective_scan_2d_reference

__all__ = [
    "BACKENDS",
    "ScanTuning",
    "cupy_available",
    "mamba2d_scan",
    "mamba2d_scan_reference",
    "selective_scan_2d",
    "selective_scan_2d_reference",
]
