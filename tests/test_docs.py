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
from helpers import chromium as _chromium

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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict``: (site folder, build output)."""
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).is_file():
        pytest.fail("mkdocs is not installed: pip install -e '.[test]'")
    out_dir = tmp_path_factory.mktemp("site") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(out_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    return out_dir, out


def test_site_builds_strict_without_warnings(site):
    site_dir, out = site
    assert "WARNING" not in out, out
    for page in OWN_PAGES:
        html = site_dir / (page[:-3] + "/index.html" if page != "index.md" else "index.html")
        assert html.is_file(), f"{page} was not built"
    # Equations are MathML, made at build time; no page loads anything from the network.
    grid = (site_dir / "grid-format" / "index.html").read_text()
    assert grid.count('<span class="arithmatex"><math ') >= 3 and grid.count('<div class="arithmatex"><math ') >= 1
    assert "\\mathrm" not in grid and "\\(" not in grid
    for page in site_dir.rglob("*.html"):
        remote = re.findall(r'<(?:script|link)[^>]*(?:src|href)="(https?://[^"]+)"', page.read_text())
        assert not remote, (page, remote)




PROBE = """<script>
addEventListener("load", () => {
  const maths = [...document.querySelectorAll(".arithmatex math")];
  const boxes = maths.map((m) => m.getBoundingClientRect());
  document.body.setAttribute("data-probe", JSON.stringify({
    n: maths.length,
    mathml: maths.every((m) => m instanceof MathMLElement),
    width: Math.min(...boxes.map((b) => b.width)),
    height: Math.min(...boxes.map((b) => b.height)),
  }));
});
</script>"""


@pytest.fixture
def served(site):
    """The built site served over HTTP on the loopback interface, as a static host would: its base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site[0]))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _dump_dom(url: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--proxy-server=127.0.0.1:9",  # offline: everything but the loopback goes to a closed port
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
           "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_formulas_render_offline_in_a_browser_without_console_errors(site, served, tmp_path):
    site_dir, _ = site
    page = site_dir / "grid-format" / "index.html"
    res = _dump_dom(f"{served}/grid-format/", tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not [ln for ln in console if re.search(r"error|uncaught|failed", ln, re.I)], console
    # The same page with a probe: the formulas are MathML elements that the browser lays out.
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _dump_dom(f"{served}/grid-format/probe.html", tmp_path / "profile2").stdout
    found = re.search(r'data-probe="([^"]+)"', dom)
    assert found, dom[-2000:]
    import html as html_lib
    import json

    seen = json.loads(html_lib.unescape(found.group(1)))
    assert seen["n"] >= 3 and seen["mathml"] and seen["width"] > 5 and seen["height"] > 5, seen


def test_every_page_is_in_the_nav_and_every_nav_page_is_known():
    nav = nav_pages()
    missing = [p for p in doc_pages() if p not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav (add them): {missing}"
    for page in OWN_PAGES:
        assert page in nav and (DOCS / page).is_file()


def test_pipeline_file_reference_is_current():
    """docs/pipeline-file.md is what the configuration models make now, and names every key they accept."""
    from wsi2dmamba.pipeline.config import stage_config_class
    from wsi2dmamba.pipeline.reference import pipeline_reference

    committed = (DOCS / "pipeline-file.md").read_text()
    assert committed == pipeline_reference(), \
        "docs/pipeline-file.md is stale: run `python -m wsi2dmamba.pipeline.reference docs/pipeline-file.md`"
    for stage in ("segment", "extract", "train", "evaluate"):
        for key in stage_config_class(stage).model_fields:
            assert f"| `{key}` |" in committed, (stage, key)
    for table in ("cohort", "demo", "run", "segment", "tile", "extract", "train", "evaluate"):
        assert f"## `[{table}]`" in committed


def test_quickstart_says_what_users_run_into():
    """The three things new users hit: the patient count train needs (checked against the splitter),
    the mpp column for slides without µm/px, and heatmap."""
    from wsi2dmamba.cohort import Cohort, SlideRecord
    from wsi2dmamba.errors import ConfigError
    from wsi2dmamba.training.splits import make_splits

    text = (DOCS / "quickstart.md").read_text()
    assert "at least folds + 2 patients" in text and "7 patients for the default `--folds 5`" in text
    assert "need an `mpp`\n  column" in text or "need an `mpp` column" in " ".join(text.split())
    assert "wsi2dmamba heatmap --out" in text and "--all" in text

    def cohort(n):
        return Cohort(tuple(SlideRecord(f"s{i}", None, f"p{i}", label="ab"[i % 2]) for i in range(n)))

    make_splits(cohort(7), folds=5)
    with pytest.raises(ConfigError, match="too few"):
        make_splits(cohort(6), folds=5)


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


def test_benchmarks_page_is_todays_figures_one_table_per_area():
    """docs/benchmarks.md stays short (history goes to docs/engineering-log.md), and every area section
    with a table says how to reproduce it: a command (an indented or fenced code line), the machine and
    the date it was measured."""
    text = (DOCS / "benchmarks.md").read_text()
    lines = text.splitlines()
    assert len(lines) < 300, f"docs/benchmarks.md has {len(lines)} lines; move history to docs/engineering-log.md"
    assert "engineering-log.md" in text
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert len(sections) >= 6
    for section in sections:
        title = section.splitlines()[0]
        if not re.search(r"^\|.*\|\s*$", section, flags=re.MULTILINE):
            continue
        commands = re.findall(r"^(?: {4}|```)\S.*$", section, flags=re.MULTILINE)
        assert commands, f"section {title!r} of docs/benchmarks.md names no command"
        assert "Machine:" in section, f"section {title!r} of docs/benchmarks.md names no machine"
        assert re.search(r"\b20\d\d-[01]\d-[0-3]\d\b", section), f"section {title!r} gives no date"
    # Other pages and code comments refer to these sections by name.
    for title in ("2D scans", "Feature extraction", "Scaling out", "Demo", "Models", "Slide stages"):
        assert re.search(rf"^## {re.escape(title)}$", text, flags=re.MULTILINE), title
