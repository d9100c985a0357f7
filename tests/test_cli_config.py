"""The command line takes its options from the configuration classes: one owner per default and choice."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import wsi2dmamba.training
from wsi2dmamba.cli import app, main
from wsi2dmamba.pipeline.config import EvaluateConfig
from wsi2dmamba.tiling import TileConfig
from wsi2dmamba.training.config import TrainConfig


def _params(command: str) -> dict[str, object]:
    click_cmd = typer.main.get_command(app).commands[command]
    return {p.name: p for p in click_cmd.params}


@pytest.mark.parametrize("command, config_class, exclude", [
    ("train", TrainConfig, ()), ("evaluate", EvaluateConfig, ()), ("report", EvaluateConfig, ()),
    ("tile", TileConfig, ("segment",)),  # tile reads the segmentation parameters from the run folder
])
def test_every_field_is_an_option_with_the_configuration_default(command, config_class, exclude):
    params = _params(command)
    for name, field in config_class.model_fields.items():
        if name in exclude:
            continue
        assert name in params, f"{command} has no option for {config_class.__name__}.{name}"
        p = params[name]
        assert f"--{name.replace('_', '-')}" in p.opts
        assert p.default == field.get_default(), name
    assert "_typer_context" not in params


@pytest.fixture
def captured(tmp_path, monkeypatch):
    """The configuration `train` hands to the library (training itself is not the subject here)."""
    seen = {}

    def train_cohort(cohort, features, out, model, config, *args, **kwargs):
        seen["config"] = config
        return SimpleNamespace(warnings=[], folds=[], name=model, model_dir=Path(out))

    monkeypatch.setattr(wsi2dmamba.training, "train_cohort", train_cohort)
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("slide_id,label,time,event\na,x,3,1\nb,y,5,0\n")
    base = ["train", "--cohort", str(manifest), "--features", str(tmp_path), "--out", str(tmp_path / "run"),
            "--quiet"]
    return base, seen


def test_options_left_out_keep_the_configuration_rules(captured):
    base, seen = captured
    res = CliRunner().invoke(app, [*base, "--task", "survival", "--lr", "0.001"])
    assert res.exit_code == 0, res.output
    # what the library would do with the same two settings: survival clips no gradient unless asked
    assert seen["config"] == TrainConfig(task="survival", lr=0.001)
    assert seen["config"].clip_grad is None
    res = CliRunner().invoke(app, [*base, "--clip-grad", "0", "--device", "cpu", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert seen["config"] == TrainConfig(clip_grad=None, device="cpu", precision="fp32")
    assert seen["config"].device == "cpu"


def test_a_bad_value_is_one_message_naming_the_option(captured, monkeypatch, capsys):
    base, _ = captured
    monkeypatch.setattr(sys, "argv", ["wsi2dmamba", *base, "--epochs", "0", "--val-fraction", "1.5"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "--epochs: Input should be greater than or equal to 1 (got 0)" in err
    assert "--val-fraction: Input should be less than 1 (got 1.5)" in err
