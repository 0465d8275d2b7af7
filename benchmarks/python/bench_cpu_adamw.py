"""The CPU AdamW step (scaletrain's vectorised, threaded kernel) against torch's CPU AdamW, and
DeepSpeed's CPU Adam where it is installed, in the same process.

    python benchmarks/python/bench_cpu_adamw.py --threads 16 --out benchmarks/results/cpu_adamw_<host>.json

Cases (100M fp32 parameters in 10 tensors by default, --params to change):
  * `adamw cpu fp32 100M params N threads`: fp32 gradients; ours against
    torch.optim.AdamW(fused=True), (foreach=True) and DeepSpeedCPUAdam(adamw_mode=True) when
    `import deepspeed` works (its CPU op builds on first use).
    A last row times a bandwidth reference: torch's in-place add over 3.5 floats per parameter (the 28
    bytes an fp32 step must read and write).
  * `adamw cpu bf16 grads + bf16 copy 100M params N threads`: the offload step: bf16 gradients in,
    fp32 master state updated, bf16 parameters written in the same pass; torch = the gradients cast to
    fp32, fused AdamW, the result copied into bf16 parameters.

Both sides use the same number of threads (torch.set_num_threads). Before timing, one step of ours
and of each baseline from the same state must agree (rtol 1e-5). Each case is timed --iters times
after --warmup steps, interleaved three times; the median is reported.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from scaletrain._C import optim as _optim  # noqa: E402

from bench_results import write_results  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1


def timed(step, iters, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Ours:
    def __init__(self, params, grads, copies=None):
        self.params, self.grads = params, grads
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros(()) for _ in params]
        self.copies = copies or []

    def step(self):
        _optim.adamw_step_(self.params, self.grads, self.m, self.v, self.steps, self.copies, LR, BETAS[0], BETAS[1],
                           EPS, WD)


def torch_adamw(params, grads, **mode):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps, torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **mode)


def deepspeed_adam(params, grads):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # not installed, or its op cannot build here
        print(f"DeepSpeedCPUAdam unavailable: {e}", file=sys.stderr)
        return None
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps, DeepSpeedCPUAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, adamw_mode=True)


def agree(ours, theirs, what):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.detach().float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def compare(name, n, ours_step, baselines, iters, warmup):
    """baselines: [(baseline_name, step)]; returns one row per baseline."""
    times = {"ours": []} | {b: [] for b, _ in baselines}
    for _ in range(3):
        times["ours"].append(timed(ours_step, iters, warmup))
        for b, step in baselines:
            times[b].append(timed(step, iters, warmup))
    ours_ms = statistics.median(times["ours"])
    rows = []
    for b, _ in baselines:
        theirs = statistics.median(times[b])
        rows.append({"name": name, "unit": "ms", "ours": round(ours_ms, 3), "baseline": round(theirs, 3),
                     "baseline_name": b, "higher_is_better": False, "params": n,
                     "ours_mparam_per_s": round(n / ours_ms / 1e3, 1),
                     "baseline_mparam_per_s": round(n / theirs / 1e3, 1)})
    return rows


def case_fp32(n, tensors, threads, iters, warmup):
    torch.manual_seed(0)
    per = n // tensors
    params = [torch.randn(per) for _ in range(tensors)]
    grads = [torch.randn(per) for _ in range(tensors)]
    ours = Ours([p.clone() for p in params], grads)
    ours.step()
    baselines, keep = [], []
    for mode in ("fused", "foreach"):
        ps, opt = torch_adamw(params, grads, **{mode: True})
        opt.step()
        agree(ours.params, ps, f"fp32 vs torch {mode}")
        baselines.append((f"torch.optim.AdamW({mode}=True)", opt.step))
        keep.append(ps)
    ds = deepspeed_adam(params, grads)
    if ds is not None:
        ps, opt = ds
        opt.step()
        agree(ours.params, ps, "fp32 vs DeepSpeedCPUAdam")
        baselines.append(("DeepSpeedCPUAdam(adamw_mode=True)", opt.step))
        keep.append(ps)
    baselines.append(("bandwidth reference: in-place add over the same bytes (28 B/param)", memory_bound(per * tensors)))
    return compare(f"adamw cpu fp32 {n // 10**6}M params {threads} threads", per * tensors, ours.step, baselines,
                   iters, warmup)


def memory_bound(n):
    """The bytes an fp32 AdamW step must move, 28 per parameter (param, grad, exp_avg, exp_avg_sq read;
    param, exp_avg, exp_avg_sq written), moved by torch's threaded in-place add (each element read and
    written once, 8 bytes): a reference for the bandwidth, not a proven bound (on 2 EPYC cores torch's
    fused AdamW once ran faster than it)."""
    buffer = torch.zeros(n * 7 // 2)
    return lambda: buffer.add_(1.0)


def case_bf16(n, tensors, threads, iters, warmup):
    torch.manual_seed(0)
    per = n // tensors
    params = [torch.randn(per) for _ in range(tensors)]
    grads = [torch.randn(per).bfloat16() for _ in range(tensors)]
    copies = [torch.empty(per, dtype=torch.bfloat16) for _ in range(tensors)]
    ours = Ours([p.clone() for p in params], grads, copies)
    ours.step()
    master, opt = torch_adamw(params, [torch.empty(per) for _ in range(tensors)], fused=True)
    model = [torch.empty(per, dtype=torch.bfloat16) for _ in range(tensors)]

    def torch_step():
        for p, g in zip(master, grads):
            p.grad.copy_(g)
        opt.step()
        for b, p in zip(model, master):
            b.copy_(p.detach())

    torch_step()
    agree(ours.params, master, "bf16 grads")
    # The copies are our fp32 result rounded (torch's own rounds its fp32 result, which may differ
    # from ours in the last fp32 bit, and so in a rare bf16 rounding).
    for c, p in zip(copies, ours.params):
        torch.testing.assert_close(c, p.bfloat16(), rtol=0, atol=0, msg=lambda m: f"bf16 copies: {m}")
    return compare(f"adamw cpu bf16 grads + bf16 copy {n // 10**6}M params {threads} threads", per * tensors,
                   ours.step, [("grads to fp32 + torch.optim.AdamW(fused=True) + copy to bf16", torch_step)],
                   iters, warmup)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = case_fp32(args.params, args.tensors, args.threads, args.iters, args.warmup)
    rows += case_bf16(args.params, args.tensors, args.threads, args.iters, args.warmup)
    print(f"{'case':58} {'baseline':58} {'ours ms':>9} {'base ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['name'][:58]:58} {r['baseline_name'][:58]:58} {r['ours']:9.2f} {r['baseline']:9.2f} "
              f"{r['baseline'] / r['ours']:7.2f}x")
    if args.out:
        write_results(args.out, f"{cpu_name()} ({os.cpu_count()} logical CPUs)", threads=args.threads, rows=rows)


if __name__ == "__main__":
    main()
