"""The contract every stage keeps, on real slides and the small real training grids:

- a rerun is a no-op;
- a rerun that changes only runtime options (workers, device, ``segment_missing``, batch sizes, the
  models' ``channel_groups``, ``scan_backend``, ``checkpoint_blocks``) is a no-op;
- the files a stage says it wrote are the files on disk (and hold the bytes it recorded).

Also: ``tile --segment-missing`` on a finished cohort tiles only the slides it rescues and ``extract``
then encodes only those; run folders whose recorded hashes counted runtime options are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from training_data import make_cohort, one_thread  # noqa: F401
from typer.testing import CliRunner

from helpers import write_cohort
from wsi2dmamba.cli import app
from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.ledger import read_state
from wsi2dmamba.cohort.verify import verify_run
from wsi2dmamba.evaluation import evaluate_run
from wsi2dmamba.features import ExtractConfig, extract_cohort, feature_path, load_encoder
from wsi2dmamba.fileio import file_sha256
from wsi2dmamba.models.registry import config_class
from wsi2dmamba.tiling import TileConfig, tile_cohort
from wsi2dmamba.tissue import segment_cohort
from wsi2dmamba.training import TrainConfig, train_cohort

ENCODER = "efficientnet-lite0"
TILES = TileConfig(tile_px=224, mpp=1.0)  # a few dozen tiles per slide: seconds on a CPU
STAGE_DIRS = {"segment": "segment", "tile": "tiles", "extract": f"features/{ENCODER}"}
MODEL = "2dmambamil"
TINY_SSM = {"d_model": 8, "d_state": 4, "attn_dim": 8}
RUNTIME_SSM = {"channel_groups": 2, "scan_backend": "torch", "checkpoint_blocks": "on"}


# ------------------------------------------------------------------------------------------ helpers



def cli(*args: object) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res.output


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and modification time of every file below ``folder`` (locks aside)."""
    return {str(p.relative_to(folder)): (file_sha256(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def assert_written_files_are_on_disk(run: Path, stage_dir: str, ids: list[str]) -> None:
    """The outputs each slide's state records are exactly the stage folder's files, with those bytes."""
    recorded: dict[str, str] = {}
    for sid in ids:
        st = read_state(run, stage_dir, sid)
        assert st is not None and st.status == "done", (stage_dir, sid, st)
        recorded.update(st.outputs)
    on_disk = {str(p.relative_to(run)) for p in (run / stage_dir).rglob("*")
               if p.is_file() and ".state" not in p.parts and not p.name.endswith(".lock") and p.name != "config.json"}
    assert on_disk == set(recorded), stage_dir
    assert all(file_sha256(run / rel) == sha for rel, sha in recorded.items())


def assert_fold_files_are_on_disk(fold: Path) -> None:
    done = json.loads((fold / "done.json").read_text())
    # done.json lists the others; .lock is the job's lock on the fold, housekeeping like a run's ledger
    on_disk = {p.name for p in fold.iterdir() if p.is_file()} - {"done.json", ".lock"}
    assert on_disk == set(done["outputs"])
    assert all(file_sha256(fold / name) == sha for name, sha in done["outputs"].items())


@contextlib.contextmanager
def hashed_as_before(*fields: tuple[type, str]):
    """Hash ``fields`` again, as run folders written before they became runtime fields did."""
    def mark(exclude: bool) -> None:
        for cls, name in fields:
            cls.model_fields[name].exclude = exclude
            cls.model_rebuild(force=True)

    mark(False)
    try:
        yield
    finally:
        mark(True)


# ----------------------------------------------------------------------------------- slide stages

@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, device="cpu")


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory, cmu_slide):
    """Two real slides (a copy of the CMU slide under another name) and their cohort manifest."""
    folder = tmp_path_factory.mktemp("slides")
    other = folder / "other.svs"
    shutil.copyfile(cmu_slide, other)
    return write_cohort(folder, [("a", cmu_slide), ("b", other)])


def test_slide_stages_keep_the_contract(tmp_path, two_slides, encoder):
    run = tmp_path / "run"
    cohort = load_cohort(two_slides)
    only_a = load_cohort(write_cohort(tmp_path, [("a", cohort.records[0].path)]))
    extract = ExtractConfig(encoder=ENCODER, device="cpu", batch_size=16, workers=0)

    assert segment_cohort(only_a, run, progress=False).done == ["a"]
    first = tile_cohort(cohort, run, TILES, progress=False)
    assert first.done == ["a"] and "No tissue contours" in first.failed["b"]
    assert extract_cohort(cohort, run, extract, progress=False, encoder=encoder).done == ["a"]
    tiles_a = {k: v for k, v in snapshot(run / "tiles").items() if Path(k).name.startswith("a")}
    assert set(tiles_a) == {"a.h5", "a_grid.png", ".state/a.json"}
    feats_a = feature_path(run, ENCODER, "a").stat().st_mtime_ns

    # The rescue switch tiles the slide without contours, and only it; extract then encodes only it.
    out = cli("tile", "--cohort", two_slides, "--out", run, "--tile-px", 224, "--mpp", 1.0, "--segment-missing",
              "--quiet")
    assert "1 done, 1 skipped" in out
    assert all(snapshot(run / "tiles")[k] == v for k, v in tiles_a.items())
    out = cli("extract", "--cohort", two_slides, "--out", run, "--encoder", ENCODER, "--device", "cpu",
              "--workers", 0, "--quiet")
    assert "1 done, 1 skipped" in out
    assert feature_path(run, ENCODER, "a").stat().st_mtime_ns == feats_a

    before = {stage: snapshot(run / d) for stage, d in STAGE_DIRS.items()}
    reruns = {  # each stage twice: as it was run, and with other runtime options only
        "segment": [lambda: segment_cohort(cohort, run, progress=False),
                    lambda: segment_cohort(cohort, run, workers=2, progress=False)],
        "tile": [lambda: tile_cohort(cohort, run, TILES, progress=False),
                 lambda: tile_cohort(cohort, run, TILES.model_copy(update={"segment_missing": True}), workers=2,
                                     progress=False)],
        "extract": [lambda: extract_cohort(cohort, run, extract, progress=False, encoder=encoder),
                    lambda: extract_cohort(cohort, run, extract.model_copy(update={
                        "batch_size": 3, "workers": 1, "max_run_tiles": 2, "device": "auto"}),
                        progress=False, encoder=encoder)],
    }
    # segment's rerun first segments b (tile rescued it without a segment state): then it is done too.
    segment_cohort(cohort, run, progress=False)
    before["segment"] = snapshot(run / "segment")
    for stage, calls in reruns.items():
        for call in calls:
            summary = call()
            assert not summary.done and not summary.failed and sorted(summary.skipped) == ["a", "b"], stage
            assert snapshot(run / STAGE_DIRS[stage]) == before[stage], stage
        assert_written_files_are_on_disk(run, STAGE_DIRS[stage], ["a", "b"])
    assert not verify_run(run).errors


def test_tiles_of_a_run_that_hashed_segment_missing_are_kept(tmp_path, cmu_slide, encoder, caplog):
    run = tmp_path / "run"
    cohort = load_cohort(write_cohort(tmp_path, [("a", cmu_slide)]))
    extract = ExtractConfig(encoder=ENCODER, device="cpu", workers=0)
    with hashed_as_before((TileConfig, "segment_missing")):
        assert tile_cohort(cohort, run, TILES.model_copy(update={"segment_missing": True}), progress=False).ok
        assert extract_cohort(cohort, run, extract, progress=False, encoder=encoder).done == ["a"]
    legacy = read_state(run, "tiles", "a").params_hash
    before = {d: snapshot(run / d) for d in ("tiles", f"features/{ENCODER}")}

    with caplog.at_level(logging.WARNING):
        assert tile_cohort(cohort, run, TILES, progress=False).skipped == ["a"]
    assert [r.message for r in caplog.records if "counted --segment-missing" in r.message]
    assert read_state(run, "tiles", "a").params_hash != legacy
    assert snapshot(run / "tiles")["a.h5"] == before["tiles"]["a.h5"]  # the tiles are the same file
    assert extract_cohort(cohort, run, extract, progress=False, encoder=encoder).skipped == ["a"]
    assert snapshot(run / f"features/{ENCODER}") == before[f"features/{ENCODER}"]
    assert_written_files_are_on_disk(run, "tiles", ["a"])
    assert not verify_run(run).errors


# ------------------------------------------------------------------------------- train, evaluate

@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grids")
    manifest, feats = make_cohort(folder, n_patients=12, seed=3)
    return folder, load_cohort(manifest, require_path=False), feats


def train(run: Path, grids, device: str, overrides: dict) -> object:
    _, cohort, feats = grids
    config = TrainConfig(folds=2, epochs=1, lr=1e-3, batch_size=2, device=device)
    return train_cohort(cohort, feats, run, MODEL, config, {**TINY_SSM, **overrides}, folds_to_run=[0],
                        progress=False)


def trained_files(run: Path) -> dict[str, tuple[str, int]]:
    """The files of ``train`` (evaluate's summary.csv, rewritten by every evaluation, aside)."""
    return {k: v for k, v in snapshot(run / "train").items() if not k.endswith("summary.csv")}


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "created"}


@pytest.mark.usefixtures("one_thread")
def test_train_and_evaluate_keep_the_contract(tmp_path, grids):
    run = tmp_path / "run"
    fold = run / "train" / MODEL / "fold_0"
    assert not train(run, grids, "cpu", {}).folds[0].skipped
    metrics = evaluate_run(run, n_boot=20)
    written = [run / "eval" / "metrics.json", run / "train" / MODEL / "summary.csv"]
    assert all(p.is_file() for p in written)
    summary = file_sha256(written[1])
    before = trained_files(run)

    for device, overrides in (("cpu", {}), ("auto", RUNTIME_SSM), ("cpu", {"channel_groups": 1})):
        assert train(run, grids, device, overrides).folds[0].skipped
        assert trained_files(run) == before
        # evaluate recomputes (it is cheap): the same figures, the same files
        assert without_time(evaluate_run(run, n_boot=20)) == without_time(metrics)
        assert json.loads(written[0].read_text())["models"] == metrics["models"]
        assert file_sha256(written[1]) == summary
    assert_fold_files_are_on_disk(fold)
    # An identity option is not a runtime option: the fold is refused, as before.
    with pytest.raises(Exception, match="another configuration"):
        train(run, grids, "cpu", {"d_state": 8})


@pytest.mark.usefixtures("one_thread")
def test_a_fold_whose_hash_counted_runtime_options_is_kept(tmp_path, grids, caplog):
    run = tmp_path / "run"
    fold = run / "train" / MODEL / "fold_0"
    ssm = config_class(MODEL)
    with hashed_as_before((TrainConfig, "device"), *((ssm, name) for name in RUNTIME_SSM)):
        train(run, grids, "cpu", {"channel_groups": 2})
    legacy = json.loads((fold / "config.json").read_text())
    assert legacy["train"]["device"] == "cpu" and legacy["model_overrides"]["channel_groups"] == 2
    weights = snapshot(fold)["best.safetensors"]

    with caplog.at_level(logging.WARNING):
        assert train(run, grids, "auto", {"channel_groups": 1}).folds[0].skipped
    assert [r.message for r in caplog.records if "counted runtime options" in r.message]
    now = json.loads((fold / "config.json").read_text())
    assert now["config_hash"] != legacy["config_hash"]
    assert json.loads((fold / "done.json").read_text())["config_hash"] == now["config_hash"]
    assert snapshot(fold)["best.safetensors"] == weights
    assert_fold_files_are_on_disk(fold)
    assert not verify_run(run).errors
    caplog.clear()
    assert train(run, grids, "cpu", {}).folds[0].skipped  # and from now on without a word
    assert not caplog.records


# --------------------------------------------------------------------------------------------- docs

def test_the_docs_list_every_identity_and_runtime_field():
    from wsi2dmamba.identity import fields_table, runtime_fields
    from wsi2dmamba.models.registry import list_models
    from wsi2dmamba.tissue import SegmentConfig

    models = list(dict.fromkeys(config_class(m) for m in list_models()))
    expected = fields_table([SegmentConfig, TileConfig, ExtractConfig, TrainConfig, *models])
    text = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    found = text.split("<!-- config-fields:start -->\n", 1)[1].split("<!-- config-fields:end -->", 1)[0]
    assert found == expected, f"docs/reliability.md's table of options is out of date; it should read:\n{expected}"
    assert runtime_fields(TileConfig) == ("segment_missing",) and runtime_fields(TrainConfig) == ("device",)
    assert set(RUNTIME_SSM) == set(runtime_fields(config_class(MODEL)))
