"""Bad input: property-based tests (hypothesis) of manifest parsing, grid-file reading, pipeline files and
CLI options, plus the odd slides and grids real cohorts contain.

The property everywhere: a malformed input gives one :class:`~wsi2dmamba.errors.WsiError` whose message
names the file (and the row or key), never an unhandled exception from deep in a library.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import GridFileError, ManifestError, WsiError
from wsi2dmamba.grid import FeatureGrid, TileGrid, read_feature_grid, read_tile_grid, write_feature_grid

pytest_plugins = ["conftest_reliability"]

FAST = settings(max_examples=int(os.environ.get("WSI_HYPOTHESIS_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------- manifests

COLUMNS = ["slide_id", "path", "patient_id", "label", "time", "event", "mpp", "site", "", " slide_id ", "Path"]
CELLS = st.one_of(
    st.sampled_from(["", " ", "a", "s1", "s1", "1", "0", "-1", "0.0", "nan", "inf", "-inf", "1e309", "true",
                     "False", "2", "x.svs", "../x.svs", "/", ".", "..", "a/b", "a\\b", "~", "~nouser/x",
                     "--help", "; rm -rf /", "$(touch pwned)", "`id`", "\"", "'", ",", "\n", "\r", "é",
                     "\u202e", "\x00", "x" * 300, "NA", "null", "None"]),
    st.text(max_size=12),
)


def _csv_text(header: list[str], rows: list[list[str]], sep: str) -> str:
    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in (sep, '"', "\n", "\r")) else v

    lines = [sep.join(cell(c) for c in header)] + [sep.join(cell(c) for c in r) for r in rows]
    return "\n".join(lines) + "\n"


@st.composite
def manifests(draw) -> bytes:
    """Manifest bytes: mostly CSV-shaped with odd headers and cells, sometimes ragged, sometimes not text."""
    kind = draw(st.sampled_from(["csv", "csv", "csv", "ragged", "binary", "empty"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"slide_id,path\n", b"\xef\xbb\xbfslide_id,path\n", b" \n\n"]))
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6))
    n_rows = draw(st.integers(0, 5))
    width = len(header)
    rows = []
    for _ in range(n_rows):
        w = draw(st.integers(max(0, width - 2), width + 2)) if kind == "ragged" else width
        rows.append([draw(CELLS) for _ in range(w)])
    sep = draw(st.sampled_from([",", ",", ";", "\t"]))
    text = _csv_text(header, rows, sep)
    enc = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    try:
        return text.encode(enc)
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _check_cohort(cohort) -> None:
    ids = [r.slide_id for r in cohort]
    assert len(ids) == len(set(ids)) and all(ids)
    for r in cohort:
        assert "/" not in r.slide_id and "\\" not in r.slide_id and "\0" not in r.slide_id
        assert r.time is None or (math.isfinite(r.time) and r.time > 0)
        assert r.mpp is None or (math.isfinite(r.mpp) and r.mpp > 0)
        assert r.event in (None, 0, 1)
        assert r.path is None or r.path.is_absolute()


@FAST
@given(data=manifests(), require_path=st.booleans())
def test_any_manifest_parses_or_names_the_file(data, require_path, counts):
    counts("inputs")
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "cohort.csv"
        m.write_bytes(data)
        try:
            cohort = load_cohort(m, require_path=require_path, check_files=False)
        except ManifestError as exc:
            assert str(m) in str(exc)
            assert "Traceback" not in str(exc)
        else:
            _check_cohort(cohort)


@st.composite
def one_bad_cell(draw):
    """A well-formed manifest with one bad value at a known row and column."""
    n = draw(st.integers(1, 6))
    bad_row = draw(st.integers(0, n - 1))
    col, value = draw(st.sampled_from([
        ("time", "soon"), ("time", "-3"), ("time", "0"), ("time", "nan"), ("time", "inf"),
        ("event", "2"), ("event", "yes"), ("event", "-1"), ("mpp", "0"), ("mpp", "abc"), ("mpp", "-0.5"),
        ("slide_id", ""), ("slide_id", "a/b"), ("slide_id", ".."), ("slide_id", "dup"), ("path", ""),
    ]))
    return n, bad_row, col, value


@FAST
@given(case=one_bad_cell())
def test_one_bad_value_is_reported_with_its_line_column_and_fix(case, counts):
    counts("inputs")
    n, bad_row, col, value = case
    header = ["slide_id", "path", "time", "event", "mpp"]
    rows = [[f"s{i}", f"s{i}.svs", "10", "1", "0.5"] for i in range(n)]
    rows[bad_row][header.index(col)] = value
    if value == "dup":  # a duplicate of the row before (or after) it
        other = bad_row - 1 if bad_row > 0 else 1
        if other >= n:
            rows.append(["dup", "x.svs", "1", "0", "0.5"])
        else:
            rows[other][0] = "dup"
    with tempfile.TemporaryDirectory() as d:
        m = Path(d) / "m.csv"
        m.write_text(_csv_text(header, rows, ","), encoding="utf-8")
        with pytest.raises(ManifestError) as ei:
            load_cohort(m, check_files=False)
    msg = str(ei.value)
    assert str(m) in msg
    if value != "dup":
        assert f"line {bad_row + 2}" in msg
    if col in ("time", "event", "mpp"):
        assert f"'{col}'" in msg and repr(value) in msg
    assert any(w in msg for w in ("must", "empty", "cannot", "duplicate", "no path", "fill")), msg


def test_missing_slide_files_are_all_listed_with_their_lines(tmp_path, counts):
    rows = ["slide_id,path"] + [f"s{i},missing_{i}.svs" for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    counts("inputs")
    with pytest.raises(ManifestError) as ei:
        load_cohort(tmp_path / "m.csv")
    msg = str(ei.value)
    assert "3 problem(s)" in msg
    for i in range(3):
        assert f"line {i + 2}" in msg and str(tmp_path / f"missing_{i}.svs") in msg


# ------------------------------------------------------------------------------------------- grid files

def _tile_grid(n_rows: int = 3, n_cols: int = 4, keep=None, slide_id: str = "s1") -> TileGrid:
    cells = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    if keep is not None:
        cells = [rc for rc, k in zip(cells, keep) if k]
    index = np.array(cells, np.int32).reshape(-1, 2)
    coords = (np.array([64, 32]) + index[:, ::-1] * 512).astype(np.int64)
    return TileGrid(slide_id=slide_id, coords=coords, index=index, shape=(n_rows, n_cols),
                    tissue_fraction=np.linspace(0.2, 1.0, len(index)), origin_level0=(64.0, 32.0),
                    stride_level0=512.0, tile_size_level0=512.0, tile_px=256, stride_px=256, mpp_requested=0.5,
                    mpp_effective=0.5, mpp_level0=0.25, read_level=1, read_downsample=2.0,
                    level0_size=(4000, 3000), slide_path="/data/s1.svs", params_hash="0123456789abcdef")


def _feature_grid(dim: int = 8, **kw) -> FeatureGrid:
    t = _tile_grid(**kw)
    feats = np.random.default_rng(0).normal(size=(t.n_tiles, dim)).astype(np.float32)
    return FeatureGrid.from_tiles(t, feats, encoder="resnet50_trunc")


DATASETS = ["coords", "tissue_fraction", "grid/index", "grid/mask", "features", "blank"]
ATTRS_ROOT = ["format", "format_version", "slide_id", "tile_px", "stride_px", "mpp_requested", "mpp_effective",
              "mpp_level0", "read_level", "read_downsample", "level0_width", "level0_height", "encoder"]
ATTRS_GRID = ["shape", "origin_level0", "stride_level0", "tile_size_level0"]
ODD_ARRAYS = st.sampled_from([
    np.zeros((0,)), np.zeros((0, 2), np.int64), np.zeros((12, 2), np.int64), np.full((12, 2), -1, np.int64),
    np.full((12, 2), 10**6, np.int64), np.zeros((12, 3)), np.array([b"ab", b"cd"]), np.zeros((12,), np.float64),
    np.full((12,), np.nan, np.float32), np.full((12, 8), np.inf, np.float32), np.zeros((3, 4), np.uint8),
    np.ones((4, 3), np.uint8), np.zeros((12, 8), np.int32), np.zeros((12, 8), np.complex64),
    np.zeros((2, 2, 2)), np.array(3.0), np.ones((12, 2), bool), np.zeros((13, 8), np.float32),
])
ODD_ATTRS = st.sampled_from([
    "", "x", b"bytes", -1, 0, 1, 2**40, -(2**40), 0.0, -0.5, float("nan"), float("inf"), 1e308,
    np.array([1, 2, 3]), np.array([0, 0]), np.array([-1, 5]), np.array([2**31, 2**31]), np.array(["a", "b"]),
    np.zeros(0), True,
])


@st.composite
def grid_mutations(draw):
    """A list of (operation, target, value) applied to a valid feature grid file."""
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["del_ds", "set_ds", "del_attr", "set_attr", "set_grid_attr", "truncate",
                                   "flip_bytes", "ext_link", "soft_link"]))
        if op == "del_ds":
            ops.append((op, draw(st.sampled_from(DATASETS)), None))
        elif op == "set_ds":
            ops.append((op, draw(st.sampled_from(DATASETS)), draw(ODD_ARRAYS)))
        elif op == "del_attr":
            ops.append((op, draw(st.sampled_from(ATTRS_ROOT + ATTRS_GRID)), None))
        elif op == "set_attr":
            ops.append((op, draw(st.sampled_from(ATTRS_ROOT)), draw(ODD_ATTRS)))
        elif op == "set_grid_attr":
            ops.append((op, draw(st.sampled_from(ATTRS_GRID)), draw(ODD_ATTRS)))
        elif op == "truncate":
            ops.append((op, None, draw(st.floats(0.0, 0.99))))
        elif op == "flip_bytes":
            ops.append((op, None, draw(st.lists(st.tuples(st.floats(0, 0.999), st.integers(1, 255)),
                                                min_size=1, max_size=20))))
        else:
            ops.append((op, draw(st.sampled_from(DATASETS)), None))
    return ops


def _apply(path: Path, ops) -> None:
    for op, target, value in ops:
        if op in ("truncate", "flip_bytes"):
            data = bytearray(path.read_bytes())
            if op == "truncate":
                data = data[: int(len(data) * value)]
            else:
                for pos, x in value:
                    if data:
                        data[int(pos * len(data))] ^= x
            path.write_bytes(bytes(data))
            continue
        try:
            with h5py.File(path, "r+") as f:
                if op == "del_ds":
                    if target in f:
                        del f[target]
                elif op == "set_ds":
                    if target in f:
                        del f[target]
                    f.create_dataset(target, data=value)
                elif op == "del_attr":
                    for obj in (f, f["grid"] if "grid" in f else f):
                        if target in obj.attrs:
                            del obj.attrs[target]
                elif op == "set_attr":
                    f.attrs[target] = value
                elif op == "set_grid_attr":
                    f.require_group("grid").attrs[target] = value
                elif op == "ext_link":
                    # A link to another file: reading through it would read data the file does not hold.
                    if target in f:
                        del f[target]
                    f[target] = h5py.ExternalLink("/etc/passwd", "/data")
                elif op == "soft_link":
                    if target in f:
                        del f[target]
                    f[target] = h5py.SoftLink("/coords")
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            return  # the file is already too damaged for h5py to edit further: read it as it is


@FAST
@given(ops=grid_mutations(), features=st.booleans())
def test_any_damaged_grid_file_reads_or_names_the_file(ops, features, counts):
    counts("inputs")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "s1.h5"
        write_feature_grid(p, _feature_grid())
        _apply(p, ops)
        reader = read_feature_grid if features else read_tile_grid
        try:
            g = reader(p)
        except GridFileError as exc:
            assert str(p) in str(exc)
        else:
            g.validate()  # what is returned is always consistent
            assert g.mask.shape == g.shape and int(g.mask.sum()) == g.n_tiles
            if features:
                assert np.isfinite(g.features).all() and g.features.shape == (g.n_tiles, g.feature_dim)


# ------------------------------------------------------------------------------------------- pipeline files

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(v)


def _toml(doc: dict) -> str:
    lines = []
    for table, values in doc.items():
        if not isinstance(values, dict):
            lines.insert(0, f'"{table}" = {_toml_value(values)}')
            continue
        lines.append(f'["{table}"]')
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in values.items()]
    return "\n".join(lines) + "\n"


TOML_VALUES = st.one_of(
    st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([0, -1, 1, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["abmil", "2dmambamil", "no-such-model", "otsu", "fixed", "../x", "", "cohort.csv"]),
    st.lists(st.sampled_from(["abmil", "2dmambamil", "abmil", "x", 3]), max_size=3),
    st.dictionaries(st.sampled_from(["d_model", "x", "dropout"]), st.integers(-3, 3), max_size=2),
)
TABLES = ["cohort", "demo", "run", "segment", "tile", "extract", "train", "evaluate", "bogus"]
KEYS = ["manifest", "slides_dir", "splits_dir", "slides", "seed", "rows", "cols", "out", "workers", "name",
        "train_dir", "seg_mpp", "threshold", "saturation_threshold", "tile_px", "mpp", "overlap", "min_tissue",
        "encoder", "batch_size", "models", "model_options", "epochs", "folds", "task", "lr", "n_boot", "bogus"]


@st.composite
def pipeline_docs(draw):
    """A valid pipeline with random tables, keys and values added, replaced or removed."""
    doc = {"cohort": {"manifest": "cohort.csv"}, "train": {"models": ["abmil"]}}
    for _ in range(draw(st.integers(0, 5))):
        table = draw(st.sampled_from(TABLES))
        op = draw(st.sampled_from(["set", "set", "set", "drop", "scalar"]))
        if op == "drop":
            doc.pop(table, None)
        elif op == "scalar":
            doc[table] = draw(TOML_VALUES)
        else:
            if not isinstance(doc.get(table), dict):
                doc[table] = {}
            doc[table][draw(st.sampled_from(KEYS))] = draw(TOML_VALUES)
    return doc


@FAST
@given(doc=pipeline_docs(), raw=st.one_of(st.none(), st.text(max_size=40), st.binary(max_size=40)))
def test_any_pipeline_file_loads_or_names_the_file(doc, raw, counts):
    _load_pipeline_doc(doc, raw, False, counts)


def test_pipeline_with_a_non_table_cohort_and_slides_dir_override(counts):
    _load_pipeline_doc({"cohort": False, "train": {"models": ["abmil"]}}, None, True, counts)


def _load_pipeline_doc(doc, raw, slides_dir, counts):
    from wsi2dmamba.errors import ConfigError
    from wsi2dmamba.pipeline import load_pipeline

    counts("inputs")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "pipe.toml"
        (Path(d) / "cohort.csv").write_text("slide_id,path,label\na,a.svs,x\n")
        if raw is None:
            p.write_text(_toml(doc), encoding="utf-8")
        elif isinstance(raw, bytes):
            p.write_bytes(raw)
        else:
            p.write_text(_toml(doc) + raw, encoding="utf-8")
        overrides = {"cohort": {"slides_dir": d}} if slides_dir else None
        try:
            config = load_pipeline(p, overrides=overrides)
        except WsiError as exc:
            assert isinstance(exc, ConfigError) and str(p) in str(exc), exc
        else:
            assert config.models and all(isinstance(m, str) for m in config.models)


# ------------------------------------------------------------------------------------------- CLI options

OPTION_VALUES = st.sampled_from(["0", "-1", "1", "2", "0.5", "nan", "inf", "-inf", "1e400", "abc", "", "--help",
                                 "256", "100000000000000000000", "1/2", "3/2", "0/0", "red,blue", "purple",
                                 "otsu", "local", "ray", "warp"])
COMMANDS = {
    "segment": ["--seg-mpp", "--threshold", "--saturation-threshold", "--min-value", "--median-um", "--close-um",
                "--min-tissue-area", "--min-hole-area", "--pen-colors", "--workers", "--shard", "--executor",
                "--slide-mpp"],
    "tile": ["--tile-px", "--mpp", "--overlap", "--min-tissue", "--mpp-tolerance", "--workers", "--shard",
             "--executor"],
    "verify": [],
}


@st.composite
def command_lines(draw):
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    opts = COMMANDS[cmd]
    args = [cmd]
    for _ in range(draw(st.integers(0, 4))) if opts else ():
        args += [draw(st.sampled_from(opts)), draw(OPTION_VALUES)]
    return args


@settings(max_examples=int(os.environ.get("WSI_HYPOTHESIS_EXAMPLES", 150)) // 2, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(args=command_lines())
def test_any_command_line_gives_a_clear_error(args, counts, tmp_path_factory):
    """Bad option values give a usage error or one WsiError, never a traceback (the manifest does not
    exist, so a valid command line stops there with a clear error too)."""
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    counts("inputs")
    d = tmp_path_factory.mktemp("cli")
    if args[0] == "verify":
        args = args + [str(d / "no-run")]
    else:
        args = args + ["--cohort", str(d / "missing.csv"), "--out", str(d / "run"), "-q"]
    result = CliRunner().invoke(app, args)
    exc = result.exception
    assert exc is None or isinstance(exc, (SystemExit, WsiError)), (args, repr(exc))
    if isinstance(exc, WsiError):
        assert str(exc).strip() and "\n  File " not in str(exc)
    elif result.exit_code == 2:  # a usage error from the option parser names the option
        assert "Error" in result.output or "Usage" in result.output
    assert not (d / "run").exists() or not any((d / "run").rglob("*.h5"))


# ------------------------------------------------------------------------------------------- odd slides

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def odd_cohort(tmp_path_factory):
    """A cohort of one good slide and the damaged or odd files real cohorts contain."""
    from PIL import Image

    d = tmp_path_factory.mktemp("odd")
    data = SLIDE.read_bytes()
    (d / "good.svs").symlink_to(SLIDE)
    (d / "truncated.svs").write_bytes(data[: len(data) * 2 // 5])
    (d / "header_only.svs").write_bytes(data[:4096])
    (d / "empty.svs").write_bytes(b"")
    (d / "text.svs").write_text("slide_id,path\nnot,a slide\n")
    Image.new("RGB", (1600, 1200), (243, 243, 241)).save(d / "background.png")  # glass only, no tissue
    rows = ["good,good.svs,", "truncated,truncated.svs,", "header_only,header_only.svs,", "empty,empty.svs,",
            "text,text.svs,", "background,background.png,0.5"]
    (d / "cohort.csv").write_text("slide_id,path,mpp\n" + "\n".join(rows) + "\n")
    return d


def test_damaged_and_empty_slides_fail_clearly_and_the_batch_goes_on(odd_cohort, tmp_path, counts):
    from wsi2dmamba.tissue import segment_cohort

    cohort = load_cohort(odd_cohort / "cohort.csv")
    counts("inputs", len(cohort))
    summary = segment_cohort(cohort, tmp_path / "run", progress=False)
    assert summary.done == ["good"]
    assert set(summary.failed) == {"truncated", "header_only", "empty", "text", "background"}
    for sid, reason in summary.failed.items():
        assert "unexpected error" not in reason, (sid, reason)
        assert str(odd_cohort) in reason, (sid, reason)  # names the slide file
    assert "No tissue" in summary.failed["background"]
    ledger = (tmp_path / "run" / "ledger.csv").read_text()
    assert all(sid in ledger for sid in summary.failed)


@pytest.fixture(scope="module")
def segmented_good(odd_cohort, tmp_path_factory):
    from wsi2dmamba.tissue import segment_cohort

    run = tmp_path_factory.mktemp("odd_run")
    cohort = load_cohort(odd_cohort / "cohort.csv")
    good = type(cohort)(tuple(r for r in cohort if r.slide_id == "good"), cohort.source)
    assert segment_cohort(good, run, progress=False).ok
    return good, run


def test_zero_tile_slide_is_a_clear_failure(segmented_good, counts):
    from wsi2dmamba.tiling import TileConfig, tile_cohort
    from wsi2dmamba.tissue import read_segment_config

    good, run = segmented_good
    counts("inputs")
    config = TileConfig(tile_px=8192, mpp=0.5, segment=read_segment_config(run))  # larger than the slide
    summary = tile_cohort(good, run, config, progress=False)
    assert set(summary.failed) == {"good"} and "no tile" in summary.failed["good"]
    assert "--min-tissue" in summary.failed["good"] or "--tile-px" in summary.failed["good"]


def test_single_tile_slide_makes_a_1x1_grid_that_models_accept(segmented_good, counts):
    import torch

    from wsi2dmamba.models import create
    from wsi2dmamba.models.batch import GridBatch
    from wsi2dmamba.tiling import TileConfig, tile_cohort
    from wsi2dmamba.tissue import read_segment_config

    good, run = segmented_good
    counts("inputs")
    config = TileConfig(tile_px=3072, mpp=0.5, min_tissue=0.05, segment=read_segment_config(run))
    summary = tile_cohort(good, run, config, progress=False, force=True)
    assert summary.ok, summary.failed
    tiles = read_tile_grid(run / "tiles" / "good.h5")
    assert tiles.shape == (1, 1) and tiles.n_tiles == 1
    feats = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    path = run / "features" / "enc" / "good.h5"
    write_feature_grid(path, FeatureGrid.from_tiles(tiles, feats, encoder="enc"))
    grid = read_feature_grid(path)
    batch = GridBatch.from_grids([grid])
    assert tuple(batch.features.shape) == (1, 1, 1, 16) and bool(batch.tissue.all())
    torch.manual_seed(0)
    for name in ("abmil", "2dmambamil"):
        model = create(name, in_dim=16, n_classes=2).eval()
        with torch.no_grad():
            out = model(batch)
        assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all(), name


def test_grid_files_of_zero_and_one_tile_round_trip(tmp_path, counts):
    for keep in ([0], [1]):
        g = _feature_grid(dim=4, n_rows=1, n_cols=1, keep=keep)
        p = tmp_path / f"g{len(keep)}{keep[0]}.h5"
        counts("inputs")
        if g.n_tiles == 0:
            g = FeatureGrid.from_tiles(_tile_grid(1, 1, keep=[0]), np.zeros((0, 4), np.float32), encoder="e")
        write_feature_grid(p, g)
        back = read_feature_grid(p)
        assert back.n_tiles == g.n_tiles and back.shape == g.shape and back.feature_dim == 4
        dense, mask = back.dense()
        assert dense.shape == (1, 1, 4) and mask.sum() == g.n_tiles
