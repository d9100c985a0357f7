"""TransMIL (Shao et al., NeurIPS 2021): Nyström self-attention over the tissue cells with a class token.

Written from the paper. Its position encoding (PPEG: depthwise 7×7, 5×5 and 3×3 convs plus identity) runs
here on the slide's real grid, not on the sequence folded into a square as in the original, since the
grid is known. Each slide is processed on its own (Nyström landmarks depend on the sequence), so batching
never changes a slide's output.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import MILConfig, MILModel, MILOutput, embed_cells, pooling_mask
from .batch import GridBatch
from .registry import register_model


def _pinv_newton(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of (…, m, m) row-stochastic matrices by the iteration of Razavi et al."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    z = a.transpose(-1, -2) / (a.abs().sum(-1).amax(-1) * a.abs().sum(-2).amax(-1))[..., None, None]
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` segment-mean landmarks (Xiong et al. 2021),
    plus a depthwise conv over the values along the sequence (the residual of the Nyströmformer)."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iters: int = 6, dropout: float = 0.1,
                 conv_kernel: int = 33) -> None:
        super().__init__()
        self.heads, self.landmarks, self.pinv_iters = heads, landmarks, pinv_iters
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.value_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                                    bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, n, dim) → (1, n, dim)."""
        n, m = x.shape[1], self.landmarks
        pad = (m - n % m) % m
        x = F.pad(x, (0, 0, pad, 0))  # zeros in front so the length divides into m segments
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        q = q * self.head_dim**-0.5
        seg = x.shape[1] // m
        q_l = q.unflatten(2, (m, seg)).sum(3) / seg
        k_l = k.unflatten(2, (m, seg)).sum(3) / seg
        kernel1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        kernel2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
        kernel3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        out = (kernel1 @ _pinv_newton(kernel2, self.pinv_iters)) @ (kernel3 @ v)
        out = out + self.value_conv(v)
        out = out.transpose(1, 2).flatten(2)
        return self.out(out)[:, pad:]


class PPEG(nn.Module):
    """Position encoding by depthwise 7×7 + 5×5 + 3×3 convs plus identity on the cells' 2D grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(1, dim, H, W) → (1, dim, H, W)."""
        return grid + sum(conv(grid) for conv in self.convs)


class TransMILConfig(MILConfig):
    """TransMIL options.

    Attributes:
        hidden: token width.
        heads: attention heads.
        landmarks: Nyström landmarks (TransMIL: hidden / 2).
        pinv_iters: iterations of the pseudo-inverse.
        attn_dropout: dropout after each attention output.
    """

    hidden: int = Field(default=512, gt=0)
    heads: int = Field(default=8, gt=0)
    landmarks: int = Field(default=256, gt=0)
    pinv_iters: int = Field(default=6, gt=0)
    attn_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


@register_model("transmil", "TransMIL: two Nystrom self-attention layers over tissue cells, PPEG position "
                "encoding on the grid, class token.")
class TransMIL(MILModel):
    config_class = TransMILConfig

    def __init__(self, config: TransMILConfig) -> None:
        super().__init__(config)
        d = config.hidden
        if d % config.heads:
            raise ValueError("hidden must be a multiple of heads")
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, d), nn.ReLU(), nn.Dropout(config.dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.attns = nn.ModuleList(NystromAttention(d, config.heads, config.landmarks, config.pinv_iters,
                                                    config.attn_dropout) for _ in range(2))
        self.ppeg = PPEG(d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.n_out)

    def _slide(self, cells: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
        """One slide: (H, W, hidden) embedded cells and (H, W) tissue → (hidden,) class-token vector."""
        tokens = cells[tissue].unsqueeze(0)  # (1, n, d) in raster order
        x = torch.cat([self.cls_token.to(tokens.dtype), tokens], dim=1)
        x = x + self.attns[0](self.norms[0](x))
        grid = tokens.new_zeros(1, *tissue.shape, x.shape[-1])
        grid[0][tissue] = x[0, 1:]
        grid = self.ppeg(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = torch.cat([x[:, :1], grid[0][tissue].unsqueeze(0)], dim=1)
        x = x + self.attns[1](self.norms[1](x))
        return self.norm(x[0, 0])

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        pooling_mask(batch)
        # the cells are embedded on the dense grid, in place: gathering the tissue cells' raw features
        # first would copy the widest tensor of the step
        embedded = embed_cells(self.embed, batch.features)
        vectors = []
        for b in range(batch.batch_size):
            h, w = (int(v) for v in batch.sizes[b])
            vectors.append(self._slide(embedded[b, :h, :w], batch.tissue[b, :h, :w]))
        return MILOutput(self.head(torch.stack(vectors)))
