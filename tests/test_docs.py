"""The documentation site: builds with `mkdocs build --strict` and no warning, lists every page, its CLI
reference is current, its commands exist, its Slurm scripts parse, and the grid file format page
describes every dataset and attribute a real file holds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
OWN_PAGES = ("index.md", "quickstart.md", "cli.md", "scaling.md", "grid-format.md")


def nav_pages() -> list[str]:
    """Every page named in mkdocs.yml's nav (a small reader: `- Title: page.md` lines)."""
    text = (REPO / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M)


def doc_pages() -> list[str]:
    return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def test_site_builds_strict_without_warnings(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).is_file():
        pytest.fail("mkdocs is not installed: pip install -e '.[test]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "WARNING" not in out, out
    for page in OWN_PAGES:
        html = tmp_path / "site" / (page[:-3] + "/index.html" if page != "index.md" else "index.html")
        assert html.is_file(), f"{page} was not built"
    # Equations are left for MathJax in the page (arithmatex), not mangled by Markdown.
    grid = (tmp_path / "site" / "grid-format" / "index.html").read_text()
    assert 'class="arithmatex"' in grid and r"\mathrm{origin}" in grid


def test_every_page_is_in_the_nav_and_every_nav_page_is_known():
    nav = nav_pages()
    missing = [p for p in doc_pages() if p not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav (add them): {missing}"
    for page in OWN_PAGES:
        assert page in nav and (DOCS / page).is_file()


def test_cli_reference_is_current():
    import typer

    from wsi2dmamba.cli.reference import cli_reference

    committed = (DOCS / "cli.md").read_text()
    fresh = cli_reference()
    version = re.search(r"\(typer ([\w.]+)\)", committed.splitlines()[0])
    if version and version.group(1) == typer.__version__:
        assert committed == fresh, "docs/cli.md is stale: run `python -m wsi2dmamba.cli.reference docs/cli.md`"
    else:
        # Another typer formats help a little differently: the commands and options must still agree.
        def skeleton(text: str) -> list[str]:
            return re.findall(r"^#+ `([^`]+)`|^- `(-[^` ]+)", text, flags=re.M)

        assert skeleton(committed) == skeleton(fresh), \
            "docs/cli.md is stale: run `python -m wsi2dmamba.cli.reference docs/cli.md`"


def _command_tree():
    import typer

    from wsi2dmamba.cli import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="wsi2dmamba")
    tree = {}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        opts = set()
        for p in cmd.get_params(ctx):
            if p.param_type_name == "option":
                opts.update(p.opts)
                opts.update(p.secondary_opts)
        tree[name] = opts
    return tree


def _shell_lines(page: Path) -> list[str]:
    """The command lines of the page's bash/text code blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|text|console)\n(.*?)```", page.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        lines += block.replace("\\\n", " ").splitlines()
    return lines


@pytest.mark.parametrize("page", ["quickstart.md", "scaling.md", "index.md", "../docker/README.md", "bundles.md"])
def test_commands_in_the_pages_exist(page):
    tree = _command_tree()
    checked = 0
    for line in _shell_lines(DOCS / page):
        line = line.split("#", 1)[0] if not line.lstrip().startswith("#!") else ""
        for m in re.finditer(r"\bwsi2dmamba (\w[\w-]*)((?:\s+[^;&|]*)?)", line):
            name, rest = m.group(1), m.group(2)
            if name not in tree:
                pytest.fail(f"{page}: `wsi2dmamba {name}` is not a command")
            for word in shlex.split(rest, posix=True) if "$" not in rest else rest.split():
                opt = word.split("=", 1)[0]
                if opt.startswith("--"):
                    assert opt in tree[name], f"{page}: `wsi2dmamba {name}` has no option {opt}"
            checked += 1
    assert checked or page == "index.md"


def test_slurm_scripts_parse():
    text = (DOCS / "scaling.md").read_text()
    scripts = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if b.startswith("#!/bin/bash")]
    assert len(scripts) == 2 and all("#SBATCH" in s for s in scripts)
    for script in scripts:
        res = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
    prepare = scripts[0]
    array = re.search(r"#SBATCH --array=0-(\d+)", prepare)
    n = re.search(r"^N=(\d+)", prepare, flags=re.M)
    assert array and n and int(array.group(1)) + 1 == int(n.group(1)), "N must match the --array range"
    assert '--shard "$I/$N"' in prepare and "wsi2dmamba merge" in scripts[1]


def test_grid_format_page_names_every_dataset_and_attribute(tmp_path):
    from wsi2dmamba.grid import FeatureGrid, write_feature_grid

    h5py = pytest.importorskip("h5py")
    grid = FeatureGrid(slide_id="s1", coords=[[0, 0], [224, 0], [0, 224]], index=[[0, 0], [0, 1], [1, 0]],
                       shape=(2, 2), tissue_fraction=[1.0, 0.5, 0.75], origin_level0=(0.0, 0.0),
                       stride_level0=224.0, tile_size_level0=224.0, tile_px=224, stride_px=224,
                       mpp_requested=0.5, mpp_effective=0.5, mpp_level0=0.5, read_level=0, read_downsample=1.0,
                       level0_size=(1000, 800), slide_path="s1.svs", params_hash="abc",
                       features=np.ones((3, 4), np.float32), encoder="enc")
    path = tmp_path / "s1.h5"
    write_feature_grid(path, grid)
    page = (DOCS / "grid-format.md").read_text()
    documented = set(re.findall(r"^\| `([\w/]+)`", page, flags=re.M))
    documented |= {n for row in re.findall(r"^\| (`[\w/]+`(?:, `[\w/]+`)+) \|", page, flags=re.M)
                   for n in re.findall(r"`([\w/]+)`", row)}
    names = []
    with h5py.File(path, "r") as f:
        f.visit(names.append)
        names += list(f.attrs) + list(f["grid"].attrs) + list(f["coords"].attrs)
    names = [n for n in names if n != "grid"]
    undocumented = sorted(set(names) - documented)
    assert not undocumented, f"docs/grid-format.md does not describe: {undocumented}"
