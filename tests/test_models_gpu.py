"""The SSM models give the same outputs and gradients with the CuPy scan kernels as with the PyTorch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi2dmamba.models import GridBatch, create

pytestmark = pytest.mark.gpu

CASES = {
    "2dmambamil": {"d_model": 32},
    "2dmambamil-paper": {"preset": "paper", "d_model": 32},
    "2dmambamil-corners": {"d_model": 32, "n_layers": 2, "corners": ["tl", "br"]},
    "m2dmil": {"d_model": 32, "n_layers": 2},
    "mambamil": {"d_model": 32, "bidirectional": True},
    "2dmambamil:raster1d": {"d_model": 32},
    "2dmambamil:noconv": {"d_model": 32, "corners": ["tl", "br"]},
    "m2dmil:noconv": {"d_model": 32},
}


@pytest.fixture(scope="module")
def batch():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wsi2dmamba import ops

    if not ops.cupy_available():
        pytest.skip("needs CuPy")
    rng = np.random.default_rng(0)
    items = [(rng.standard_normal((h, w, 64)).astype(np.float32), rng.random((h, w)) < 0.7)
             for h, w in [(23, 37), (40, 9), (1, 17)]]
    for _, m in items:
        m[0, 0] = True
    return GridBatch.from_arrays(items).to("cuda")


@pytest.mark.parametrize("key", list(CASES))
def test_cupy_backend_matches_the_reference(key, batch):
    name = key.split("-")[0]
    results = {}
    for backend in ("torch", "cupy"):
        torch.manual_seed(0)
        model = create(name, in_dim=64, n_classes=3, scan_backend=backend, **CASES[key]).cuda().eval()
        out = model(batch)
        out.logits.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results[backend] = (out.logits.detach(), out.attention.detach(), grads)
    ref, got = results["torch"], results["cupy"]
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("key", ["2dmambamil-corners", "m2dmil"])
def test_recomputed_channel_groups_match_the_plain_blocks_on_the_kernels(key, batch):
    name = key.split("-")[0]
    results = []
    for extra in ({"checkpoint_blocks": "off"}, {"checkpoint_blocks": "on", "channel_groups": 3}):
        torch.manual_seed(0)
        model = create(name, in_dim=64, n_classes=3, dropout=0.0, **CASES[key], **extra).cuda().train()
        out = model(batch)
        out.logits.square().sum().backward()
        results.append((out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


def test_recomputed_channel_groups_lower_the_peak_memory(batch):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((160, 160, 64)).astype(np.float32)
    big = GridBatch.from_arrays([(feats, np.ones((160, 160), dtype=bool))]).to("cuda")
    peaks = {}
    for mode, groups in (("off", None), ("on", 4)):
        torch.manual_seed(0)
        model = create("2dmambamil", in_dim=64, n_classes=2, checkpoint_blocks=mode, channel_groups=groups)
        model = model.cuda().train()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(big).logits.square().sum().backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del model
    assert peaks["on"] < 0.6 * peaks["off"], peaks


def test_cnn2d_on_the_gpu_matches_the_cpu(batch):
    torch.manual_seed(0)
    model = create("cnn2d", in_dim=64, n_classes=3, d_model=32).eval()
    cpu_batch = batch.to("cpu")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions, as on the CPU
    try:
        with torch.no_grad():
            ref = model(cpu_batch)
            got = model.cuda()(batch)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(got.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.attention.cpu(), ref.attention, atol=1e-5, rtol=1e-4)
