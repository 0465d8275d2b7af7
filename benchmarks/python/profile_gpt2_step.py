"""Where a GPT-2 124M training step (B16 x T1024, bf16 autocast, AdamW, clipping at 1.0, TF32 off)
spends its GPU time, by kind of kernel: scaletrain's trainer (`scaletrain train --profile`), the
PyTorch twin of its model (benchmarks/python/torch_gpt.py) and a nanoGPT-style model
(benchmarks/python/nanogpt_ref.py), both eager with AdamW(fused=True). All three record the same
window (steps FIRST..FIRST+COUNT-1, after warm-up) with the CUDA activity of LibTorch's profiler
(Kineto/CUPTI) only, so the host is not slowed by per-op records.

    python benchmarks/python/profile_gpt2_step.py --build build-gpu --out benchmarks/results/profile_gpt2_h200.json

Per step: milliseconds of kernels of each kind, the GPU's busy time (their sum) and the host gaps
(wall time minus busy time: the GPU idles while the host prepares work).
"""

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from nanogpt_ref import NanoGPT  # noqa: E402
from torch_gpt import GPT  # noqa: E402
from bench_results import write_results  # noqa: E402

B, T, VOCAB, PADDED = 16, 1024, 50257, 50304

KINDS = [  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "increment_steps")),
    ("LayerNorm", ("layer_norm", "layernorm", "gammabeta")),
    ("gradient pass (inf check, norm, clip)",
     ("check_kernel", "finalize_kernel", "scale_kernel", "non_finite", "norm", "unscale")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "splitk")),
    ("cross-entropy / softmax", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("embedding", ("embedding", "index_put", "indexing_backward", "index_select", "gather", "scatter")),
    ("memset / copy", ("memset", "memcpy", "copy_kernel", "fill")),
    ("reduction", ("reduce_kernel", "sum_kernel")),
]


def kind_of(name):
    lower = name.lower()
    for kind, needles in KINDS:
        if any(n in lower for n in needles):
            return kind
    return "elementwise / other"


def ours(exe, tokens, first, count, work, extra=()):
    out = Path(work) / "ours"
    prof = Path(work) / "ours_profile.json"
    cmd = [str(exe), "train", "--config", str(ROOT / "configs/gpt2_124m.yaml"), "--set", f"data.path={tokens}",
           "--set", "amp.precision=bf16", "--set", f"train.max_steps={first + count}", "--set",
           "train.grad_accum_steps=1", "--set", "train.log_every=1000", "--set", f"train.out_dir={out}", "--set",
           "train.save_model=false", "--set", "eval.every=0", "--set", "eval.loss_batches=1",
           "--profile", str(prof), "--profile-steps", f"{first},{count}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scaletrain train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    j = json.loads(prof.read_text())
    return j["wall_ms"] / count, {k["name"]: k["total_ms"] / count for k in j["kernels"]}


def theirs(tokens, kind, first, count):
    data = np.memmap(tokens, dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = (NanoGPT(vocab_size=PADDED) if kind == "nanogpt" else GPT(vocab_size=PADDED)).cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    rng = np.random.default_rng(0)

    def step():
        offsets = rng.integers(0, len(data) - T - 1, B)
        batch = torch.from_numpy(np.stack([data[o:o + T + 1].astype(np.int64) for o in offsets]))
        batch = batch.pin_memory().cuda(non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(first):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(count):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000.0
    names = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            names[event.key] += event.self_device_time_total / 1000.0 / count
    return wall_ms / count, dict(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=str(ROOT / "build"), help="build folder holding the scaletrain executable")
    parser.add_argument("--out", help="JSON file")
    parser.add_argument("--first", type=int, default=10, help="first profiled step (after warm-up)")
    parser.add_argument("--count", type=int, default=10, help="profiled steps")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="KEY=VALUE",
                        help="also profile ours with this --set (repeatable)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_gpt2_step: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sides = {}
    with tempfile.TemporaryDirectory() as work:
        tokens = Path(work) / "tokens.bin"
        np.random.default_rng(0).integers(0, VOCAB, 5_000_000, dtype=np.uint16).tofile(tokens)
        sides["scaletrain"] = ours(Path(args.build) / "scaletrain", tokens, args.first, args.count, work)
        for extra in args.ours_variant:
            sides[f"scaletrain {extra}"] = ours(Path(args.build) / "scaletrain", tokens, args.first, args.count, work,
                                                 ("--set", extra))
        sides["PyTorch twin eager"] = theirs(tokens, "twin", args.first, args.count)
        torch.cuda.empty_cache()
        sides["nanoGPT-style eager"] = theirs(tokens, "nanogpt", args.first, args.count)
    by_kind = {}
    for label, (_, names) in sides.items():
        kinds = collections.Counter()
        for name, ms in names.items():
            kinds[kind_of(name)] += ms
        by_kind[label] = kinds
    order = sorted({k for ks in by_kind.values() for k in ks}, key=lambda k: -by_kind["scaletrain"].get(k, 0.0))
    print(f"{'ms per step':<42}" + "".join(f"{label[-21:]:>22}" for label in sides))
    for k in order:
        print(f"{k:<42}" + "".join(f"{by_kind[label].get(k, 0.0):>22.3f}" for label in sides))
    busy = {label: sum(by_kind[label].values()) for label in sides}
    print(f"{'GPU busy':<42}" + "".join(f"{busy[label]:>22.3f}" for label in sides))
    print(f"{'host gaps (wall - busy)':<42}" + "".join(f"{w - busy[label]:>22.3f}" for label, (w, _) in sides.items()))
    print(f"{'wall':<42}" + "".join(f"{w:>22.3f}" for w, _ in sides.values()))
    rows = []
    for label, (wall, names) in sides.items():
        top = sorted(names.items(), key=lambda kv: -kv[1])[:20]
        print(f"\n{label}: top kernels (ms per step)")
        for name, ms in top:
            print(f"  {ms:8.3f}  {kind_of(name):<26} {name[:100]}")
        rows.append({"side": label, "wall_ms": round(wall, 3), "gpu_busy_ms": round(busy[label], 3),
                     "host_gaps_ms": round(wall - busy[label], 3),
                     "kinds_ms": {k: round(v, 3) for k, v in sorted(by_kind[label].items(), key=lambda kv: -kv[1])},
                     "kernels_ms": [[n, round(ms, 4)] for n, ms in sorted(names.items(), key=lambda kv: -kv[1])]})
    if args.out:
        write_results(args.out, torch.cuda.get_device_name(), batch=B, sequence=T, first_step=args.first,
                      steps=args.count, sides=rows)


if __name__ == "__main__":
    main()
