"""The fuzz job: seeded mutations of the files users hand to wsi2dmamba, fed to the real parsers.

Targets: damaged grid files (tiles and feature grids), CLAM / TRIDENT feature files with odd attributes,
coordinates, features and bytes (imported, written and read back), cohort manifests and pipeline files.
The property: every input is accepted or refused with one of the project's own errors
(``wsi2dmamba.errors``); no other exception, no crash, no hang. The HDF5 parsers run in a child process
with a time limit, so that a crash or a hang of the HDF5 library is seen and counted, not fatal to the job.

``WSI_FUZZ_SEED`` (default 1) chooses the inputs and ``WSI_FUZZ_INPUTS`` (default 400) how many per target;
a finding names its seed and index, and its input is kept under pytest's temporary folder.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
from fuzzing import (
    Finding,
    Outcome,
    ParserChild,
    is_own_error,
    mutate_bytes,
    random_clam_trident,
    random_manifest,
    random_pipeline,
    seeded,
)
from test_bad_input import _feature_grid

from wsi2dmamba.errors import WsiError

pytest_plugins = ["conftest_reliability"]

SEED = int(os.environ.get("WSI_FUZZ_SEED", 1))
INPUTS = int(os.environ.get("WSI_FUZZ_INPUTS", 400))
GRID_INPUTS = INPUTS // 2  # each damaged grid file is read twice (by the guard's child, then by the stage's reader)
GUARD_LIMIT_S = 5.0  # a damaged 40 KB file that is still being read after 5 s is hung
MAX_SECONDS = 120.0  # per target: a stop on a machine far slower than CI (the count run is printed)


def _report(target: str, tried: int, accepted: int, findings: list[Finding], seconds: float) -> None:
    print(f"fuzz {target}: {tried} inputs (seed {SEED}) in {seconds:.1f} s: {accepted} accepted, "
          f"{tried - accepted - len(findings)} refused with a clear error, {len(findings)} finding(s)")
    assert not findings, "\n".join(f.line() for f in findings[:5])


@pytest.fixture(scope="module")
def child():
    c = ParserChild(timeout_s=20.0)
    yield c
    c.close()


@pytest.mark.parametrize("kind", ["tiles", "features"])
def test_fuzz_damaged_grid_files(kind, child, tmp_path, counts):
    """Damaged bytes of a valid grid file. The HDF5 library itself crashes or hangs on some damaged files,
    so a stage never reads a file it did not write itself in its own process before a child process has
    read it under a time limit (:mod:`wsi2dmamba.grid.guard`): the job checks that such files are
    refused by that guard with their name, and that every other file reads or is refused cleanly."""
    guard = pytest.importorskip("wsi2dmamba.grid.guard", reason="the child-process guard of HDF5 reads is not "
                                "part of this checkout")
    from wsi2dmamba.grid import write_feature_grid, write_tile_grid

    base = tmp_path / "base.h5"
    grid = _feature_grid(dim=8)
    (write_tile_grid if kind == "tiles" else write_feature_grid)(base, grid)
    data = base.read_bytes()
    t0 = time.monotonic()
    paths = []
    for i in range(GRID_INPUTS):
        paths.append(tmp_path / f"{kind}-{i}.h5")
        paths[-1].write_bytes(mutate_bytes(data, seeded(SEED, kind, i)))
    refused = guard.guard_grid_files(paths, kind, {}, writer="tile" if kind == "tiles" else "extract",
                                     base_limit_s=GUARD_LIMIT_S)
    findings = [Finding(kind, i, Outcome("error", "unnamed refusal", refused[p]), str(p))
                for i, p in enumerate(paths) if p in refused and str(p) not in refused[p]]
    accepted = 0
    for i, path in enumerate(paths):
        if path in refused:
            continue
        outcome = child.run({"target": kind, "path": str(path)})  # what the stage's own read then does
        accepted += outcome.kind == "ok"
        if outcome.kind == "ok" or (outcome.kind == "error" and is_own_error(outcome)):
            path.unlink()
        else:
            findings.append(Finding(kind, i, outcome, str(path)))
    counts("inputs", len(paths))
    print(f"fuzz {kind}: {len(refused)} file(s) refused by the guard (the HDF5 library crashed or hung on them)")
    _report(kind, len(paths), accepted, findings, time.monotonic() - t0)


def test_fuzz_clam_and_trident_imports(child, tmp_path, counts):
    findings, t0 = [], time.monotonic()
    i = accepted = 0
    for i in range(INPUTS):
        if time.monotonic() - t0 > MAX_SECONDS:
            break
        path = tmp_path / f"import-{i}.h5"
        request = random_clam_trident(path, seeded(SEED, "import", i))
        out = tmp_path / f"import-{i}.grid.h5"
        outcome = child.run({**request, "out": str(out)})
        out.unlink(missing_ok=True)
        accepted += outcome.kind == "ok"
        if outcome.kind == "ok" or (outcome.kind == "error" and is_own_error(outcome)):
            path.unlink()
        else:
            findings.append(Finding("import", i, outcome, str(path)))
    counts("inputs", i + 1)
    _report("import", i + 1, accepted, findings, time.monotonic() - t0)


def _in_process(target: str, tmp_path: Path, make, parse, counts, n: int = INPUTS) -> None:
    """Inputs without HDF5 are parsed in this process: an exception is caught here."""
    import traceback

    findings, t0 = [], time.monotonic()
    i = accepted = 0
    for i in range(n):
        if time.monotonic() - t0 > MAX_SECONDS:
            break
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            path = make(Path(d), seeded(SEED, target, i))
            try:
                parse(path)
                accepted += 1
            except WsiError:
                pass
            except Exception as exc:  # what the job is looking for
                keep = tmp_path / f"{target}-{i}{path.suffix}"
                keep.write_bytes(path.read_bytes())
                findings.append(Finding(target, i, Outcome("error", f"{type(exc).__module__}.{type(exc).__name__}",
                                                           str(exc)[:300], traceback.format_exc()[-1500:]),
                                        str(keep)))
    counts("inputs", i + 1)
    _report(target, i + 1, accepted, findings, time.monotonic() - t0)


def test_fuzz_manifests(tmp_path, counts):
    from wsi2dmamba.cohort import load_cohort

    def make(d: Path, rng) -> Path:
        (d / "s1.svs").write_bytes(b"")
        p = d / "cohort.csv"
        p.write_bytes(random_manifest(rng))
        return p

    def parse(p: Path) -> None:
        load_cohort(p, require_path=False, check_files=False)
        try:  # the same manifest read as the slide stages read it, looking for slides in its folder
            load_cohort(p, slides_dir=p.parent)
        except WsiError:
            pass

    _in_process("manifest", tmp_path, make, parse, counts, 3 * INPUTS)


def test_fuzz_pipeline_files(tmp_path, counts):
    from wsi2dmamba.pipeline import load_pipeline

    def make(d: Path, rng) -> Path:
        p = d / "p.toml"
        p.write_text(random_pipeline(rng), encoding="utf-8")
        return p

    _in_process("pipeline", tmp_path, make, lambda p: load_pipeline(p, out=p.parent / "run"), counts)
