"""The fused AdamW step against torch's in the same process, on one GPU.

    python benchmarks/python/bench_adamw.py --out benchmarks/results/adamw_h200.json

Cases:
  * `adamw gpu fp32 1B params`: 1B fp32 parameters in 200 tensors (as
    ../shared/anchors/measure_pytorch_baselines.py), fp32 gradients; ours (scaletrain's fused
    multi-tensor kernel) against torch.optim.AdamW(fused=True) and (foreach=True). Also the fraction
    of the in-process copy bandwidth each reaches (28 bytes per parameter: read p, g, m, v; write
    p, m, v).
  * `amp step unscale+check+clip+adamw 124M params`: the whole mixed-precision optimizer step on
    GPT-2 124M-shaped fp32 gradients scaled by 1024: ours = one read-only gradient pass (flag,
    norm, factor) + the fused AdamW applying the factor and skipping on the device; torch =
    _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_(foreach=True) + fused AdamW
    (what GradScaler.unscale_ + clip + step does, without its host read).
  * `adamw gpu bf16 grads + bf16 copy 124M params`: the master-weights step; ours reads bf16
    gradients and writes the bf16 model copy in its pass; torch = grads cast to fp32, fused AdamW,
    then copy into the bf16 model.

Each iteration is timed between CUDA events after warm-up; the median of --iters is reported, the
cases interleaved three times so drift hits both alike. The two 124M cases are timed twice: as
called from Python (a host slower than the kernels shows in the time: torch's step launches
hundreds of kernels), and as device time alone, the launches queued behind a sleep kernel (rows
named "... device time"; a training loop whose host runs ahead of the GPU pays this). The AMP
step is timed a third way ("... passes timed apart"): each of torch's three passes timed as its
own call after an L2 flush and the times summed, against our whole step timed the same way. floor_ms:
the bytes the step must move at the in-process copy bandwidth (32 per parameter for the AMP step:
the gradient read twice, once for the norm; 28 for the master-weights step). Before timing, one
step of ours and of torch from the same state must agree (rtol 1e-5).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from scaletrain._C import amp as _amp  # noqa: E402
from scaletrain._C import optim as _optim  # noqa: E402

from bench_grad_pass import SHAPES, timed  # noqa: E402
from bench_results import write_results  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1


def nothing():
    pass


class Ours:
    """Our state beside a torch.optim.AdamW over clones of the same parameters."""

    def __init__(self, params, grads, copies=None):
        self.params = params
        self.grads = grads
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), device=p.device) for p in params]
        self.copies = copies or []

    def step(self, factor=None, found_inf=None):
        _optim.adamw_step_(self.params, self.grads, self.m, self.v, self.steps, self.copies, LR, BETAS[0], BETAS[1],
                           EPS, WD, factor, found_inf)


def torch_opt(params, grads, **mode):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps, torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **mode)


def agree(ours, theirs, what):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.float(), b.detach().float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def copy_bandwidth(iters, warmup):
    x = torch.empty(256 * 2**20, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), nothing, iters, warmup)
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s


def case_1b(iters, warmup, bandwidth):
    n_tensors, per = 200, 5 * 2**20  # 1.05B parameters
    torch.manual_seed(0)
    params = [torch.randn(per, device="cuda") for _ in range(n_tensors)]
    grads = [torch.randn(per, device="cuda") for _ in range(n_tensors)]
    n = n_tensors * per
    rows = []
    results = {}
    for mode in ("fused", "foreach"):
        ours = Ours([p.clone() for p in params], grads)
        ps, opt = torch_opt(params, grads, **{mode: True})
        ours.step()
        opt.step()
        agree(ours.params, ps, f"1B {mode}")
        del ps
        times_ours, times_theirs = [], []
        for _ in range(3):
            times_ours.append(timed(ours.step, nothing, iters, warmup))
            times_theirs.append(timed(opt.step, nothing, iters, warmup))
        del ours, opt
        torch.cuda.empty_cache()
        results[mode] = (statistics.median(times_ours), statistics.median(times_theirs))
    limit_ms = 28 * n / bandwidth / 1e6
    for mode, (ours_ms, theirs_ms) in results.items():
        rows.append({"name": "adamw gpu fp32 1B params", "unit": "ms", "ours": round(ours_ms, 4),
                     "baseline": round(theirs_ms, 4), "baseline_name": f"torch.optim.AdamW({mode}=True)",
                     "higher_is_better": False, "params": n, "copy_bound_ms": round(limit_ms, 4),
                     "ours_fraction_of_copy": round(limit_ms / ours_ms, 4),
                     "baseline_fraction_of_copy": round(limit_ms / theirs_ms, 4)})
    return rows


def floor_ms(nbytes, bandwidth):
    """The time of moving nbytes at the in-process copy bandwidth (GB/s)."""
    return round(nbytes / bandwidth / 1e6, 4)


def both_timings(ours, theirs, restore, iters, warmup):
    """(name suffix, ours ms, theirs ms): as called from Python (host time included where the
    host is slower than the GPU), then the device time alone (launches queued behind a sleep
    kernel, as when a training loop runs ahead of the GPU). Interleaved three times, medians."""
    result = []
    for suffix, queued in (("", False), (" device time", True)):
        times_ours, times_theirs = [], []
        for _ in range(3):
            times_ours.append(timed(ours, restore, iters, warmup, queued))
            times_theirs.append(timed(theirs, restore, iters, warmup, queued))
        result.append((suffix, round(statistics.median(times_ours), 4), round(statistics.median(times_theirs), 4)))
    return result


def apart_timing(ours, passes, restore, iters, warmup):
    """(name suffix, ours ms, theirs ms) with each of torch's passes timed on its own call and the
    times summed, as a script that times each pass sees them; ours timed as one call. Before each
    timed call the gradients are restored and a 256 MB buffer is zeroed, so no call finds the
    previous one's data in L2 (what triton.testing.do_bench does). Interleaved three times, medians."""
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")

    def prepare():
        restore()
        flush.zero_()

    times_ours, times_theirs = [], []
    for _ in range(3):
        times_ours.append(timed(ours, prepare, iters, warmup))
        times_theirs.append(sum(timed(fn, prepare, iters, warmup) for fn in passes))
    return (" passes timed apart", round(statistics.median(times_ours), 4), round(statistics.median(times_theirs), 4))


def case_amp_step(iters, warmup, bandwidth):
    torch.manual_seed(0)
    scale, max_norm = 1024.0, 1.0
    params = [torch.randn(s, device="cuda") for s in SHAPES]
    saved = [torch.randn(s, device="cuda").mul_(scale) for s in SHAPES]
    grads = [g.clone() for g in saved]
    ours = Ours([p.clone() for p in params], grads)
    ps, opt = torch_opt(params, grads, fused=True)
    inv = torch.full((), 1.0 / scale, device="cuda")
    found = torch.zeros((), device="cuda")

    def restore():
        torch._foreach_copy_(grads, saved)

    def ours_step():
        values, factor = _amp.gradient_factor(grads, 1.0 / scale, max_norm)
        ours.step(factor, values[:1])

    def torch_step():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True)
        opt.step()

    restore()
    ours_step()
    restore()
    torch_step()
    agree(ours.params, ps, "amp step")
    n = sum(p.numel() for p in params)
    timings = both_timings(ours_step, torch_step, restore, iters, warmup)
    timings.append(apart_timing(ours_step, [
        lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv),
        lambda: torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=True),
        opt.step], restore, iters, warmup))
    return [{"name": "amp step unscale+check+clip+adamw 124M params fp32 grads" + suffix, "unit": "ms",
             "ours": ours_ms, "baseline": theirs_ms,
             "baseline_name": "torch _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_ foreach + "
                              "AdamW(fused=True)",
             "higher_is_better": False, "params": n, "floor_ms": floor_ms(32 * n, bandwidth)}
            for suffix, ours_ms, theirs_ms in timings]


def case_master_copy(iters, warmup, bandwidth):
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda") for s in SHAPES]
    grads16 = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in SHAPES]
    model = [p.to(torch.bfloat16) for p in params]
    ours = Ours([p.clone() for p in params], grads16, [m.clone() for m in model])
    grads32 = [g.float() for g in grads16]
    ps, opt = torch_opt(params, grads32, fused=True)

    def torch_step():
        torch._foreach_copy_(grads32, grads16)
        opt.step()
        torch._foreach_copy_(model, [p.detach() for p in ps])

    ours.step()
    torch_step()
    agree(ours.params, ps, "master copy")
    # The bf16 copy is our fp32 result rounded (torch's may round the other way where fp32 differs).
    for c, p in zip(ours.copies, ours.params):
        torch.testing.assert_close(c, p.to(torch.bfloat16), rtol=0, atol=0)
    n = sum(p.numel() for p in params)
    return [{"name": "adamw gpu bf16 grads + bf16 model copy 124M params" + suffix, "unit": "ms",
             "ours": ours_ms, "baseline": theirs_ms,
             "baseline_name": "torch grads to fp32 + AdamW(fused=True) + copy to bf16 model",
             "higher_is_better": False, "params": n, "floor_ms": floor_ms(28 * n, bandwidth)}
            for suffix, ours_ms, theirs_ms in both_timings(ours.step, torch_step, nothing, iters, warmup)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-1b", action="store_true", help="leave out the 1B-parameter case (32 GB)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_adamw: needs a CUDA device")
    bandwidth = copy_bandwidth(args.iters, args.warmup)
    rows = []
    rows += case_amp_step(args.iters, args.warmup, bandwidth)
    rows += case_master_copy(args.iters, args.warmup, bandwidth)
    if not args.skip_1b:
        rows += case_1b(args.iters, args.warmup, bandwidth)
    print(f"copy bandwidth {bandwidth:.0f} GB/s on {torch.cuda.get_device_name()}")
    print(f"{'case':<58}{'baseline':<50}{'ours ms':>9}{'base ms':>9}{'speedup':>9}")
    for r in rows:
        print(f"{r['name']:<58}{r['baseline_name'][:48]:<50}{r['ours']:>9.3f}{r['baseline']:>9.3f}"
              f"{r['baseline'] / r['ours']:>8.2f}x")
    if args.out:
        write_results(args.out, torch.cuda.get_device_name(), copy_GBps=round(bandwidth, 1), rows=rows)


if __name__ == "__main__":
    main()
