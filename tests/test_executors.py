"""Executors: the Ray executor gives the same outputs, states and ledger as the local one; resources are
declared per task; GPU tasks spread over the visible GPUs; a task that dies is reported, not fatal."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi2dmamba.cohort import load_cohort, run_stage
from wsi2dmamba.cohort.executors import LocalExecutor, RayExecutor, TaskResources, make_executor, run_tasks
from wsi2dmamba.cohort.ledger import collect_states
from wsi2dmamba.errors import ConfigError, SlideError
from wsi2dmamba.fileio import atomic_path

REPO = Path(__file__).resolve().parents[1]
CMU_CANDIDATES = [REPO / "tests/data/CMU-1-Small-Region.svs",
                  REPO.parent / "shared/data/slides/aperio_svs/CMU-1-Small-Region.svs"]


@pytest.fixture(scope="module")
def cmu() -> Path:
    for p in CMU_CANDIDATES:
        if p.is_file():
            return p
    pytest.skip("CMU-1-Small-Region.svs is neither in tests/data nor in ../shared")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster of 2 CPUs for the module (starting one takes a few seconds)."""
    ray = pytest.importorskip("ray")
    # Test functions live in this module, which Ray's workers cannot import: ship them by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------- tasks used by the tests

def region_stage(record, config, run_dir):
    """A real per-slide stage: read a level-0 region with OpenSlide and store it as .npy."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(record.path))
    except openslide.OpenSlideError as exc:
        raise SlideError(f"slide {record.slide_id!r}: cannot open {record.path} ({exc})") from exc
    with slide:
        w, h = slide.dimensions
        x = (w - config["size"]) * int(record.slide_id[-1]) // 10  # a different region per slide
        pixels = np.asarray(slide.read_region((x, h // 2), 0, (config["size"], config["size"])).convert("RGB"))
    with atomic_path(region_path(record, run_dir)) as tmp:
        np.save(tmp, pixels)
    return {"mean": round(float(pixels.mean()), 6)}


def region_path(record, run_dir):
    return Path(run_dir) / "regions" / f"{record.slide_id}.npy"


def outputs(record, run_dir):
    return [region_path(record, run_dir)]


def assigned_resources(tag):
    import ray

    return tag, dict(ray.get_runtime_context().get_assigned_resources())


def visible_devices(seconds):
    time.sleep(seconds)  # long enough that both workers take tasks
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def fails(kind):
    if kind == "raise":
        raise ValueError("bad fold")
    os._exit(3)  # the worker process dies, as on a segfault or an out-of-memory kill


def write_manifest(path: Path, slide: Path, n: int, broken: Path) -> Path:
    rows = [f"slide-{k},{slide}" for k in range(n)] + [f"broken,{broken}"]
    path.write_text("slide_id,path\n" + "\n".join(rows) + "\n")
    return path


def ledger_rows(run: Path) -> list[tuple]:
    with open(run / "ledger.csv", newline="") as fh:
        return [(r["stage"], r["slide_id"], r["status"], r["reason"], r["params_hash"]) for r in csv.DictReader(fh)]


def states(run: Path) -> dict:
    return {(s.stage, s.slide_id): (s.status, s.outputs, s.info) for s in collect_states(run)}


# ------------------------------------------------------------------------------------------------------ tests

def test_ray_executor_matches_local_on_real_slides(tmp_path, cmu, ray_cluster):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 5, broken=tmp_path / "m.csv"))
    cfg = {"size": 96}
    local = run_stage("region", cohort, tmp_path / "local", cfg, region_stage, outputs, workers=2, progress=False)
    remote = run_stage("region", cohort, tmp_path / "ray", cfg, region_stage, outputs, executor="ray",
                       progress=False)
    assert sorted(remote.done) == sorted(local.done) == [f"slide-{k}" for k in range(5)]
    assert remote.failed == local.failed and "cannot open" in remote.failed["broken"]
    assert remote.infos == local.infos
    assert ledger_rows(tmp_path / "ray") == ledger_rows(tmp_path / "local")
    assert states(tmp_path / "ray") == states(tmp_path / "local")  # same output hashes, same infos
    # Resume: a Ray run over a locally finished stage skips every done slide (and retries the failure).
    again = run_stage("region", cohort, tmp_path / "local", cfg, region_stage, outputs, executor="ray",
                      progress=False)
    assert sorted(again.skipped) == sorted(local.done) and list(again.failed) == ["broken"] and not again.done


def test_ray_runs_the_real_segment_and_tile_stages_like_local(tmp_path, cmu, ray_cluster):
    from wsi2dmamba.grid import read_tile_grid
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue.stage import segment_cohort

    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 3, broken=tmp_path / "m.csv"))
    for run, kw in ((tmp_path / "local", {}), (tmp_path / "ray", {"executor": "ray"})):
        seg = segment_cohort(cohort, run, progress=False, **kw)
        tiles = tile_cohort(cohort, run, progress=False, **kw)
        assert len(seg.done) == 3 and list(seg.failed) == ["broken"] and len(tiles.done) == 3
    assert ledger_rows(tmp_path / "ray") == ledger_rows(tmp_path / "local")
    for k in range(3):
        sid = f"slide-{k}"
        assert (tmp_path / "ray/segment" / f"{sid}.geojson").read_bytes() == \
            (tmp_path / "local/segment" / f"{sid}.geojson").read_bytes()
        a, b = (read_tile_grid(tmp_path / run / "tiles" / f"{sid}.h5") for run in ("ray", "local"))
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.tissue_fraction, b.tissue_fraction)


def test_ray_tasks_get_the_resources_they_declare(ray_cluster):
    outs = list(run_tasks(assigned_resources, [(k, (k,)) for k in range(2)], executor="ray",
                          resources=TaskResources(cpus=2)))
    assert [o.ok for o in outs] == [True, True]
    assert all(o.value[1] == {"CPU": 2.0} for o in outs)
    # A GPU request on a cluster without GPUs is dropped instead of waiting for ever.
    ex = RayExecutor(resources=TaskResources(cpus=1, gpus=1))
    assert ex.gpus == 0 and "0 GPUs in the cluster" in ex.describe()
    (out,) = ex.map(assigned_resources, [("x", ("x",))])
    assert out.value[1] == {"CPU": 1.0}


def test_ray_task_errors_come_back_as_outcomes(ray_cluster):
    outs = {o.key: o for o in RayExecutor(max_retries=0).map(fails, [("raise", ("raise",)), ("die", ("die",))])}
    assert isinstance(outs["raise"].error, ValueError) and "bad fold" in outs["raise"].reason
    assert not outs["die"].ok and outs["die"].value is None
    assert outs["die"].reason  # says the worker died, in Ray's words


def test_local_gpu_tasks_spread_over_the_visible_gpus():
    ex = LocalExecutor(workers=1, resources=TaskResources(gpus=1), gpus=["3", "5"])
    assert ex.workers == 2 and "GPUs 3,5" in ex.describe()
    outs = list(ex.map(visible_devices, [(k, (0.5,)) for k in range(4)]))
    seen = {o.value[0] for o in outs}
    assert seen == {"3", "5"}  # both GPUs were used, one per worker
    by_pid = {}
    for o in outs:
        by_pid.setdefault(o.value[1], set()).add(o.value[0])
    assert all(len(devs) == 1 for devs in by_pid.values())  # each worker kept its own GPU
    # CPU tasks do not get pinned workers.
    assert not LocalExecutor(workers=2, gpus=["0", "1"]).pinned


def test_local_worker_death_is_an_outcome():
    outs = {o.key: o for o in LocalExecutor(workers=2).map(fails, [("raise", ("raise",)), ("die", ("die",))])}
    assert not outs["die"].ok and "died" in outs["die"].reason


def test_an_address_nobody_answers_at_fails_fast():
    import socket

    from wsi2dmamba.cohort.executors import _check_reachable
    from wsi2dmamba.errors import WsiError

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again before the check: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(WsiError, match=f"No Ray cluster answers at --ray-address 127.0.0.1:{port}"):
        _check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(WsiError, match="No Ray cluster answers"):
        _check_reachable(f"ray://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5
    with socket.socket() as server:  # a port that answers passes; "auto" is left to Ray
        server.bind(("127.0.0.1", 0))
        server.listen()
        _check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    _check_reachable("auto")


def test_executor_names_and_options_are_checked():
    with pytest.raises(ConfigError, match="Unknown executor 'dask'"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="only used with --executor ray"):
        make_executor("local", ray_address="auto")
    with pytest.raises(ConfigError, match="gpus"):
        TaskResources(cpus=0)
    assert TaskResources.for_device("cpu").gpus == 0 and TaskResources.for_device("cuda:1").gpus == 1


# ------------------------------------------------------------------------------------- folds as Ray tasks

def _predictions(model_dir: Path) -> dict:
    return {p.parent.name: p.read_text() for p in sorted(model_dir.glob("fold_*/predictions.csv"))}


def test_ray_fold_tasks_train_the_same_models_as_local(tmp_path, ray_cluster):
    training_data = pytest.importorskip("training_data")
    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, feats = training_data.make_cohort(tmp_path / "data", n_patients=8)
    cohort = load_cohort(manifest, require_path=False, check_files=False)
    config = TrainConfig(folds=2, epochs=1, device="cpu", val_fraction=0.25)
    local = train_cohort(cohort, feats, tmp_path / "local", "abmil", config,
                         progress=False)
    remote = train_cohort(cohort, feats, tmp_path / "ray", "abmil", config,
                          progress=False, executor="ray")
    assert [f.fold for f in remote.folds] == [0, 1]
    assert [(f.best_epoch, f.best_value) for f in remote.folds] == [(f.best_epoch, f.best_value) for f in local.folds]
    preds = _predictions(remote.model_dir)
    assert len(preds) == 2 and preds == _predictions(local.model_dir)
    # Resume: a fold that is done is skipped by either executor.
    again = train_cohort(cohort, feats, tmp_path / "ray", "abmil", config,
                         progress=False, executor="ray")
    assert all(f.skipped for f in again.folds)


def test_fold_errors_from_workers_keep_their_type(tmp_path, ray_cluster):
    training_data = pytest.importorskip("training_data")
    from wsi2dmamba.errors import ConfigError as CE
    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, feats = training_data.make_cohort(tmp_path / "data", n_patients=8)
    cohort = load_cohort(manifest, require_path=False, check_files=False)
    config = TrainConfig(folds=2, epochs=1, device="cpu", val_fraction=0.25)
    with pytest.raises(CE, match="only used with --executor ray"):
        train_cohort(cohort, feats, tmp_path / "r", "meanpool", config, ray_address="auto", progress=False)
    with pytest.raises(CE, match="gets its GPU from Ray"):
        train_cohort(cohort, feats, tmp_path / "r", "meanpool", config.model_copy(update={"device": "cuda:1"}),
                     executor="ray", progress=False)
    # A model option the model does not have fails in the worker; the caller sees the same error type.
    with pytest.raises(Exception) as info:
        train_cohort(cohort, feats, tmp_path / "r", "meanpool", config, {"no_such_option": 1}, executor="ray",
                     progress=False)
    direct = pytest.raises(Exception)
    with direct:
        train_cohort(cohort, feats, tmp_path / "l", "meanpool", config, {"no_such_option": 1}, progress=False)
    assert type(info.value) is type(direct.excinfo.value)


# ------------------------------------------------------------------------------------ the demo on Ray

DEMO_PIPELINE = """
[demo]
slides = 4
rule = "contact"
rows = 6
cols = 6

[run]
train_dir = "classification"

[extract]
device = "cpu"
workers = 0

[train]
task = "classification"
folds = 2
epochs = 1
models = ["abmil"]

[evaluate]
n_boot = 50
"""


def _run_outputs(run: Path) -> dict:
    """What a run produced that must not depend on where it ran: ledger rows, features, fold
    predictions, metrics (less their creation time and run folder)."""
    import json

    import h5py

    out = {"ledger": ledger_rows(run)}
    for p in sorted(run.glob("features/*/*.h5")):
        with h5py.File(p, "r") as f:
            out[str(p.relative_to(run))] = f["features"][...].tobytes()
    for p in sorted(run.glob("*/train/*/fold_*/predictions.csv")):
        out[str(p.relative_to(run))] = _Predictions(p.read_text())
    for p in sorted(run.glob("*/eval/metrics.json")):
        metrics = json.loads(p.read_text())
        metrics.pop("created", None), metrics.pop("run", None)
        out[str(p.relative_to(run))] = metrics
    return out


class _Predictions:
    """A predictions file, equal to another when every column but the probabilities is the same and the
    probabilities agree to 1e-6: a Ray task runs torch on one thread and the local run on several, and
    float32 sums taken in another order may differ in the last bit."""

    def __init__(self, csv_text: str) -> None:
        import io

        import pandas as pd

        table = pd.read_csv(io.StringIO(csv_text))
        prob = [c for c in table.columns if c.startswith("prob")]
        assert prob, f"no probability columns in {list(table.columns)}"
        self.rest, self.prob = table.drop(columns=prob).to_csv(index=False), table[prob].to_numpy()

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _Predictions) and self.rest == other.rest and self.prob.shape == other.prob.shape
                and bool(np.allclose(self.prob, other.prob, rtol=0, atol=1e-6)))

    def __repr__(self) -> str:
        return f"_Predictions({self.rest[:80]!r}..., prob={self.prob.ravel()[:4]}...)"


@pytest.mark.slow
def test_demo_pipeline_on_a_local_ray_cluster_gives_the_local_results(tmp_path, ray_cluster):
    """The demo cohort through every stage (segment, tile, extract, train, evaluate), once with the
    local executor and once with each slide and fold a Ray task: the same ledger, features,
    predictions and metrics."""
    from wsi2dmamba.pipeline import load_pipeline, run_pipeline

    (tmp_path / "demo.toml").write_text(DEMO_PIPELINE)
    local = run_pipeline(load_pipeline(tmp_path / "demo.toml", out=tmp_path / "local"), progress=False)
    remote = run_pipeline(load_pipeline(tmp_path / "demo.toml", out=tmp_path / "ray"), progress=False,
                          executor="ray")
    assert remote.excluded == local.excluded == {}
    a, b = _run_outputs(tmp_path / "local"), _run_outputs(tmp_path / "ray")
    assert len(a["ledger"]) == 4 * 3 and sum(".h5" in k for k in a) == 4 and sum("predictions" in k for k in a) == 2
    assert b == a
