"""Import of CLAM and TRIDENT feature files (written here the way those tools write them) into grid files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_extract import ENCODER, encoder, extracted  # noqa: F401  (module fixtures, reused)

from wsi2dmamba.errors import ConfigError, GridFileError
from wsi2dmamba.features import feature_path
from wsi2dmamba.features.importers import import_feature_file, import_features, infer_stride, place_on_lattice
from wsi2dmamba.grid import read_feature_grid


@pytest.fixture
def ours(extracted):  # noqa: F811
    return read_feature_grid(feature_path(extracted[0], ENCODER, "cmu"))


def _shuffled(n: int) -> np.ndarray:
    return np.random.default_rng(0).permutation(n)  # the tools' row order is not ours


def write_clam(folder, grid, order):
    """CLAM's ``extract_features_fp.py`` output (features float32 + coords int32, no attributes) and its
    ``create_patches_fp.py`` patch file (coords int64 with the patch attributes)."""
    (folder / "h5_files").mkdir(parents=True)
    (folder / "patches").mkdir()
    with h5py.File(folder / "h5_files" / "cmu.h5", "w") as f:
        d = grid.feature_dim
        f.create_dataset("features", data=grid.features[order].astype(np.float32), maxshape=(None, d),
                         chunks=(32, d), dtype=np.float32)
        f.create_dataset("coords", data=grid.coords[order].astype(np.int32), maxshape=(None, 2),
                         chunks=(32, 2), dtype=np.int32)
    size = int(round(grid.tile_size_level0))
    with h5py.File(folder / "patches" / "cmu.h5", "w") as f:
        c = f.create_dataset("coords", data=grid.coords[order], maxshape=(None, 2), chunks=(1, 2), dtype=np.int64)
        c.attrs["patch_size"] = size
        c.attrs["patch_level"] = 0
        c.attrs["downsample"] = np.array([1.0, 1.0])
        c.attrs["downsampled_level_dim"] = np.array(grid.level0_size, dtype=np.int64)
        c.attrs["level_dim"] = np.array(grid.level0_size, dtype=np.int64)
        c.attrs["name"] = "cmu"
        c.attrs["save_path"] = str(folder / "patches")


def write_trident(folder, grid, order):
    """TRIDENT's ``features_<encoder>/<name>.h5``: features (chunks of one row) + coords with the coords
    file's attributes (magnifications bucketed to integers, as TRIDENT does)."""
    (folder / "features_conch_v15").mkdir(parents=True)
    with h5py.File(folder / "features_conch_v15" / "cmu.h5", "w") as f:
        fd = f.create_dataset("features", data=grid.features[order], chunks=(1, grid.feature_dim))
        fd.attrs["name"] = "cmu"
        fd.attrs["savetodir"] = str(folder)
        fd.attrs["encoder"] = "conch_v15"
        c = f.create_dataset("coords", data=grid.coords[order], dtype=np.int64)
        level0_mag, target_mag = 20, 10.0 / grid.mpp_requested
        c.attrs["patch_size"] = grid.tile_px
        c.attrs["patch_size_level0"] = int(grid.tile_px * level0_mag // target_mag)
        c.attrs["level0_magnification"] = level0_mag
        c.attrs["target_magnification"] = target_mag
        c.attrs["overlap"] = 0
        c.attrs["name"] = "cmu"
        c.attrs["savetodir"] = "None"
        c.attrs["level0_width"] = grid.level0_size[0]
        c.attrs["level0_height"] = grid.level0_size[1]


def assert_same_grid(imported, ours):
    """Same tiles in the same cells with the same features. CLAM and TRIDENT files do not record the
    tissue around the tiles, so an imported grid is cropped to the tiles' bounding box, while ours spans
    the tissue's; the imported grid must equal ours cropped the same way."""
    lo = ours.index.min(axis=0)
    hi = ours.index.max(axis=0) + 1
    assert imported.shape == tuple(int(v) for v in hi - lo)
    np.testing.assert_array_equal(imported.index, ours.index - lo)
    np.testing.assert_array_equal(imported.coords, ours.coords)
    np.testing.assert_array_equal(imported.features, ours.features)
    dense_i, mask_i = imported.dense()
    dense_o, mask_o = ours.dense()
    np.testing.assert_array_equal(mask_i, mask_o[lo[0]:hi[0], lo[1]:hi[1]])
    np.testing.assert_array_equal(dense_i, dense_o[lo[0]:hi[0], lo[1]:hi[1]])


def test_clam_files_import_to_the_grid_we_extract(tmp_path, ours):
    write_clam(tmp_path / "clam", ours, _shuffled(ours.n_tiles))
    run = tmp_path / "run"
    summary = import_features(tmp_path / "clam" / "h5_files", run, "clam", mpp=ours.mpp_level0,
                              coords_dir=tmp_path / "clam" / "patches", encoder="effnet-clam")
    assert not summary.failed and list(summary.written) == ["cmu"]
    imported = read_feature_grid(feature_path(run, "effnet-clam", "cmu"))
    assert_same_grid(imported, ours)
    assert imported.stride_level0 == pytest.approx(ours.stride_level0, abs=1.0)
    assert imported.mpp_level0 == ours.mpp_level0
    with h5py.File(feature_path(run, "effnet-clam", "cmu"), "r") as f:
        assert f.attrs["imported_format"] == "clam" and f.attrs["import_collisions"] == 0
        assert "step = patch size" in f.attrs["import_assumptions"]


def test_clam_features_alone_use_the_coordinate_spacing(tmp_path, ours):
    write_clam(tmp_path / "clam", ours, _shuffled(ours.n_tiles))
    grid = import_feature_file(tmp_path / "clam" / "h5_files" / "cmu.h5", "clam", mpp=ours.mpp_level0)
    # No attributes: the stride comes from the spacing of the corners (a fractional stride, rounded).
    assert grid.stride_level0 == pytest.approx(ours.stride_level0, abs=0.5)
    np.testing.assert_array_equal(grid.index, ours.index - ours.index.min(axis=0))
    with pytest.raises(ConfigError, match="--slide-mpp"):
        import_feature_file(tmp_path / "clam" / "h5_files" / "cmu.h5", "clam")


def test_trident_files_import_to_the_grid_we_extract(tmp_path, ours):
    write_trident(tmp_path / "trident", ours, _shuffled(ours.n_tiles))
    run = tmp_path / "run"
    summary = import_features(tmp_path / "trident" / "features_conch_v15", run, "trident")
    assert not summary.failed and summary.encoder == "conch_v15"
    imported = read_feature_grid(feature_path(run, "conch_v15", "cmu"))
    assert_same_grid(imported, ours)
    assert imported.mpp_level0 == pytest.approx(0.5)  # TRIDENT's bucketed 20× (the slide is 0.499)
    assert imported.tile_px == ours.tile_px


def test_tiles_that_would_share_a_cell_are_counted_and_refused(tmp_path, ours):
    # Two CLAM regions whose grids do not line up: the second one is shifted by 40 % of a stride.
    order = np.arange(ours.n_tiles)
    write_clam(tmp_path / "clam", ours, order)
    path = tmp_path / "clam" / "h5_files" / "cmu.h5"
    stride = int(round(ours.stride_level0))
    with h5py.File(path, "r+") as f:
        coords = f["coords"][:]
        extra = coords[:3] + int(0.4 * stride)
        del f["coords"]
        f.create_dataset("coords", data=np.concatenate([coords, extra]).astype(np.int32))
        feats = f["features"][:]
        del f["features"]
        f.create_dataset("features", data=np.concatenate([feats, feats[:3]]))
    coords_dir = tmp_path / "clam" / "patches"
    with pytest.raises(GridFileError, match="3 tile\\(s\\) would share a grid cell"):
        import_feature_file(path, "clam", mpp=0.5, coords_file=coords_dir / "cmu.h5")
    summary = import_features(path, tmp_path / "run", "clam", mpp=0.5, coords_dir=coords_dir)
    assert "3 tile(s) would share" in summary.failed["cmu"] and not summary.written
    kept = import_feature_file(path, "clam", mpp=0.5, coords_file=coords_dir / "cmu.h5", on_collision="keep-first")
    assert kept.n_tiles == ours.n_tiles
    np.testing.assert_array_equal(kept.features, ours.features)


def test_lattice_helpers():
    coords = np.array([[100, 50], [612, 50], [356, 306], [100, 562]])
    assert infer_stride(coords) == 256.0
    rounded = np.rint(np.array([[0, 0], [1, 0], [2, 0], [3, 1], [7, 2]]) * 448.9).astype(np.int64)
    assert infer_stride(rounded) == pytest.approx(448.9, abs=0.05)
    lat = place_on_lattice(coords, 256.0)
    assert lat.shape == (3, 3) and lat.origin == (100.0, 50.0) and lat.collisions == 0
    np.testing.assert_array_equal(lat.index, [[0, 0], [0, 2], [1, 1], [2, 0]])
    with pytest.raises(GridFileError, match="Cannot infer the tile stride"):
        infer_stride(np.array([[5, 5]]))


def test_not_a_feature_file(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(GridFileError, match="no 'features' and 'coords'"):
        import_feature_file(p, "trident")
    with pytest.raises(ConfigError, match="holds no .h5"):
        import_features(tmp_path / "empty", tmp_path / "run", "clam") if (tmp_path / "empty").mkdir() is None else None
