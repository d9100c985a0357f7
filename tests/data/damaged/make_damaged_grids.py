"""Build the damaged HDF5 fixtures from valid files, by a seeded search over byte mutations.

    python tests/data/damaged/make_damaged_grids.py [--layout tiles|clam|trident] [--trials 20000] [--seed 0]

1. A valid file of the layout is written once and kept (its bytes are what the mutations change):
   ``valid_tiles.h5``, a wsi2dmamba tiles file of 40 tiles on a 6 × 8 lattice (the project's writer), or
   ``valid_clam.h5`` / ``valid_trident.h5``, a CLAM / TRIDENT feature file of 40 tiles × 32 features
   (``features`` and ``coords``, chunked, with the attributes each tool writes).
2. Each trial copies the valid file, overwrites 1 to 8 random bytes (seeded: trial t uses
   ``random.Random(seed * 1_000_003 + t)``) and reads the copy in a child process with a time limit, with
   the reader a stage uses (``read_tile_grid``, or the reader of ``import-features``). The child returns
   (a clear error, or a successful read), dies by a signal (a crash inside the HDF5 library) or runs past
   the limit (a hang). Trials run one after another in one child, replaced after each crash or hang.
3. The first crashing and the first hanging mutation are recorded in ``mutations.json`` (per layout); the
   fixtures ``crash_<layout>.h5`` and ``hang_<layout>.h5`` are the valid file with those bytes replaced
   (:func:`apply_mutation`, also used by the tests to check that they are built from the valid file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VALID = HERE / "valid_tiles.h5"
MUTATIONS = HERE / "mutations.json"
TIME_LIMIT_S = 5.0
LAYOUTS = ("tiles", "clam", "trident")

# The child reads with the stage's reader; the environment variable stops the importer's reader from
# checking its input in a child of its own (the search wants to see the crash itself).
_READ = {
    "tiles": "from wsi2dmamba.grid import read_tile_grid as read",
    "clam": "from wsi2dmamba.features.importers import _read_feature_file as read",
    "trident": "from wsi2dmamba.features.importers import _read_feature_file as read",
}

_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {here!r})
from make_damaged_grids import apply_mutation, mutation
from wsi2dmamba.errors import WsiError
{reader}
seed, first, last, probe = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
data = Path({valid!r}).read_bytes()
for t in range(first, last):
    if t >= 0:
        probe.write_bytes(apply_mutation(data, mutation(seed, t, len(data))))
    print(t, flush=True)
    try:
        read(probe)
    except WsiError:
        pass
"""


def valid_path(layout: str) -> Path:
    return HERE / f"valid_{layout}.h5"


def write_valid(path: Path, layout: str = "tiles") -> None:
    import numpy as np

    rows, cols = np.nonzero(np.ones((6, 8), bool))
    keep = np.arange(rows.size) % 6 != 5  # 40 of 48 cells hold a tile
    rows, cols = rows[keep], cols[keep]
    coords = np.stack([cols * 512, rows * 512], 1).astype(np.int64)
    if layout in ("clam", "trident"):
        _write_foreign(path, layout, coords)
        return
    from wsi2dmamba.grid import TileGrid, write_tile_grid

    grid = TileGrid(slide_id="valid", coords=coords, index=np.stack([rows, cols], 1),
                    shape=(6, 8), tissue_fraction=np.linspace(0.2, 1.0, rows.size), origin_level0=(0.0, 0.0),
                    stride_level0=512.0, tile_size_level0=512.0, tile_px=256, stride_px=256, mpp_requested=1.0,
                    mpp_effective=1.0, mpp_level0=0.5, read_level=0, read_downsample=1.0,
                    level0_size=(4096, 3072), slide_path="valid.svs", params_hash="0" * 16)
    write_tile_grid(path, grid)


def _write_foreign(path: Path, layout: str, coords) -> None:
    """A CLAM or TRIDENT feature file of 40 tiles × 32 features, with the attributes each tool writes."""
    import h5py
    import numpy as np

    feats = np.random.default_rng(0).standard_normal((len(coords), 32)).astype(np.float32)
    with h5py.File(path, "w") as f:
        fd = f.create_dataset("features", data=feats, maxshape=(None, 32), chunks=(len(coords), 32))
        d = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(len(coords), 2))
        if layout == "clam":
            d.attrs["patch_size"] = 512
            d.attrs["patch_level"] = 0
            return
        for key, value in {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                           "target_magnification": 20, "level0_width": 4096, "level0_height": 3072,
                           "overlap": 0, "name": "valid", "savetodir": "patches"}.items():
            d.attrs[key] = value
        fd.attrs["name"] = "valid"
        fd.attrs["encoder"] = "conch_v15"


def mutation(seed: int, trial: int, size: int) -> list[tuple[int, int]]:
    """(offset, new byte) pairs of one trial."""
    rng = random.Random(seed * 1_000_003 + trial)
    return [(rng.randrange(size), rng.randrange(256)) for _ in range(rng.randint(1, 8))]


def apply_mutation(data: bytes, pairs: list[list[int]] | list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for offset, value in pairs:
        buf[offset] = value
    return bytes(buf)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")]),
            "WSI2DMAMBA_HDF5_CHECKING": "1"}


def outcome(path: Path, time_limit: float = TIME_LIMIT_S, layout: str = "tiles") -> str:
    """How the stage's reader fares on one file in a child process: "crash" (killed by a signal), "hang"
    (past the limit) or "ok" (it returned or raised, whatever it said)."""
    code = _CHILD.format(here=str(HERE), valid=str(path), reader=_READ[layout])
    try:  # trial -1 reads the file as it is
        proc = subprocess.run([sys.executable, "-c", code, "0", "-1", "0", str(path)], env=_env(),
                              capture_output=True, timeout=time_limit, check=False)
    except subprocess.TimeoutExpired:
        return "hang"
    return "crash" if proc.returncode < 0 else "ok"


def _trials(layout: str, seed: int, first: int, last: int, probe: Path) -> tuple[str, int]:
    """Run trials first..last-1 in one child; return ("end", last) or (outcome, trial) at the first crash
    or hang."""
    import selectors

    code = _CHILD.format(here=str(HERE), valid=str(valid_path(layout)), reader=_READ[layout])
    proc = subprocess.Popen([sys.executable, "-c", code, str(seed), str(first), str(last), str(probe)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    current = first - 1
    try:
        while True:
            if not sel.select(timeout=TIME_LIMIT_S):
                return "hang", current
            line = proc.stdout.readline()
            if not line:
                rc = proc.wait()
                return ("crash", current) if rc < 0 else ("end", last)
            current = int(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def search(layout: str, seed: int, trials: int) -> dict:
    valid = valid_path(layout)
    if not valid.exists():
        write_valid(valid, layout)
    size = valid.stat().st_size
    found: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        t = 0
        while t < trials and len(found) < 2:
            result, at = _trials(layout, seed, t, trials, probe)
            if result == "end":
                break
            if result not in found:
                found[result] = {"seed": seed, "trial": at, "pairs": mutation(seed, at, size)}
                print(f"{layout} trial {at}: {result} {found[result]['pairs']}", flush=True)
            t = at + 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=LAYOUTS, default="tiles")
    ap.add_argument("--trials", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    found = search(args.layout, args.seed, args.trials)
    recorded = json.loads(MUTATIONS.read_text()) if MUTATIONS.exists() else {}
    recorded[args.layout] = found
    MUTATIONS.write_text(json.dumps(recorded, indent=2) + "\n")
    data = valid_path(args.layout).read_bytes()
    for kind, m in found.items():
        (HERE / f"{kind}_{args.layout}.h5").write_bytes(apply_mutation(data, m["pairs"]))
    print(f"found: {sorted(found)}")


if __name__ == "__main__":
    main()
