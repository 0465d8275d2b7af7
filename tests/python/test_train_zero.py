"""`scaletrain train` with optim.zero_stage, in one process and as several ranks launched the way
torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; Gloo on the CPU). Reference: the same
run in one process with LibTorch's AdamW (optim.zero_stage 0) accumulating the ranks' batches as
micro-batches: rank r of R takes batch (s * k + i) * R + r, so R ranks with k micro-batches see the
batches of one process with k * R. The losses of every logged step must agree (fp32)."""

import json
import os
import socket
import subprocess

import pytest

from conftest import BUILD, ROOT

BASE = [
    "--config", str(ROOT / "configs/tiny_cpu.yaml"), "--set", "eval.examples=0", "--set", "eval.before_training=false",
    "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=32", "--set", "data.source=text", "--set", f"data.path={ROOT / 'README.md'}",
    "--set", "train.max_steps=8", "--set", "train.batch_size=4", "--set", "train.log_every=1",
    "--set", "train.device=cpu", "--set", "train.threads=1", "--set", "eval.loss_batches=1",
    "--set", "optim.warmup_steps=2", "--set", "optim.lr=3e-3", "--set", "optim.min_lr=3e-4",
    "--set", "optim.bucket_mb=0.01",  # several buckets for this small model
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def train(out_dir, *sets, ranks=1, env_extra=None, extra=()):
    """Runs `scaletrain train` as `ranks` processes; returns rank 0's logged losses and the outputs."""
    args = [str(BUILD / "scaletrain"), "train", *BASE, "--set", f"train.out_dir={out_dir}",
            *[a for s in sets for a in ("--set", s)], *extra]
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = dict(os.environ)
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        env.update(env_extra or {})
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank}: exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
    return losses(out_dir), outputs


def close(a, b, rel=1e-5, n=8):
    assert len(a) == len(b) == n
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, LibTorch's AdamW, 2 micro-batches per step."""
    return train(tmp_path_factory.mktemp("ref"), "train.grad_accum_steps=2")[0]


@pytest.fixture(scope="module")
def reference_two_blocks(tmp_path_factory):
    """As `reference`, with two blocks (stage 3 gathers them one after another)."""
    return train(tmp_path_factory.mktemp("ref2"), "train.grad_accum_steps=2", "model.n_layer=2")[0]


@pytest.mark.parametrize("stage", [1, 2])
def test_one_process_zero_equals_adamw(tmp_path, reference, stage):
    got, _ = train(tmp_path, f"optim.zero_stage={stage}", "train.grad_accum_steps=2")
    close(got, reference)


@pytest.mark.parametrize("sets", [["optim.zero_stage=2", "optim.offload_overlap=false"],
                                  ["optim.zero_stage=1", "optim.offload_fraction=0.5"],
                                  ["optim.zero_stage=3", "optim.offload_fraction=0.4", "model.n_layer=2"]])
def test_one_process_offload_equals_adamw(tmp_path, reference, reference_two_blocks, sets):
    # AdamW's state in host memory (all of it, the CPU step before the next forward or behind it
    # by default; or a share, the rest stepped on the device): the same losses.
    got, _ = train(tmp_path, "optim.cpu_offload=true", "train.grad_accum_steps=2", *sets)
    close(got, reference_two_blocks if "model.n_layer=2" in sets else reference)


@pytest.mark.parametrize("recompute", [False, True])
def test_one_process_stage3_equals_adamw(tmp_path, reference_two_blocks, recompute):
    # Stage 3 gathers each block around its forward and backward (and, with activation
    # checkpointing, around the recomputation inside backward).
    got, _ = train(tmp_path, "optim.zero_stage=3", "train.grad_accum_steps=2", "model.n_layer=2",
                   f"model.activation_checkpointing={str(recompute).lower()}")
    close(got, reference_two_blocks)


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (2, True), (3, False), (3, True)])
def test_two_ranks_equal_one_process(tmp_path, reference, stage, offload):
    got, outputs = train(tmp_path, f"optim.zero_stage={stage}", f"optim.cpu_offload={str(offload).lower()}", ranks=2)
    close(got, reference)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens"] == 8 * 2 * 4 * 32  # steps x ranks x batch x block: both ranks' tokens
    assert "step 8/8" in outputs[0][1] and outputs[1][1].strip() == ""  # rank 1 says nothing
    assert outputs[1][0].strip() == ""


@pytest.mark.parametrize("after", [["optim.zero_stage=2"], ["optim.zero_stage=1", "optim.cpu_offload=true"],
                                   ["optim.zero_stage=3"]])
def test_checkpoint_of_two_ranks_resumes(tmp_path, reference, after):
    # 2 ranks at stage 2 save every 4 steps (ZeroAdamW gathers its state, rank 0 writes); the run
    # resumed from step 4 (at stage 2, or resharded to stage 1 with the state offloaded) logs the
    # losses of the uninterrupted run.
    first, _ = train(tmp_path / "a", "optim.zero_stage=2", "checkpoint.every=4", ranks=2)
    close(first, reference)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    resumed, _ = train(tmp_path / "b", *after, ranks=2,
                       extra=["--resume", str(tmp_path / "a" / "checkpoints" / "step_00000004")])
    close(resumed, first[4:], n=4)


def test_zero_stage_0_under_torchrun_is_refused(tmp_path):
    proc = subprocess.run([str(BUILD / "scaletrain"), "train", *BASE, "--set", f"train.out_dir={tmp_path}"],
                          env=dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                   MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.zero_stage: got 0, but this process is rank 0 of 2 (torchrun): expected 1, 2 or 3" in proc.stderr


def test_cpu_offload_needs_zero(tmp_path):
    proc = subprocess.run([str(BUILD / "scaletrain"), "train", *BASE, "--set", f"train.out_dir={tmp_path}",
                           "--set", "optim.cpu_offload=true"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.cpu_offload: got true with optim.zero_stage 0, expected optim.zero_stage 1, 2 or 3" in proc.stderr


@pytest.mark.parametrize("sets,message", [
    (["optim.zero_stage=2", "optim.offload_fraction=0.5"],
     "optim.offload_fraction: got 0.5 with optim.cpu_offload false, expected optim.cpu_offload true"),
    (["optim.zero_stage=2", "optim.cpu_offload=true", "optim.offload_fraction=0"],
     "optim.offload_fraction"),
])
def test_offload_options_are_checked(tmp_path, sets, message):
    proc = subprocess.run([str(BUILD / "scaletrain"), "train", *BASE, "--set", f"train.out_dir={tmp_path}",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
