"""The package's layers: no import cycle between sub-packages, and torch only where a model runs.

Evaluation and the report read the files that training writes, so they import no torch; the command
line's help lists every command without loading one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wsi2dmamba"


def _relative_targets(node: ast.ImportFrom, here: list[str]) -> set[str]:
    """Top-level names that a relative ``from .x import y`` in package ``here`` (below wsi2dmamba) names."""
    if node.level - 1 > len(here):
        return set()
    base = here[:len(here) - (node.level - 1)]
    target = base + (node.module.split(".") if node.module else [])
    return {target[0]} if target else {alias.name for alias in node.names}


def _imported_packages(path: Path, package: Path) -> set[str]:
    """Top-level names under ``package`` (sub-package or module) that the file at ``path`` imports."""
    here = list(path.relative_to(package).parts[:-1])  # the package the file lives in, below wsi2dmamba
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            found |= _relative_targets(node, here)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name + "."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Sub-package (or top-level module) → the others it imports, at any depth of the function bodies."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if len(rel.parts) == 1 and rel.name == "__init__.py":
            continue  # the package root holds only the version
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        graph.setdefault(owner, set()).update(_imported_packages(path, package) - {owner, "__version__"})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, …, a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    pkg = tmp_path / "pkg"
    files = {"__init__.py": "from . import a\n", "errors.py": "", "a/__init__.py": "from .x import f\n",
             "a/x.py": "from ..errors import E\n\ndef f():\n    from ..b.y import g\n",
             "b/__init__.py": "", "b/y.py": "import pkg.c.z\nfrom pkg.errors import E\n", "c/z.py": "from .. import a\n"}
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {"a": {"errors", "b"}, "b": {"c", "errors"}, "c": {"a"}, "errors": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_sub_packages():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between sub-packages: " + " → ".join(cycle or [])


def test_evaluation_and_report_need_no_model_code():
    graph = import_graph()
    assert not graph["evaluation"] & {"training", "models", "heatmaps", "ops", "features", "pipeline"}


def _torch_loaded(code: str) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code + "\nprint('torch' in sys.modules)"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("module", ["wsi2dmamba.evaluation", "wsi2dmamba.evaluation.report",
                                    "wsi2dmamba.evaluation.metrics", "wsi2dmamba.evaluation.evaluate",
                                    "wsi2dmamba.cli"])
def test_module_imports_no_torch(module):
    assert not _torch_loaded(f"import sys\nimport {module}")


def test_cli_help_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "sys.argv = ['wsi2dmamba', '--help']\n"
            "from wsi2dmamba.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as shown:\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code in (0, None), exc.code\n"
            "assert 'heatmap' in shown.getvalue() and 'train' in shown.getvalue()")
    assert not _torch_loaded(code)


def test_the_torch_probe_sees_torch():
    """Control: the same probe reports torch where a model is built."""
    assert _torch_loaded("import sys\nimport wsi2dmamba.heatmaps")
