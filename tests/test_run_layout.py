"""The run layout: one module names every folder and file of a run, and no other module builds a run path.

The source check reads the package's syntax trees: a path join (``/``) with a written-out name or with a
module's own name constant, a string that is the name of a run file or starts with a run folder
(``"features/…"``), or a glob pattern naming run files, outside ``run_layout.py``, is a second owner of the
layout. The few joins that build paths of other folders (the hub caches, the package's own
assets, the folder layouts of CLAM and TRIDENT) are listed with the reason.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from training_data import make_cohort

from wsi2dmamba import fold_files
from wsi2dmamba import run_layout as layout

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wsi2dmamba"

#: Paths that are not of a run folder: (file below the package, enclosing function or "" for module level).
NOT_RUN_PATHS = {
    ("features/weights.py", "*"): "the Hugging Face and torch hub caches",
    ("ops/cupy_scans.py", ""): "the CUDA source shipped in the package",
    ("demo/mosaic.py", "load_asset"): "the package's own pictures",
    ("pipeline/demo.py", "demo_pipeline_path"): "the package's own pipeline files",
    ("features/exporters.py", "export_grid"): "the folder layouts of CLAM and TRIDENT, written for those tools",
    ("features/exporters.py", "export_features"): "CLAM's slide table, beside the exported files",
    ("fileio.py", "temporary_sibling"): "the temporary names of the atomic writer, beside any file",
}
#: A glob pattern that names no run file: wildcards and at most an extension.
_PLAIN_GLOB = re.compile(r"^[*/]*(\.[A-Za-z0-9]+)?$")


def _run_file_names() -> set[str]:
    """The layout's file names (``done.json``, ``ledger.csv``, …): its string constants with an extension."""
    return {v for k, v in vars(layout).items()
            if k.isupper() and isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]+\.[a-z]+", v)}


def _run_folders() -> tuple[str, ...]:
    """The run's top folders (``train``, ``features``, …): a string that starts with ``<folder>/`` is a run path."""
    return tuple(f"{v}/" for k, v in vars(layout).items() if k.endswith("_DIR") and isinstance(v, str)
                 and k not in ("STATE_DIR", "SHARDS_DIR", "COHORT_SLIDES_DIR", "PREDICTION_HEATMAPS_DIR",
                               "SPLITS_DIR"))


def _name_constants(tree: ast.Module) -> dict[str, str]:
    """A module's own top-level names bound to a string (``CONFIG_FILE = "config.json"``)."""
    return {n.targets[0].id: n.value.value for n in tree.body
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}


def _docstrings(tree: ast.Module) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _is_text(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(node, ast.JoinedStr)


def _literal_parts(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant):
        return [node.value]
    return [v.value for v in node.values if isinstance(v, ast.Constant)]


class _RunPathFinder(ast.NodeVisitor):
    """Collects ``(line, function, what)`` for each place that builds a run path by itself."""

    def __init__(self, names: set[str], tree: ast.Module):
        self.names, self.found, self.function = names, [], ""
        self.constants, self.docstrings, self.folders = _name_constants(tree), _docstrings(tree), _run_folders()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        outer, self.function = self.function, self.function or node.name
        self.generic_visit(node)
        self.function = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Div) and (_is_text(node.left) or _is_text(node.right)):
            self.found.append((node.lineno, self.function, f"path join {ast.unparse(node)}"))
        elif isinstance(node.op, ast.Div) and any(isinstance(n, ast.Name) and n.id in self.constants
                                                 for n in (node.left, node.right)):
            self.found.append((node.lineno, self.function, f"path join with a name constant {ast.unparse(node)}"))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.names:
            self.found.append((node.lineno, self.function, f"run file name {node.value!r}"))
        elif isinstance(node.value, str) and id(node) not in self.docstrings and node.value.startswith(self.folders):
            self.found.append((node.lineno, self.function, f"run path {node.value!r}"))

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        first = node.values[0] if node.values else None
        if isinstance(first, ast.Constant) and str(first.value).startswith(self.folders):
            self.found.append((node.lineno, self.function, f"run path {ast.unparse(node)}"))
        else:
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("glob", "rglob") and node.args \
                and _is_text(node.args[0]) and not all(_PLAIN_GLOB.match(p) for p in _literal_parts(node.args[0])):
            self.found.append((node.lineno, self.function, f"glob pattern {ast.unparse(node.args[0])}"))
        if isinstance(func, (ast.Name, ast.Attribute)) and ast.unparse(func) in ("Path", "os.path.join") \
                and len(node.args) > 1 and any(_is_text(a) for a in node.args[1:]):
            self.found.append((node.lineno, self.function, f"path join {ast.unparse(node)}"))
        self.generic_visit(node)


def run_paths_built_outside_the_layout(package: Path = PACKAGE) -> list[str]:
    """``file:line (function): what`` for each run path a module other than ``run_layout.py`` builds."""
    names = _run_file_names()
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel == "run_layout.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        finder = _RunPathFinder(names, tree)
        finder.visit(tree)
        problems += [f"{rel}:{line} ({fn or 'module'}): {what}" for line, fn, what in finder.found
                     if (rel, fn) not in NOT_RUN_PATHS and (rel, "*") not in NOT_RUN_PATHS]
    return problems


# ------------------------------------------------------------------------------------------ the source check

def test_no_module_but_the_layout_builds_a_run_path():
    found = run_paths_built_outside_the_layout()
    assert not found, "run paths built outside wsi2dmamba/run_layout.py:\n" + "\n".join(found)


def test_the_source_check_sees_each_way_of_building_a_run_path(tmp_path):
    """Control: a module that spells run paths out is caught, each way; one that asks the layout is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "from pathlib import Path\n"
        "def a(run):\n    return run / 'train' / f'fold_{0}'\n"
        "def b(fold):\n    return fold.joinpath('done.json')\n"
        "def c(model_dir):\n    return sorted(model_dir.glob('fold_*'))\n"
        "def d(run):\n    return Path(run, 'ledger.csv')\n"
        "STAGE = 'segment'\n"
        "def e(run, enc):\n    return run / STAGE, f'features/{enc}', 'train/splits'\n")
    (pkg / "good.py").write_text(
        "from . import run_layout as layout\n"
        "def a(run):\n    return layout.fold_dir(layout.model_dir(run, 'abmil'), 0)\n"
        "def c(folder):\n    return sorted(folder.glob('*.h5'))\n")
    found = run_paths_built_outside_the_layout(pkg)
    assert [f.split(" (")[0] for f in found] == ["bad.py:3", "bad.py:3", "bad.py:5", "bad.py:7", "bad.py:9",
                                                 "bad.py:9", "bad.py:12", "bad.py:12", "bad.py:12"], found
    assert not [f for f in found if f.startswith("good.py")]


def test_the_layout_module_imports_only_the_standard_library():
    tree = ast.parse((PACKAGE / "run_layout.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "imports the package"
    assert imported <= {"__future__", "os", "pathlib"}, imported


# ------------------------------------------------------------------------------------------ the layout itself

@pytest.mark.parametrize("k", [0, 1, 9, 12])
def test_fold_folders_round_trip(tmp_path, k):
    fold = layout.fold_dir(layout.model_dir(tmp_path, "2dmambamil"), k)
    assert fold == tmp_path / "train" / "2dmambamil" / f"fold_{k}"
    assert layout.fold_index(fold) == k
    assert layout.restart_dir(fold, 2).name == "restart_2"


@pytest.mark.parametrize("name", ["fold_", "fold_x", "fold_1a", "restart_1", "splits", ".tmp-fold_1"])
def test_other_folders_are_no_fold(name):
    assert layout.fold_index(Path("run/train/m") / name) is None


def test_every_state_and_shard_record_is_found_by_the_layout_globs(tmp_path):
    stages = [layout.SEGMENT_DIR, layout.TILES_DIR, layout.features_stage("uni"), layout.predictions_stage("abmil")]
    written = set()
    for stage in stages:
        for path in (layout.state_file(tmp_path, stage, "s-1"), layout.shard_record(tmp_path, stage, "0of2")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
            written.add(path)
    found = {p for g in layout.state_globs() + layout.shard_record_globs() for p in tmp_path.glob(g)}
    assert found == written
    # a slide's output and its state file meet in the same stage folder
    out = layout.grid_file(layout.features_dir(tmp_path, "uni"), "s-1")
    assert layout.state_of_output(out) == layout.state_file(tmp_path, layout.features_stage("uni"), "s-1")
    assert layout.state_of_output(layout.tiles_files(tmp_path, "s-1")["h5"]) == \
        layout.state_file(tmp_path, layout.TILES_DIR, "s-1")


def test_the_names_on_disk_are_those_of_existing_runs(tmp_path):
    """Runs written before the layout module stay valid: the same names."""
    run = tmp_path

    def rel(p: Path) -> str:
        return p.relative_to(run).as_posix()

    assert rel(layout.ledger(run)) == "ledger.csv"
    assert rel(layout.shard_ledger(run, "1of4")) == "ledger.shard-1of4.csv"
    assert rel(layout.log_file(run, "20260101T000000Z", "train", 7)) == "logs/20260101T000000Z-train-7.log"
    assert {k: rel(v) for k, v in layout.segment_files(run, "a").items()} == {
        "geojson": "segment/a.geojson", "mask": "segment/a_mask.png", "overlay": "segment/a_overlay.png"}
    assert {k: rel(v) for k, v in layout.tiles_files(run, "a").items()} == {"h5": "tiles/a.h5",
                                                                            "picture": "tiles/a_grid.png"}
    assert rel(layout.stage_config(run, layout.SEGMENT_DIR)) == "segment/config.json"
    assert rel(layout.lock_file(layout.stage_dir(run, "tiles"), "0of2")) == "tiles/.lock-0of2"
    assert layout.shard_of_lock(layout.lock_file(run, "0of2")) == "0of2"
    assert rel(layout.split_file(layout.splits_dir(run), 3)) == "train/splits/splits_3.csv"
    assert rel(layout.eval_metrics(run)) == "eval/metrics.json"
    assert rel(layout.model_summary(layout.model_dir(run, "m"))) == "train/m/summary.csv"
    assert {k: rel(v) for k, v in layout.report_files(layout.report_dir(run)).items()} == {
        "page": "report/index.html", "metrics": "report/metrics.json", "summary": "report/summary.csv"}
    assert rel(layout.bundle_manifest(layout.bundle_dir(run, "m"))) == "bundles/m/bundle.json"
    assert layout.bundle_fold_file(2) == "fold_2.safetensors"
    assert [rel(p) for p in layout.prediction_tables(run, "m")] == ["predictions/m.csv", "predictions/m.patients.csv"]
    assert rel(layout.prediction_file(run, "m", "a")) == "predictions/m/a.json"
    assert rel(layout.prediction_heatmaps_dir(run, "m")) == "predictions/m/heatmaps"
    assert rel(layout.predict_record(run)) == "predict.json"
    assert rel(layout.heatmap_files(layout.heatmaps_dir(run, "m"), "a")["record"]) == "heatmaps/m/a.json"
    assert rel(layout.cohort_manifest(layout.cohort_dir(run))) == "cohort/manifest.csv"
    assert layout.FOLD_OUTPUTS == ("config.json", "log.csv", "best.safetensors", "best.json", "last.safetensors",
                                   "last.json", "predictions.csv")
    assert layout.checkpoint_sidecar(layout.checkpoint_file(run, "best")).name == "best.json"


# ------------------------------------------------------------------------------------------ a real fold

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    import torch

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.training import TrainConfig, train_cohort

    folder = tmp_path_factory.mktemp("layout")
    manifest, feats = make_cohort(folder, n_patients=12, seed=3)
    cohort = load_cohort(manifest, require_path=False)
    run = folder / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_cohort(cohort, feats, run, "meanpool", TrainConfig(folds=2, epochs=2, batch_size=4, device="cpu"),
                     folds_to_run=[0], progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


def test_a_fold_writes_exactly_the_layouts_fold_files(trained_run):
    fold = layout.fold_dir(layout.model_dir(trained_run, "meanpool"), 0)
    assert fold.is_dir() and layout.fold_index(fold) == 0
    on_disk = {p.name for p in fold.iterdir()}
    # the fold's outputs, the record written last, and the job's lock on the fold
    assert on_disk == {*layout.FOLD_OUTPUTS, layout.FOLD_DONE, layout.LOCK}
    done = json.loads(layout.fold_file(fold, layout.FOLD_DONE).read_text())
    assert sorted(done["outputs"]) == sorted(layout.FOLD_OUTPUTS)
    assert {p.name for p in layout.splits_dir(trained_run).glob(layout.SPLIT_GLOB)} >= {"splits_0.csv", "splits_1.csv"}
    assert layout.split_file(layout.splits_dir(trained_run), 0).is_file()


def test_the_checks_beside_the_fold_writer_pass_a_real_fold_and_catch_an_edit(trained_run, tmp_path):
    import shutil

    from wsi2dmamba.cohort.verify import verify_run

    assert verify_run(trained_run).ok
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    fold = layout.fold_dir(layout.model_dir(copy, "meanpool"), 0)
    checked = fold_files.check_fold(fold, splits=layout.splits_dir(copy))
    assert checked.findings == [] and checked.files_checked == len(layout.FOLD_OUTPUTS)
    log = layout.fold_file(fold, layout.FOLD_LOG)
    log.write_text(log.read_text().replace("\n2,", "\n3,", 1))  # the second epoch's row now says epoch 3
    problems = {(f.path.name, f.level) for f in fold_files.check_fold(fold, splits=layout.splits_dir(copy)).findings}
    assert (layout.FOLD_LOG, "error") in problems  # its sha256 and its epochs both disagree with done.json
    errors = verify_run(copy).errors
    assert any(e.path == layout.relative(copy, log) and "done.json says 2 epoch(s)" in e.message for e in errors)
