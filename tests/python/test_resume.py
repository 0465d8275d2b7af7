"""Checkpoints and `scaletrain train --resume` end to end. Reference: an uninterrupted run of the same
configuration in the same test; every interrupted run must end with a model.pt (and a final
checkpoint trainer.json: progress counters and RNG states) byte-identical to it."""

import json
import os
import random
import subprocess
import time

import pytest

from conftest import BUILD

# A tiny run: ~40 steps in about two seconds on 2 cores, dropout on (so the RNG state matters),
# a checkpoint every 3 steps of which the newest 2 are kept.
TINY_YAML = """\
model: {n_layer: 2, n_head: 2, n_embd: 32, dropout: 0.1}
data: {train_examples: 512, val_examples: 16}
optim: {warmup_steps: 5}
train: {max_steps: 40, batch_size: 4, threads: 1, log_every: 10, device: cpu}
eval: {examples: 0, loss_batches: 1, before_training: false}
checkpoint: {every: 3, keep: 2}
"""


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def train_args(config, out, *extra):
    return [str(BUILD / "scaletrain"), "train", "--config", str(config), "--set", f"train.out_dir={out}", *extra]


def run_to_end(config, out, *extra):
    result = subprocess.run(train_args(config, out, *extra), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def final_state(out):
    """What must match the uninterrupted run bit for bit."""
    return (out / "model.pt").read_bytes(), (out / "checkpoints" / "step_00000040" / "trainer.json").read_bytes()


def kill_during_checkpoint_write(process, checkpoints, skip):
    """SIGKILLs `process` as soon as it has started writing its (skip+1)-th checkpoint, i.e. when a
    new .tmp-step_* folder shows up; returns whether one did before the process ended."""
    before = set(os.listdir(checkpoints)) if checkpoints.exists() else set()
    seen = set()
    while process.poll() is None:
        try:
            seen |= {n for n in os.listdir(checkpoints) if n.startswith(".tmp-step_") and n not in before}
        except FileNotFoundError:
            pass
        if len(seen) > skip:
            process.kill()
            return True
        time.sleep(0.0005)
    return False


def test_sigkill_at_random_moments_then_resume_is_bit_exact(tiny, tmp_path):
    start = time.monotonic()
    run_to_end(tiny, tmp_path / "reference")
    duration = time.monotonic() - start
    reference = final_state(tmp_path / "reference")

    # 15 kills: one right after the start (before the first checkpoint), 10 at seeded random
    # moments over the reference run's duration, 3 while a checkpoint is being written (the
    # temporary folder is there, the rename has not happened), and one after the process ended.
    # Three kills in a row per run folder, each followed by `--resume auto`; a run resumed late
    # ends sooner, so some random kills land after the end as well.
    rng = random.Random(1234)
    moments = ([("after", 0.05)] + [("after", rng.uniform(0.1, duration)) for _ in range(10)] +
               [("in write", rng.randrange(4)) for _ in range(3)] + [("after end", None)])
    rng.shuffle(moments)
    outcomes = {"running": 0, "ended": 0, "in a checkpoint write": 0, "temporary folder left": 0}
    for sequence in range(len(moments) // 3):
        out = tmp_path / f"killed{sequence}"
        checkpoints = out / "checkpoints"
        for kind, value in moments[3 * sequence: 3 * sequence + 3]:
            process = subprocess.Popen(train_args(tiny, out, "--resume", "auto"), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
            if kind == "in write":
                outcomes["in a checkpoint write"] += kill_during_checkpoint_write(process, checkpoints, value)
            elif kind == "after end":
                process.wait(timeout=300)
            else:
                time.sleep(value)
            outcomes["running" if process.poll() is None else "ended"] += 1
            process.kill()  # SIGKILL (nothing when the process has ended)
            stderr = process.communicate(timeout=60)[1]
            assert "warning" not in stderr and "error" not in stderr, stderr
            if checkpoints.exists() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
                outcomes["temporary folder left"] += 1
        result = run_to_end(tiny, out, "--resume", "auto")
        # A checkpoint is complete or absent: never one that fails verification.
        assert "skipping checkpoint" not in result.stderr, result.stderr
        assert final_state(out) == reference, f"run folder {out} differs from the uninterrupted run"
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["kind"] == "eval" and records[-1]["step"] == 40
    print(f"kills: {outcomes}, reference run {duration:.2f}s")
    assert outcomes["in a checkpoint write"] >= 1 and outcomes["ended"] >= 1, outcomes


def test_corrupt_checkpoints_are_named(tiny, tmp_path, cli):
    out = tmp_path / "run"
    run_to_end(tiny, out, "--set", "train.max_steps=9")
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000006", "step_00000009"]

    # A truncated file in the newest checkpoint: --resume auto warns and takes the older one.
    model = checkpoints / "step_00000009" / "model.pt"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[: size - 100])
    result = run_to_end(tiny, out, "--set", "train.max_steps=9", "--resume", "auto")
    assert (f"warning skipping checkpoint '{checkpoints}/step_00000009': model.pt is {size - 100} bytes, "
            f"the manifest says {size} (truncated?)") in result.stderr
    assert f"resumed from checkpoint '{checkpoints}/step_00000006' at step 6" in result.stderr

    # One flipped bit: --resume PATH fails with one line naming the file.
    optimizer = checkpoints / "step_00000009" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x10
    optimizer.write_bytes(bytes(data))
    result = cli("train", "--config", tiny, "--set", f"train.out_dir={out}", "--resume", checkpoints / "step_00000009")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: checkpoint '{checkpoints}/step_00000009': optimizer.pt: checksum mismatch "
                               "(corrupt): CRC-32 is "), lines[0]


def test_resume_rules(tiny, tmp_path, cli):
    out = tmp_path / "run"
    # Nothing to resume yet: auto starts from step 0.
    result = run_to_end(tiny, out, "--set", "train.max_steps=6", "--resume", "auto")
    assert f"no checkpoint in {out}/checkpoints, starting from step 0" in result.stderr
    # Another model cannot continue this run; a longer one can.
    result = cli("train", "--config", tiny, "--set", f"train.out_dir={out}", "--set", "model.n_layer=3",
                 "--resume", "auto")
    assert result.returncode == 2, result.stderr
    assert (f"error: model.n_layer: checkpoint '{out}/checkpoints/step_00000006' was trained with model.n_layer=2, "
            "the config says 3") in result.stderr
    result = run_to_end(tiny, out, "--set", "train.max_steps=9", "--resume", "auto")
    assert "resuming with changed settings: train.max_steps 6 -> 9" in result.stderr
    assert "== summary: 9 steps on cpu" in result.stdout
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "eval", "resume", "train", "eval"]
