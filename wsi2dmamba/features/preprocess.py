"""Encoder input preprocessing, run on the device that runs the encoder.

Tiles travel from the reader processes as uint8 (B, H, W, 3); resizing, cropping and normalising happen
on the encoder's device in one pass, so the CPU workers only decode. Resizing follows torchvision's
``Resize(int)`` (short side to ``resize``, antialiased) and ``CenterCrop``.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an encoder wants its input.

    Attributes:
        resize: the short side is resized to this many pixels (no resize when it already is).
        crop: side of the centre crop fed to the encoder, in pixels.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (antialiased when shrinking).
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel standard deviation on the [0, 1] scale.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images):
        """uint8 (B, H, W, 3) tensor → float32 (B, 3, crop, crop) in channels-last memory layout."""
        import torch
        import torch.nn.functional as F

        # A (B, H, W, 3) tensor viewed as (B, 3, H, W) already has channels-last strides: no copy.
        x = images.permute(0, 3, 1, 2).float()
        h, w = int(x.shape[-2]), int(x.shape[-1])
        short, long = min(h, w), max(h, w)
        if short != self.resize:
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if h <= w else (new_long, self.resize)
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                              antialias=self.resize < short)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 255.0)  # bicubic overshoots; PIL and torchvision clamp to uint8 range
            h, w = size
        if (h, w) != (self.crop, self.crop):
            top = int(round((h - self.crop) / 2.0))
            left = int(round((w - self.crop) / 2.0))
            x = x[:, :, top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)
