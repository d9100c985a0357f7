"""The command line as a user meets it: --version, -h, completion, one name and one meaning per option,
choices in --help, defaults in help texts kept, and a log file per run."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from wsi2dmamba import __version__
from wsi2dmamba.cli import app, main

RUNNER = CliRunner()


def help_of(*command: str) -> str:
    res = RUNNER.invoke(app, [*command, "-h"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return res.output


def command_names() -> list[str]:
    return [c.name or c.callback.__name__ for c in app.registered_commands]


def options_of(command: str) -> dict[str, typer.models.OptionInfo]:
    """--name → its help text, from the command's click parameters."""
    click_cmd = typer.main.get_command(app).commands[command]
    return {opt: p for p in click_cmd.params for opt in getattr(p, "opts", []) if opt.startswith("--")}


def test_version_help_and_completion():
    res = RUNNER.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"wsi2dmamba {__version__}"
    top = help_of()
    assert "--install-completion" in top and "--show-completion" in top and "-h, --help" in top
    for cmd in command_names():
        assert "Usage:" in help_of(cmd)


def test_defaults_in_brackets_survive_in_help():
    assert "[fixed]" in help_of("segment") and "[keep]" in help_of("segment")
    run = help_of("run")
    assert "[run] out" in run and "[cohort] slides_dir" in run


@pytest.mark.parametrize("command, option, choices", [
    ("train", "--task", "classification|survival"),
    ("train", "--select-on", "loss|auc|balanced_accuracy|accuracy|f1|c_index"),
    ("train", "--precision", "auto|fp32|bf16|fp16"),
    ("train", "--executor", "local|ray"),
    ("evaluate", "--level", "patient|slide"),
    ("segment", "--threshold", "fixed|otsu"),
    ("extract", "--precision", "fp32|fp16|bf16"),
    ("import-features", "--format", "clam|trident"),
    ("import-features", "--on-collision", "refuse|keep-first"),
    ("export-features", "--format", "clam|trident"),
    ("heatmap", "--scale", "rank|percentile|linear"),
    ("heatmap", "--checkpoint", "best|last"),
    ("demo", "--task", "classification|survival"),
])
def test_choices_are_listed(command, option, choices):
    assert re.search(rf"{option} <{re.escape(choices)}>", help_of(command)), help_of(command)
    res = RUNNER.invoke(app, [command, option, "nonsense"])
    assert res.exit_code == 2 and "nonsense" in res.output


def test_one_name_and_one_meaning_per_option():
    per_option: dict[str, dict[str, tuple]] = {}
    for cmd in command_names():
        for name, p in options_of(cmd).items():
            per_option.setdefault(name, {})[cmd] = (p.help, p.default)
    # --mpp is the tiles' µm/px, on tile only; the slides' µm/px is --slide-mpp everywhere.
    assert set(per_option["--mpp"]) == {"tile"}
    assert {"segment", "tile", "extract", "import-features"} <= set(per_option["--slide-mpp"])
    # --workers and --device: one help text and one default wherever they appear.
    for name in ("--workers", "--device"):
        assert len(set(per_option[name].values())) == 1, per_option[name]
    assert set(per_option["--device"]) >= {"extract", "train", "heatmap"}
    assert next(iter(per_option["--device"].values()))[1] == "auto"
    # --out is the run folder wherever there is one; export-features writes CLAM's or TRIDENT's folder,
    # export a model bundle.
    for cmd, (text, _) in per_option["--out"].items():
        if cmd == "export-features":
            assert "CLAM or TRIDENT" in text
        elif cmd == "export":
            assert text.startswith("Bundle folder")
        else:
            assert text.startswith("Run folder: the command reads its inputs from it and writes its outputs"), cmd


def test_train_help_speaks_of_folds():
    opts = options_of("train")
    assert opts["--force"].help == "Retrain folds that are already done."
    assert "folds" in opts["--executor"].help and "slide" not in opts["--executor"].help


def test_the_slide_mpp_error_names_an_option_the_command_has(tmp_path, cmu_slide):
    import tifffile

    from wsi2dmamba.slide import open_slide

    with open_slide(cmu_slide) as s:
        pixels = s.read_region((0, 0), 0, (1024, 1024))
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, pixels, tile=(256, 256), photometric="rgb")  # no resolution anywhere
    for cmd in ("segment", "tile", "extract"):
        res = RUNNER.invoke(app, [cmd, str(plain), "--out", str(tmp_path / "run"), "-q"])
        if cmd != "extract":  # made with --slide-mpp, so that extract has tiles to read
            ok = RUNNER.invoke(app, [cmd, str(plain), "--out", str(tmp_path / "run"), "-q", "--slide-mpp", "0.5"]
                               + (["--tile-px", "128"] if cmd == "tile" else []))
            assert ok.exit_code == 0, ok.output
        assert res.exit_code != 0
        err = res.output + (res.stderr if res.stderr_bytes is not None else "")
        named = set(re.findall(r"--[a-z][a-z-]+", str(res.exception) + err))
        assert "--slide-mpp" in named and named <= set(options_of(cmd)), (cmd, named)


def test_a_log_per_run_beside_the_ledger(tmp_path, cmu_slide, monkeypatch, capsys):
    import warnings

    import wsi2dmamba.tissue

    segment_cohort = wsi2dmamba.tissue.segment_cohort

    def warning_segment(*args, **kwargs):
        warnings.warn("a library warned here", UserWarning, stacklevel=1)
        return segment_cohort(*args, **kwargs)

    monkeypatch.setattr(wsi2dmamba.tissue, "segment_cohort", warning_segment)
    run = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["wsi2dmamba", "segment", str(cmu_slide), "--out", str(run), "-q"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code in (0, None)
    assert (run / "ledger.csv").is_file()
    logs = sorted((run / "logs").glob("*-segment-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert f"command: wsi2dmamba segment {cmu_slide} --out {run} -q" in text and "status: ok" in text
    for lib in ("wsi2dmamba", "numpy", "torch", "h5py", "openslide-python"):
        assert re.search(rf"^  {lib}: \d", text, re.MULTILINE), lib
    # Python warnings are kept in the log and still shown to the user.
    assert re.search(r"^warnings:\n  .*UserWarning: a library warned here", text, re.MULTILINE), text
    assert "a library warned here" in capsys.readouterr().err
    # A failing command is logged with its error.
    monkeypatch.setattr("sys.argv", ["wsi2dmamba", "tile", str(tmp_path / "missing.svs"), "--out", str(run), "-q"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    (log,) = sorted((run / "logs").glob("*-tile-*.log"))
    text = log.read_text()
    assert "status: exit 2" in text and "missing.svs" in text.split("stderr:")[1]
