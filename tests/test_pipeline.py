"""Pipeline files: validation with clear errors, path resolution, overrides, and the CLI entry points."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi2dmamba.errors import ConfigError
from wsi2dmamba.pipeline import load_pipeline
from wsi2dmamba.pipeline.config import model_folder, split_model_entry

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted((REPO / "pipelines").glob("*.toml"))

MINIMAL = """
[cohort]
manifest = "cohort.csv"

[train]
models = ["abmil"]
"""


def _write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    (tmp_path / "cohort.csv").write_text("slide_id,path,label\ns1,s1.svs,a\n")
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_shipped_pipeline_is_valid():
    assert {p.name for p in PIPELINES} >= {"demo.toml", "demo-survival.toml", "bracs.toml", "dhmc.toml",
                                          "panda.toml", "tcga_brca.toml", "tcga_nsclc.toml", "tcga_kirc.toml",
                                          "tcga_kirp.toml", "tcga_luad.toml", "tcga_stad.toml", "tcga_ucec.toml"}
    for path in PIPELINES:
        cfg = load_pipeline(path)
        assert cfg.models and cfg.task in ("classification", "survival")
        if cfg.cohort is not None:
            assert cfg.cohort.manifest.is_file(), path
            if cfg.cohort.splits_dir is not None:
                assert any(cfg.cohort.splits_dir.glob("splits_*.csv")), path
        # the tiling stage sees the pipeline's segmentation parameters
        assert cfg.option("tile").segment == cfg.option("segment")


def test_demo_pipeline_uses_one_tile_per_mosaic_cell():
    from wsi2dmamba.demo import CELL_PX, MOSAIC_MPP

    cfg = load_pipeline(REPO / "pipelines" / "demo.toml")
    assert cfg.demo is not None and cfg.cohort is None
    assert cfg.option("tile").tile_px == CELL_PX and cfg.option("tile").mpp == MOSAIC_MPP
    assert {"2dmambamil", "m2dmil", "abmil", "meanpool"} <= set(cfg.models)


def test_relative_paths_resolve_against_the_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    p = _write(sub, MINIMAL.replace('"cohort.csv"', '"../data/c.csv"') + '\n[run]\nout = "runs/x"\n')
    cfg = load_pipeline(p)
    assert cfg.cohort.manifest == (tmp_path / "data" / "c.csv").resolve()
    assert cfg.out == (sub / "runs" / "x").resolve()
    assert load_pipeline(p, out=tmp_path / "elsewhere").out == (tmp_path / "elsewhere").resolve()


def test_default_run_folder_is_named_after_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(_write(tmp_path, MINIMAL, "my-study.toml"))
    assert cfg.name == "my-study" and cfg.out == (tmp_path / "runs" / "my-study").resolve()


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "\n[tile]\ntile_pix = 256\n", ["[tile] unknown key 'tile_pix'", "tile_px"]),
    (MINIMAL + "\n[segment]\nsaturation_threshold = 400\n", ["[segment] saturation_threshold"]),
    (MINIMAL.replace('models = ["abmil"]', 'models = ["abmil"]\nepochz = 3'), ["[train] unknown key 'epochz'"]),
    (MINIMAL + "\n[trian]\n", ["unknown table(s) 'trian'"]),
    (MINIMAL.replace("[cohort]", "[cohort]\nmanifets = 'x.csv'"), ["[cohort] unknown key 'manifets'"]),
    ('[train]\nmodels = ["abmil"]\n', ["either a [cohort] table", "none found"]),
    (MINIMAL + "\n[demo]\nslides = 8\n", ["not both"]),
    ('[cohort]\nmanifest = "cohort.csv"\n', ["no [train] table"]),
    (MINIMAL.replace('"abmil"', '"abmill"'), ["unknown model(s) 'abmill'", "2dmambamil"]),
    (MINIMAL.replace('"abmil"', '"2dmambamil:fancy"'), ["no preset 'fancy'"]),
    (MINIMAL.replace('"abmil"', '"abmil", "abmil"'), ["more than once"]),
    (MINIMAL + "\n[train.model_options.meanpool]\nhidden = 8\n", ["'meanpool' is not in [train] models"]),
    (MINIMAL + "\n[train.model_options.abmil]\nhiden = 8\n", ["[train.model_options.abmil]", "hiden"]),
    (MINIMAL + "\n[train.model_options.abmil]\nin_dim = 8\n", ["set by the run"]),
    (MINIMAL + "\n[tile.segment]\nseg_mpp = 4.0\n", ["segmentation options go in [segment]"]),
    (MINIMAL + '\n[run]\ntrain_dir = "a/b"\n', ["train_dir must be a plain folder name"]),
    (MINIMAL + "\n[run]\nworkers = 0\n", ["[run] workers"]),
    (MINIMAL.replace('models = ["abmil"]', 'models = ["abmil"]\ntask = "regression"'), ["[train] task"]),
    ("[cohort\n", ["not a valid TOML file"]),
    ("run = 3\n" + MINIMAL, ["'run' must be a table"]),
])
def test_invalid_pipeline_files_name_the_file_and_the_key(tmp_path, text, expected):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    message = str(info.value)
    assert str(p) in message
    for part in expected:
        assert part in message, message


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="Pipeline file not found"):
        load_pipeline(tmp_path / "nope.toml")


def test_overrides_are_validated_like_the_file(tmp_path):
    p = _write(tmp_path, MINIMAL)
    cfg = load_pipeline(p, overrides={"train": {"epochs": 3}})
    assert cfg.option("train").epochs == 3
    with pytest.raises(ConfigError, match=r"\[train\] epochs"):
        load_pipeline(p, overrides={"train": {"epochs": 0}})


def test_model_entries_with_presets():
    assert split_model_entry("2dmambamil:paper") == ("2dmambamil", "paper")
    assert split_model_entry("abmil") == ("abmil", None)
    assert model_folder("2dmambamil:paper") == "2dmambamil-paper"
    assert model_folder("abmil") == "abmil"


def test_cli_run_reports_an_invalid_file_without_traceback(tmp_path):
    import subprocess
    import sys

    p = _write(tmp_path, MINIMAL + "\n[tile]\nbogus = 1\n")
    proc = subprocess.run([sys.executable, "-c", "from wsi2dmamba.cli import main; main()", "run", str(p)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "[tile] unknown key 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_lists_run_and_demo():
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    assert " run " in out and " demo " in out
    demo_help = CliRunner().invoke(app, ["demo", "--help"]).output
    assert "--quick" in demo_help and "--out" in demo_help
