"""The encoder registry: real packaged weights, weight loading from files and caches, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi2dmamba.errors import ConfigError, WeightsError
from wsi2dmamba.features import get_encoder, list_encoders
from wsi2dmamba.features.encoders import efficientnet_lite0, rename_efficientnet_lite_keys
from wsi2dmamba.features.weights import load_state_dict

# ImageNet-1k class indices.
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Point the HF and torch hub caches at empty folders, so no test depends on this machine's caches."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _photo(name: str) -> torch.Tensor:
    skdata = pytest.importorskip("skimage.data")
    return torch.from_numpy(np.ascontiguousarray(getattr(skdata, name)()))[None]  # (1, H, W, 3) uint8


def test_registry_lists_the_encoders():
    names = list_encoders()
    for name in ("efficientnet-lite0", "resnet50-trunc", "uni", "uni2-h", "virchow2", "h-optimus-0", "gigapath"):
        assert name in names
    dims = {n: get_encoder(n).feature_dim for n in names}
    assert dims["efficientnet-lite0"] == 1280 and dims["resnet50-trunc"] == 1024
    assert dims["uni"] == 1024 and dims["virchow2"] == 2560 and dims["uni2-h"] == 1536


def test_unknown_encoder_names_the_known_ones():
    with pytest.raises(ConfigError, match="Unknown encoder 'resnet51'.*efficientnet-lite0"):
        get_encoder("resnet51")
    with pytest.raises(ConfigError, match="Unknown timm model 'no_such_net'"):
        get_encoder("timm:no_such_net")
    with pytest.raises(ConfigError, match="TITAN"):
        get_encoder("conch-v1.5")


def test_packaged_efficientnet_weights_are_real_imagenet_weights():
    spec = get_encoder("efficientnet-lite0")
    path = spec.weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    classifier = efficientnet_lite0(path, classifier=True)
    with torch.inference_mode():
        cat = classifier(spec.preprocess(_photo("chelsea"))).softmax(-1)[0]
        coffee = classifier(spec.preprocess(_photo("coffee"))).softmax(-1)[0]
    assert int(cat.argmax()) in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert float(cat[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum()) > 0.8
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.9

    # The feature model of the registry is that network without its head: its 1280-d output is the
    # classifier's pooled pre-logits.
    features = spec.build()
    x = spec.preprocess(_photo("chelsea"))
    with torch.inference_mode():
        f = features(x)
        pre = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    assert f.shape == (1, 1280)
    torch.testing.assert_close(f, pre)


def test_efficientnet_keys_rename_onto_timm_names():
    import timm

    sd = load_state_dict(get_encoder("efficientnet-lite0").weights_path(), "efficientnet-lite0")
    assert len(sd) == 296 and any(k.startswith("_blocks.15.") for k in sd)
    renamed = rename_efficientnet_lite_keys(sd)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert set(renamed) == set(target)
    assert all(tuple(renamed[k].shape) == tuple(target[k].shape) for k in target)


def test_preprocess_resizes_crops_and_normalises():
    spec = get_encoder("efficientnet-lite0")
    grey = torch.full((2, 300, 400, 3), 127, dtype=torch.uint8)
    x = spec.preprocess(grey)
    assert x.shape == (2, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-5, rtol=0)  # (127 - 127) / 128
    white = get_encoder("resnet50-trunc").preprocess(torch.full((1, 256, 256, 3), 255, dtype=torch.uint8))
    expect = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(white[0, :, 100, 100], expect)


def test_resnet50_trunc_is_clams_1024d_network_and_loads_a_given_file(tmp_path):
    import timm

    spec = get_encoder("resnet50-trunc")
    assert spec.input_size == 224
    # An ImageNet-layout ResNet-50 checkpoint (here random, saved by us) loads: layer4 and fc are dropped.
    full = timm.create_model("resnet50", pretrained=False).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)
    model = get_encoder("resnet50-trunc", weights=path).build()
    torch.testing.assert_close(model.layer3[5].conv3.weight, full.layer3[5].conv3.weight)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = model(x)
        # Same as running the full network up to layer3 and pooling.
        t = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        ref = full.layer3(full.layer2(full.layer1(t))).mean((2, 3))
    assert out.shape == (2, 1024)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_missing_weight_file_says_which_where_and_how(tmp_path):
    with pytest.raises(WeightsError) as err:
        get_encoder("resnet50-trunc").build()
    msg = str(err.value)
    assert "resnet50-trunc" in msg
    assert str(tmp_path / "hf" / "models--timm--resnet50.tv_in1k") in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in msg
    assert "huggingface-cli download timm/resnet50.tv_in1k" in msg and "--weights" in msg
    with pytest.raises(WeightsError, match="gated|accept its terms"):
        get_encoder("uni").weights_path()
    with pytest.raises(WeightsError, match="not found: .*nowhere.bin"):
        get_encoder("uni", weights=tmp_path / "nowhere.bin")


def test_weights_found_in_the_hugging_face_cache(tmp_path):
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("resnet50", pretrained=False)
    snap = tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(snap / "model.safetensors"))
    spec = get_encoder("resnet50-trunc")
    assert spec.weights_path() == snap / "model.safetensors"
    torch.testing.assert_close(spec.build().conv1.weight, full.conv1.weight)


def test_a_weight_file_of_another_network_is_refused(tmp_path):
    lite = get_encoder("efficientnet-lite0").weights_path()
    with pytest.raises(WeightsError, match="does not fit encoder 'resnet50-trunc'.*missing key"):
        get_encoder("resnet50-trunc", weights=lite).build()
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(WeightsError, match="Cannot read weight file"):
        get_encoder("resnet50-trunc", weights=junk).build()


def test_any_timm_model_with_its_own_preprocessing(tmp_path):
    import timm

    spec = get_encoder("timm:resnet18")
    assert spec.feature_dim == 512
    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    assert spec.preprocess.crop == 224 and spec.preprocess.resize == int(224 / cfg["crop_pct"])
    full = timm.create_model("resnet18", pretrained=False)  # with its 1000-class head
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    model = get_encoder("timm:resnet18", weights=path).build()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 512)
    with pytest.raises(WeightsError, match="timm/resnet18"):
        spec.weights_path()
