"""The fuzz job's machinery: seeded mutations of valid inputs, and a child process that runs the HDF5
parsers, so that a crash (a signal) or a hang of the HDF5 library is observed instead of ending the job.

Every input is drawn from ``random.Random(f"{seed}:{target}:{i}")``: a finding names its seed and index,
and the same pair rebuilds the same input (:func:`mutate_bytes`, :func:`random_clam_trident`, …).
"""

from __future__ import annotations

import json
import os
import random
import selectors
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

# ------------------------------------------------------------------------------------------- the child

# Reads one JSON request per line ({"target", "path", "fmt", "mpp", "coords_file", "out"}), answers one JSON
# line: {"ok": true} or {"error": class name, "module": its module, "message": …}.
_CHILD = textwrap.dedent("""
    import json, sys, traceback
    from wsi2dmamba.grid import read_feature_grid, read_tile_grid, write_feature_grid
    from wsi2dmamba.features.importers import import_feature_file

    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["target"] == "tiles":
                read_tile_grid(req["path"])
            elif req["target"] == "features":
                read_feature_grid(req["path"])
            else:
                grid = import_feature_file(req["path"], req["fmt"], mpp=req["mpp"], coords_file=req["coords_file"])
                write_feature_grid(req["out"], grid)  # what import writes must be a valid grid file
                read_feature_grid(req["out"])
            answer = {"ok": True}
        except BaseException as exc:
            answer = {"error": type(exc).__name__, "module": type(exc).__module__,
                      "message": str(exc)[:300], "traceback": traceback.format_exc()[-1500:]}
        print(json.dumps(answer), flush=True)
""")


@dataclass
class Outcome:
    """What one input did: ``"ok"``, ``"error"`` (an exception: ``error`` is its class and module),
    ``"crash"`` (the child died: ``message`` has its exit status) or ``"hang"`` (no answer in time)."""

    kind: str
    error: str = ""
    message: str = ""
    traceback: str = ""


class ParserChild:
    """A child process running the HDF5 parsers, one request at a time, replaced after a crash or hang."""

    def __init__(self, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        # The variable tells readers that guard their own input that this process is the guarding child.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WSI2DMAMBA_HDF5_CHECKING": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                              os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, request: dict) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        proc = self.proc
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            return self._ended(proc)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=self.timeout_s)
        sel.close()
        if not ready:
            proc.kill()
            proc.wait()
            self.proc = None
            return Outcome("hang", message=f"no answer within {self.timeout_s:g} s")
        line = proc.stdout.readline()
        if not line:
            return self._ended(proc)
        answer = json.loads(line)
        if answer.get("ok"):
            return Outcome("ok")
        return Outcome("error", f"{answer['module']}.{answer['error']}", answer["message"], answer["traceback"])

    def _ended(self, proc: subprocess.Popen) -> Outcome:
        code = proc.wait()
        self.proc = None
        return Outcome("crash", message=f"the parser's process ended with status {code}")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def is_own_error(outcome: Outcome) -> bool:
    """An exception of the project's own classes (``wsi2dmamba.errors``)."""
    return outcome.error.startswith("wsi2dmamba.errors.")


# ------------------------------------------------------------------------------------------- mutations

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """1–8 damages of a file's bytes: bit flips, random bytes, zeroed runs, copied blocks, truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not buf:
            break
        op = rng.choice(["flip", "flip", "flip", "byte", "run", "zero", "copy", "truncate"])
        at = rng.randrange(len(buf))
        if op == "flip":
            buf[at] ^= 1 << rng.randrange(8)
        elif op == "byte":
            buf[at] = rng.randrange(256)
        elif op == "run":
            n = rng.randint(2, 16)
            buf[at:at + n] = bytes(rng.randrange(256) for _ in range(n))
        elif op == "zero":
            n = rng.randint(1, 64)
            buf[at:at + n] = bytes(min(n, len(buf) - at))
        elif op == "copy":
            src, n = rng.randrange(len(buf)), rng.randint(4, 256)
            block = buf[src:src + n]
            buf[at:at + len(block)] = block
        else:
            del buf[rng.randrange(max(1, len(buf) // 8), len(buf)):]
    return bytes(buf)


ODD_VALUES = [
    "", "x", "None", "20", b"\xff\xfe", -1, 0, 1, 3, 2**31, 2**62, -(2**40), 0.0, -0.5, 1e-300, 1e300,
    float("nan"), float("inf"), -float("inf"), True, np.zeros(0), np.array([1]), np.array([1, 2]),
    np.array([0, 0]), np.array([3, 4, 5]), np.array([[1, 2], [3, 4]]), np.array(["a", "b"]), np.array([np.nan, 1.0]),
    np.array([1e300, 1e300]), np.array([-5, 7]), np.array([True, False]),
]


def _odd(rng: random.Random):
    return ODD_VALUES[rng.randrange(len(ODD_VALUES))]


def _coords(rng: random.Random, n: int, step: int) -> np.ndarray:
    cells = rng.sample(range(64), min(n, 64))
    xy = np.array([[c % 8 * step, c // 8 * step] for c in cells], np.int64)
    kind = rng.random()
    if kind < 0.55:
        return xy
    odd = [np.full_like(xy, -step), xy.astype(np.float64) + rng.choice([0.3, np.nan, np.inf, 1e300]),
           np.zeros_like(xy), xy * rng.choice([2**20, 2**28, 2**40]), xy[:, :1], np.concatenate([xy, xy[:1]]),
           xy.astype(np.uint8), xy.astype(np.float16), np.zeros((0, 2), np.int64), xy.reshape(-1)]
    return odd[rng.randrange(len(odd))]


def random_clam_trident(path: Path, rng: random.Random) -> dict:
    """Write a CLAM or TRIDENT-like feature file with odd attributes, coordinates or features; return the
    import request for it (format, mpp, patch file)."""
    fmt = rng.choice(["clam", "trident"])
    n = rng.choice([0, 1, 2, 5, 12, 30])
    step = rng.choice([224, 256, 448, 512])
    coords = _coords(rng, n, step) if n else np.zeros((0, 2), np.int64)
    m = coords.shape[0] if coords.ndim else 1
    dim = rng.choice([1, 8, 33])
    feats = np.random.default_rng(rng.randrange(2**32)).normal(size=(m, dim)).astype(np.float32)
    r = rng.random()
    if r < 0.1:
        feats = feats.reshape(-1)
    elif r < 0.2:
        feats = feats[: max(0, m - 1)]
    elif r < 0.3:
        feats = np.where(feats > 1.5, np.nan, feats).astype(rng.choice([np.float32, np.float16, np.float64]))
    elif r < 0.35:
        feats = feats.astype(np.int8)
    attrs = ({"patch_size": step // 2, "patch_size_level0": step, "level0_magnification": 20,
              "target_magnification": 10, "overlap": 0, "level0_width": 8 * step, "level0_height": 8 * step}
             if fmt == "trident" else
             {"patch_size": step, "patch_level": 0, "downsample": np.array([1.0, 1.0]), "downsample_level0": 1,
              "level_dim": np.array([8 * step, 8 * step]), "name": "s"})
    for _ in range(rng.randint(0, 3)):
        key = rng.choice(list(attrs) + ["custom_downsample", "encoder"])
        if rng.random() < 0.25:
            attrs.pop(key, None)
        else:
            attrs[key] = _odd(rng)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        ds = f.create_dataset("coords", data=coords)
        extra = {"encoder": _odd(rng)} if rng.random() < 0.2 else {}
        for obj, values in ((ds, attrs), (f["features"], extra)):
            for k, v in values.items():
                try:
                    obj.attrs[k] = v
                except (TypeError, ValueError):  # a value HDF5 cannot store: leave it out
                    pass
    if rng.random() < 0.3:
        path.write_bytes(mutate_bytes(path.read_bytes(), rng))
    mpp = rng.choice([None, 0.5, 0.25, 2.0, 1e-300, 1e300, 0.0, -1.0]) if fmt == "trident" else \
        rng.choice([0.5, 0.25, None, 1e300, float("nan")])
    mpp = None if mpp is not None and isinstance(mpp, float) and mpp != mpp and rng.random() < 0.5 else mpp
    return {"target": "import", "path": str(path), "fmt": fmt, "mpp": mpp, "coords_file": None}


MANIFEST_COLUMNS = ["slide_id", "path", "patient_id", "label", "time", "event", "mpp", "site", "", " label"]
MANIFEST_CELLS = ["", " ", "a", "s1", "1", "0", "-1", "nan", "inf", "1e300", "1e-300", "0.5", "true", "2",
                  "x.svs", "../x.svs", "/", ".", "..", "a/b", "~", "~nosuchuser/x", "--help", ".tmp-a", "é" * 120,
                  "x" * 260, "\u202e", "\t", '"', ",", "\n", "NA"]


MANIFEST_TYPICAL = {"slide_id": None, "path": "s1.svs", "patient_id": "p1", "label": "a", "time": "12.5",
                    "event": "1", "mpp": "0.5", "site": "x", "": "", " label": "b"}


def random_manifest(rng: random.Random) -> bytes:
    """Manifest bytes: a valid manifest with odd headers, cells, separators, ragged rows or encodings."""
    if rng.random() < 0.03:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 120)))
    header = ["slide_id", *rng.sample(MANIFEST_COLUMNS[1:], rng.randint(0, 4))]
    if rng.random() < 0.1:
        header[0] = rng.choice(MANIFEST_COLUMNS)
    rows = []
    for r in range(rng.choice([0, 1, 2, 3, 5, 6])):
        row = [f"s{r}" if c == "slide_id" else MANIFEST_TYPICAL.get(c, "") for c in header]
        for _ in range(rng.choice([0, 0, 1, 2])):
            row[rng.randrange(len(row))] = rng.choice(MANIFEST_CELLS)
        if rng.random() < 0.08:
            row = row[:-1] if rng.random() < 0.5 else [*row, rng.choice(MANIFEST_CELLS)]
        rows.append(row)
    sep = rng.choice([",", ",", ",", ",", ";", "\t"])

    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in (sep, '"', "\n", "\r")) else v

    text = "\n".join(sep.join(cell(c) for c in row) for row in [header, *rows]) + rng.choice(["\n", "", "\r\n"])
    enc = rng.choice(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"])
    try:
        return text.encode(enc)
    except UnicodeEncodeError:
        return text.encode("utf-8")


PIPELINE_KEYS = {
    "cohort": ["manifest", "slides_dir", "splits_dir", "nope"],
    "demo": ["slides", "seed", "nope"],
    "run": ["out", "workers", "name", "train_dir", "nope"],
    "segment": ["seg_mpp", "threshold", "saturation_threshold", "nope"],
    "tile": ["tile_px", "mpp", "overlap", "min_tissue", "segment"],
    "extract": ["encoder", "device", "batch_size", "workers", "precision", "weights"],
    "train": ["models", "model_options", "task", "folds", "epochs", "lr", "device", "select_on"],
    "evaluate": ["n_boot", "seed", "nope"],
    "other": ["x"],
}
PIPELINE_VALUES = ['"m.csv"', '"~nosuchuser/m.csv"', '"a\\u0000b"', '"$HOME/x"', '"/"', '""', "0", "-1", "3",
                   "1e300", "-1e300", "nan", "inf", "true", '["abmil"]', '["nosuch"]', '["2dmambamil:paper"]',
                   '["abmil", "abmil"]', "[]", "[1, 2]", "{}", '{abmil = {hidden = 8}}', '{abmil = {in_dim = 3}}',
                   '{abmil = {hidden = "x"}}', '"cuda:9"', '"cpu"', '"otsu"', '"fixed"', '"efficientnet-lite0"',
                   '"no-such"', '"survival"', '"auc"', "2026-01-01", '"x" ', "{ a = 1 }"]


def random_pipeline(rng: random.Random) -> str:
    """Pipeline TOML text: a valid pipeline with 0–4 changes (a key added, replaced or removed, a table added
    or removed, any value of any type), sometimes damaged TOML or not TOML at all."""
    if rng.random() < 0.03:
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randint(0, 80)))
    doc: dict[str, dict[str, str]] = {"cohort": {"manifest": '"m.csv"'}, "train": {"models": '["abmil"]'}}
    if rng.random() < 0.5:
        doc["tile"] = {"mpp": "1.0"}
        doc["extract"] = {"encoder": '"efficientnet-lite0"', "device": '"cpu"'}
    for _ in range(rng.randint(0, 4)):
        op = rng.random()
        table = rng.choice(list(PIPELINE_KEYS))
        if op < 0.6:
            doc.setdefault(table, {})[rng.choice(PIPELINE_KEYS[table])] = rng.choice(PIPELINE_VALUES)
        elif op < 0.8 and doc.get(table):
            doc[table].pop(rng.choice(list(doc[table])))
        elif op < 0.9:
            doc.pop(table, None)
        else:
            doc.setdefault(table, {})
    lines = [line for t, keys in doc.items() for line in [f"[{t}]", *(f"{k} = {v}" for k, v in keys.items())]]
    if rng.random() < 0.05:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice(["[train", "x =", "= 1", "[[a]]", "a.b = 1"]))
    return "\n".join(lines) + "\n"


@dataclass
class Finding:
    target: str
    index: int
    outcome: Outcome
    reproducer: str

    def line(self) -> str:
        what = self.outcome.error or self.outcome.kind
        return (f"{self.target} #{self.index}: {what}: {self.outcome.message} (input kept at {self.reproducer})\n"
                f"{self.outcome.traceback}")


def seeded(seed: int, target: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{target}:{index}")


def deadline(seconds: float) -> float:
    return time.monotonic() + seconds
