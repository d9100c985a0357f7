"""Stored JPEG tiles decoded by nvJPEG on a GPU against the OpenSlide path: pixels within JPEG decoder
differences on YCbCr-coded tiles, and features of the same encoder with cosine ≥ 0.999. nvJPEG reads
Aperio's RGB-coded tiles as YCbCr (measured on an H100: mean |Δ| 47.8 grey levels), so those slides must be
caught by the first-tile check and read by OpenSlide, never decoded wrongly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi2dmamba.features import ExtractConfig, extract_features, load_encoder
from wsi2dmamba.features.loader import TileBatches, TileReadPlan
from wsi2dmamba.features.tile_decode import JpegTileBatches, choose_decode
from wsi2dmamba.grid import TileGrid
from wsi2dmamba.slide import open_slide

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _lattice(slide, step: int, side: int, start: int = 0) -> np.ndarray:
    w, h = slide.dimensions
    xs, ys = np.arange(start, w - side // 2, step), np.arange(start, h - side // 2, step)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)


@pytest.fixture(scope="module")
def demo_tiff(tmp_path_factory):
    """A demo slide: a pyramidal TIFF of YCbCr JPEG tiles (256 px) with 2× levels, made of the shipped tissue."""
    from wsi2dmamba.demo.mosaic import render_cells, write_pyramidal_tiff

    cells = np.array([[1, 2, 3, 4, 1, 2], [3, 1, 1, 2, 4, 3], [4, 4, 3, 1, 0, 1], [2, 1, 3, 3, 1, 4]])
    image = render_cells(cells, np.random.default_rng(1))
    return write_pyramidal_tiff(tmp_path_factory.mktemp("demo") / "demo.tif", image)


def test_aperio_rgb_tiles_fall_back_to_openslide_with_the_reason(cmu_slide):
    with open_slide(cmu_slide) as s:
        level, why = choose_decode("auto", s, 0, "cuda")
    assert level is None and "differently" in why


@pytest.mark.parametrize("side,tile_px,start", [(256, 256, 0), (256, 256, 100), (448, 224, 37)])
def test_nvjpeg_tiles_match_openslide(demo_tiff, side, tile_px, start):
    with open_slide(demo_tiff) as s:
        level, why = choose_decode("auto", s, 0, "cuda")
        assert level is not None, why
        plan = TileReadPlan(str(s.path), s.mpp, _lattice(s, side, side, start), 0, 1.0, side, tile_px)
    ref, _ = TileBatches(plan, len(plan.coords)).read_batch(np.arange(len(plan.coords)))
    got = torch.cat([im for im, _, _ in JpegTileBatches(plan, level, 16, "cuda")]).cpu().numpy()
    diff = np.abs(got.astype(int) - ref)
    print(f"side {side} → {tile_px}, start {start}: {len(ref)} tiles, max |Δ| {diff.max()}, mean |Δ| {diff.mean():.3f}")
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 16


def test_features_of_the_two_decode_paths_agree(demo_tiff):
    torch.manual_seed(0)
    enc = load_encoder("resnet50-trunc", device="cuda", pretrained=False)
    with open_slide(demo_tiff) as s:
        coords = _lattice(s, 224, 224)
        w, h = s.dimensions
        index = np.stack([coords[:, 1] // 224, coords[:, 0] // 224], axis=1)
        tiles = TileGrid(slide_id="demo", coords=coords, index=index, shape=tuple(index.max(axis=0) + 1),
                         tissue_fraction=np.ones(len(coords)), origin_level0=(0.0, 0.0), stride_level0=224.0,
                         tile_size_level0=224.0, tile_px=224, stride_px=224, mpp_requested=s.mpp,
                         mpp_effective=s.mpp, mpp_level0=s.mpp, read_level=0, read_downsample=1.0,
                         level0_size=(w, h))
        grids = {d: extract_features(tiles, s, enc, ExtractConfig(encoder=enc.name, decode=d, workers=0, batch_size=32),
                                     progress=False) for d in ("jpeg", "openslide")}
    a, b = grids["jpeg"].features, grids["openslide"].features
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    print(f"{len(a)} tiles: cosine min {cos.min():.5f}, mean {cos.mean():.5f}")
    assert grids["jpeg"].extra_attrs["decode"] == "jpeg-tiles:cuda"
    assert cos.min() >= 0.999


def _queued_sums_after_decode(decode, streams, shape, rounds: int = 12) -> int:
    """Rounds in which kernels queued before ``decode`` read wrong values from blocks freed before it."""
    numel = 3 * shape[0] * shape[1]  # a decoded tile's bytes: the decoder's outputs fit these blocks
    wrong = 0
    for _ in range(rounds):
        bufs = [torch.full((numel,), k + 1, dtype=torch.uint8, device="cuda") for k in range(len(streams))]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # keeps the reductions below queued while the decoder runs
        sums = [b.sum(dtype=torch.int64) for b in bufs]
        del bufs  # freed while their reductions are still queued
        decode()
        torch.cuda.synchronize()
        wrong += int(any(int(s) != (k + 1) * numel for k, s in enumerate(sums)))
    return wrong


def test_decoding_never_writes_into_memory_that_queued_work_still_reads(demo_tiff):
    from wsi2dmamba.features.tile_decode import _as_tensor, _decode, decode_streams

    with open_slide(demo_tiff) as s:
        level, _ = choose_decode("jpeg", s, 0, "cuda")
    with open(level.path, "rb") as fh:
        streams = [_as_tensor(b) for b in level.jpeg_streams(range(min(8, level.n_tiles)), fh)]
    shape = (level.tile_height, level.tile_width)
    own = torch.cuda.Stream()
    plain = _queued_sums_after_decode(lambda: _decode(streams, "cuda"), streams, shape)
    guarded = _queued_sums_after_decode(lambda: decode_streams(streams, "cuda", shape, own), streams, shape)
    drained = _queued_sums_after_decode(lambda: decode_streams(streams, "cuda", shape), streams, shape)
    print(f"rounds with corrupted queued reads: decode_jpeg as it is {plain}/12, on its own stream {guarded}/12, "
          f"after draining {drained}/12")
    assert guarded == 0 and drained == 0
