"""Build the damaged grid-file fixtures from a valid tiles file, by a seeded search over byte mutations.

    python tests/data/damaged/make_damaged_grids.py [--trials 3000] [--seed 0]

1. ``valid_tiles.h5`` is written once (a 6 × 8 lattice of 40 tiles, by the project's own writer) and kept:
   the mutations below are offsets into its bytes.
2. Each trial copies the valid file, overwrites 1 to 8 random bytes (seeded: trial t uses
   ``random.Random(seed * 1_000_003 + t)``) and reads the copy with ``read_tile_grid`` in a child process
   with a time limit. The child either returns (a clear error, or a successful read) or dies by a signal
   (a crash inside the HDF5 library) or runs past the limit (a hang).
3. The first crashing and the first hanging mutation are written to ``mutations.json``; the fixtures
   ``crash_tiles.h5`` and ``hang_tiles.h5`` are the valid file with those bytes replaced
   (:func:`apply_mutation`, also used by the tests).
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

_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {here!r})
from make_damaged_grids import apply_mutation, mutation
from wsi2dmamba.errors import WsiError
from wsi2dmamba.grid import read_tile_grid
seed, first, last, probe = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
data = Path({valid!r}).read_bytes()
for t in range(first, last):
    probe.write_bytes(apply_mutation(data, mutation(seed, t, len(data))))
    print(t, flush=True)
    try:
        read_tile_grid(probe)
    except WsiError:
        pass
"""


def write_valid(path: Path) -> None:
    import numpy as np

    from wsi2dmamba.grid import TileGrid, write_tile_grid

    rows, cols = np.nonzero(np.ones((6, 8), bool))
    keep = np.arange(rows.size) % 6 != 5  # 40 of 48 cells hold a tile
    rows, cols = rows[keep], cols[keep]
    grid = TileGrid(slide_id="valid", coords=np.stack([cols * 512, rows * 512], 1), index=np.stack([rows, cols], 1),
                    shape=(6, 8), tissue_fraction=np.linspace(0.2, 1.0, rows.size), origin_level0=(0.0, 0.0),
                    stride_level0=512.0, tile_size_level0=512.0, tile_px=256, stride_px=256, mpp_requested=1.0,
                    mpp_effective=1.0, mpp_level0=0.5, read_level=0, read_downsample=1.0,
                    level0_size=(4096, 3072), slide_path="valid.svs", params_hash="0" * 16)
    write_tile_grid(path, grid)


def mutation(seed: int, trial: int, size: int) -> list[tuple[int, int]]:
    """(offset, new byte) pairs of one trial."""
    rng = random.Random(seed * 1_000_003 + trial)
    return [(rng.randrange(size), rng.randrange(256)) for _ in range(rng.randint(1, 8))]


def apply_mutation(data: bytes, pairs: list[list[int]] | list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for offset, value in pairs:
        buf[offset] = value
    return bytes(buf)


def outcome(path: Path, time_limit: float = TIME_LIMIT_S) -> str:
    """How ``read_tile_grid`` fares on one file in a child process: "crash" (killed by a signal), "hang"
    (past the limit) or "ok" (it returned or raised, whatever it said)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys\nfrom wsi2dmamba.errors import WsiError\nfrom wsi2dmamba.grid import read_tile_grid\n"
            "try:\n    read_tile_grid(sys.argv[1])\nexcept WsiError:\n    pass\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                              timeout=time_limit, check=False)
    except subprocess.TimeoutExpired:
        return "hang"
    return "crash" if proc.returncode < 0 else "ok"


def _trials(seed: int, first: int, last: int, probe: Path) -> tuple[str, int]:
    """Run trials first..last-1 in one child; return ("end", last) or (outcome, trial) at the first crash
    or hang."""
    import selectors

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")])}
    code = _CHILD.format(here=str(HERE), valid=str(VALID))
    proc = subprocess.Popen([sys.executable, "-c", code, str(seed), str(first), str(last), str(probe)], env=env,
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


def search(seed: int, trials: int) -> dict:
    if not VALID.exists():
        write_valid(VALID)
    data = VALID.read_bytes()
    found: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.h5"
        t = 0
        while t < trials and len(found) < 2:
            result, at = _trials(seed, t, trials, probe)
            if result == "end":
                break
            if result not in found:
                found[result] = {"seed": seed, "trial": at, "pairs": mutation(seed, at, len(data))}
                print(f"trial {at}: {result} {found[result]['pairs']}", flush=True)
            t = at + 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    found = search(args.seed, args.trials)
    MUTATIONS.write_text(json.dumps(found, indent=2) + "\n")
    data = VALID.read_bytes()
    for kind, m in found.items():
        (HERE / f"{kind}_tiles.h5").write_bytes(apply_mutation(data, m["pairs"]))
    print(f"found: {sorted(found)}")


if __name__ == "__main__":
    main()
