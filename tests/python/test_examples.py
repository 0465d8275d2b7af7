"""The Python examples run as a user runs them (python, and torchrun with 2 Gloo ranks) and learn."""
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--steps", "40", "--layers", "1", "--dim", "32", "--heads", "2", "--seq", "32", "--batch", "4"]


def run(command):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]


@pytest.mark.parametrize("extra", [[], ["--cpu-offload", "--stage", "1"], ["--stage", "3"]])
def test_train_gpt_learns(extra):
    losses = run([sys.executable, str(ROOT / "examples/python/train_gpt.py"), *SMALL, *extra])
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0], losses


def test_train_gpt_under_torchrun():
    torchrun = pathlib.Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("no torchrun beside this python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    losses = run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
                  str(ROOT / "examples/python/train_gpt.py"), *SMALL])
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0], losses


def test_hf_gpt2_learns():
    pytest.importorskip("transformers")
    losses = run([sys.executable, str(ROOT / "examples/python/hf_gpt2.py"), "--steps", "30", "--seq", "32",
                  "--batch", "4", "--cpu-offload"])
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0], losses
