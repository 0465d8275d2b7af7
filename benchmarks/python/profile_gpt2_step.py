"""Where a GPT-2 124M training step (B16 x T1024, bf16 autocast, AdamW, clipping at 1.0) spends its
time on the GPU, by kind of kernel: scaletrain's trainer (run in this process through
scaletrain.train), the PyTorch twin of its model (benchmarks/python/torch_gpt.py) and a
nanoGPT-style model (benchmarks/python/nanogpt_ref.py), both eager with AdamW(fused=True).

    python benchmarks/python/profile_gpt2_step.py --build build-gpu --out benchmarks/results/profile_gpt2_h200.json

Each side runs twice under torch.profiler (CUPTI kernel records), with S and L optimizer steps; the
per-step numbers are (L - S) / (L - S) differences, so start-up, warm-up and the final evaluation
cancel out. `host gaps` is wall time per step minus the GPU's busy time per step.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "python"))
from nanogpt_ref import NanoGPT  # noqa: E402
from torch_gpt import GPT  # noqa: E402

B, T, VOCAB, PADDED = 16, 1024, 50257, 50304

KINDS = [  # first match wins; matched against the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "increment_steps")),
    ("gradient pass (unscale, inf check, norm, clip)",
     ("check_kernel", "finalize_kernel", "scale_kernel", "non_finite", "norm", "unscale")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "splitk")),
    ("cross-entropy / softmax", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("LayerNorm", ("layer_norm", "layernorm")),
    ("embedding", ("embedding", "index_put", "indexing_backward", "index_select", "gather", "scatter")),
    ("memset / copy", ("memset", "memcpy", "copy_kernel", "fill")),
]


def kind_of(name):
    lower = name.lower()
    for kind, needles in KINDS:
        if any(n in lower for n in needles):
            return kind
    return "elementwise / other"


def kernel_times(prof):
    """Total CUDA time (ms) per kernel name and per kind."""
    by_name = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name] += event.device_time_total / 1000.0
    by_kind = collections.Counter()
    for name, ms in by_name.items():
        by_kind[kind_of(name)] += ms
    return by_name, by_kind


def measure(run, short, long):
    """Per-step kernel time by kind and by name, and wall time, from runs of `short` and `long` steps."""
    results = []
    for steps in (short, long):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            wall = run(steps)
            torch.cuda.synchronize()
        results.append((wall, *kernel_times(prof)))
    (w0, n0, k0), (w1, n1, k1) = results
    d = long - short
    kinds = {k: (k1[k] - k0.get(k, 0.0)) / d for k in k1}
    names = {n: (n1[n] - n0.get(n, 0.0)) / d for n in n1}
    return (w1 - w0) * 1000.0 / d, kinds, names


def ours_runner(tokens, work):
    import scaletrain

    def run(steps):
        out = Path(work) / f"ours_{steps}"
        start = time.perf_counter()
        scaletrain.train(str(ROOT / "configs/gpt2_124m.yaml"), [
            f"data.path={tokens}", "amp.precision=bf16", f"train.max_steps={steps}", "train.grad_accum_steps=1",
            "train.log_every=1000", f"train.out_dir={out}", "train.save_model=false", "eval.every=0",
            "eval.loss_batches=1"])
        return time.perf_counter() - start
    return run


def torch_runner(tokens, kind):
    data = np.memmap(tokens, dtype=np.uint16, mode="r")

    def run(steps):
        start = time.perf_counter()
        torch.manual_seed(0)
        model = (NanoGPT(vocab_size=PADDED) if kind == "nanogpt" else GPT(vocab_size=PADDED)).cuda()
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            offsets = rng.integers(0, len(data) - T - 1, B)
            batch = torch.from_numpy(np.stack([data[o:o + T + 1].astype(np.int64) for o in offsets]))
            batch = batch.pin_memory().cuda(non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        loss.item()
        return time.perf_counter() - start
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=str(ROOT / "build"), help="unused; the module comes from python/")
    parser.add_argument("--out", help="JSON file")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_gpt2_step: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sides = {}
    with tempfile.TemporaryDirectory() as work:
        tokens = Path(work) / "tokens.bin"
        np.random.default_rng(0).integers(0, VOCAB, 5_000_000, dtype=np.uint16).tofile(tokens)
        for label, run in (("scaletrain", ours_runner(tokens, work)),
                           ("PyTorch twin eager", torch_runner(tokens, "twin")),
                           ("nanoGPT-style eager", torch_runner(tokens, "nanogpt"))):
            sides[label] = measure(run, args.short, args.long)
            torch.cuda.empty_cache()
    kinds = sorted({k for _, ks, _ in sides.values() for k in ks}, key=lambda k: -sides["scaletrain"][1].get(k, 0))
    header = f"{'ms per step':<48}" + "".join(f"{label:>22}" for label in sides)
    print(header)
    rows = []
    for k in kinds:
        print(f"{k:<48}" + "".join(f"{ks.get(k, 0.0):>22.3f}" for _, ks, _ in sides.values()))
    busy = {label: sum(ks.values()) for label, (_, ks, _) in sides.items()}
    print(f"{'GPU busy':<48}" + "".join(f"{busy[label]:>22.3f}" for label in sides))
    print(f"{'host gaps (wall - busy)':<48}" + "".join(f"{w - busy[label]:>22.3f}" for label, (w, _, _) in sides.items()))
    print(f"{'wall':<48}" + "".join(f"{w:>22.3f}" for w, _, _ in sides.values()))
    for label, (wall, ks, names) in sides.items():
        top = sorted(names.items(), key=lambda kv: -kv[1])[:15]
        print(f"\n{label}: top kernels (ms per step)")
        for name, ms in top:
            print(f"  {ms:8.3f}  {kind_of(name):<22} {name[:110]}")
        rows.append({"side": label, "wall_ms": round(wall, 3), "gpu_busy_ms": round(busy[label], 3),
                     "host_gaps_ms": round(wall - busy[label], 3),
                     "kinds_ms": {k: round(v, 3) for k, v in sorted(ks.items(), key=lambda kv: -kv[1])},
                     "top_kernels_ms": [[n, round(ms, 3)] for n, ms in top]})
    if args.out:
        commit = os.environ.get("SCALETRAIN_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit or "unknown",
             "date": date.today().isoformat(), "command": " ".join(["python"] + sys.argv), "batch": B,
             "sequence": T, "sides": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
