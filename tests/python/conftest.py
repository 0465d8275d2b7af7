"""Shared fixtures: the `scaletrain` executable of the build, and the importable package."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("SCALETRAIN_BUILD", ROOT / "build"))
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))


def cuda_available():
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: GPU test skipped")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cli():
    """Runs the scaletrain executable; returns CompletedProcess with text output."""
    exe = BUILD / "scaletrain"
    if not exe.exists():
        pytest.fail(f"{exe} not built: run `make build` first")

    def run(*args, cwd=None, timeout=600):
        return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)

    return run
