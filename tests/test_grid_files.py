"""Round trip and validation of the grid file format."""

import h5py
import numpy as np
import pytest

from wsi2dmamba.errors import GridFileError
from wsi2dmamba.grid import FeatureGrid, TileGrid, read_feature_grid, read_tile_grid, write_feature_grid, write_tile_grid


def _tiles(native=True):
    index = np.array([[0, 1], [0, 2], [1, 0], [2, 2]], np.int32)
    stride = 512.0 if native else 513.1
    coords = np.round(np.array([100.0, 40.0]) + index[:, ::-1] * stride).astype(np.int64)
    return TileGrid(slide_id="s1", coords=coords, index=index, shape=(3, 3),
                    tissue_fraction=np.array([1.0, 0.5, 0.3, 0.9]), origin_level0=(100.0, 40.0),
                    stride_level0=stride, tile_size_level0=stride, tile_px=256, stride_px=256,
                    mpp_requested=0.5, mpp_effective=0.5, mpp_level0=0.25 if native else 0.2436,
                    read_level=1 if native else 0, read_downsample=2.0 if native else 1.0,
                    level0_size=(2000, 1500), slide_path="/x/s1.svs", params_hash="abc")


def test_tile_grid_round_trip_and_clam_trident_attrs(tmp_path):
    g = _tiles()
    write_tile_grid(tmp_path / "s1.h5", g)
    back = read_tile_grid(tmp_path / "s1.h5")
    assert np.array_equal(back.coords, g.coords) and np.array_equal(back.index, g.index)
    assert back.mask.sum() == 4 and back.mask[0, 0] == 0 and back.mask[2, 2] == 1
    with h5py.File(tmp_path / "s1.h5") as f:
        a = f["coords"].attrs
        assert f["coords"].dtype == np.int64
        assert a["patch_size"] == 256 and a["patch_level"] == 1 and a["patch_size_level0"] == 512
        assert a["target_magnification"] == pytest.approx(20.0)
        assert a["level0_magnification"] == pytest.approx(40.0)


def test_clam_level_attrs_only_when_native(tmp_path):
    write_tile_grid(tmp_path / "s1.h5", _tiles(native=False))
    with h5py.File(tmp_path / "s1.h5") as f:
        assert "patch_level" not in f["coords"].attrs


def test_feature_grid_round_trip_and_dense(tmp_path):
    feats = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    fg = FeatureGrid.from_tiles(_tiles(), feats, encoder="enc")
    write_feature_grid(tmp_path / "f.h5", fg)
    back = read_feature_grid(tmp_path / "f.h5")
    assert np.array_equal(back.features, feats) and back.encoder == "enc"
    dense, mask = back.dense()
    assert dense.shape == (3, 3, 8) and np.array_equal(dense[2, 2], feats[3]) and not dense[0, 0].any()
    assert mask.sum() == 4


def test_collision_and_nan_are_refused(tmp_path):
    g = _tiles()
    bad = TileGrid(**{**g.__dict__, "index": np.array([[0, 1], [0, 1], [1, 0], [2, 2]])})
    with pytest.raises(GridFileError, match="share a cell"):
        write_tile_grid(tmp_path / "bad.h5", bad)
    assert not (tmp_path / "bad.h5").exists()
    feats = np.ones((4, 3), np.float32)
    feats[1, 2] = np.nan
    with pytest.raises(GridFileError, match="NaN"):
        write_feature_grid(tmp_path / "nan.h5", FeatureGrid.from_tiles(g, feats, encoder="e"))
    assert list(tmp_path.iterdir()) == []


def test_not_a_grid_file(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"not hdf5 at all")
    with pytest.raises(GridFileError, match="damaged or not HDF5"):
        read_tile_grid(p)
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        f["features"] = np.zeros((2, 4), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(GridFileError, match="import-features"):
        read_feature_grid(tmp_path / "clam.h5")
