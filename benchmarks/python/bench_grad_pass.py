"""The fused gradient pass (unscale + inf/NaN check + global norm + clip) on GPT-2 124M-shaped
gradients, against torch's separate passes in the same process:
torch._amp_foreach_non_finite_check_and_unscale_ then torch.nn.utils.clip_grad_norm_(foreach=True).

    python benchmarks/python/bench_grad_pass.py --out benchmarks/results/amp_h100.json

Each iteration restores the gradients from a copy outside the timed region (the passes work in
place), then times one call between CUDA events; the median of --iters iterations is reported.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
from scaletrain.amp import unscale_check_clip_  # noqa: E402

from bench_results import write_results  # noqa: E402

# GPT-2 124M parameter shapes (tied embeddings), as ../shared/anchors/measure_amp_optim_host_baselines.py.
SHAPES = (
    [(50257, 768), (1024, 768)]
    + [
        s
        for _ in range(12)
        for s in [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,),
                  (768, 3072), (768,)]
    ]
    + [(768,), (768,)]
)


def timed(fn, restore, iters, warmup, queued=False):
    """Median ms of fn between CUDA events. queued=True first puts a ~5 ms sleep kernel on the
    stream, so fn's launches wait in the queue and the events time the device's work alone (as
    in a training loop, where the host runs ahead of the GPU); otherwise a host slower than the
    kernels shows in the time."""
    times = []
    for i in range(warmup + iters):
        restore()
        if queued:
            torch.cuda._sleep(10_000_000)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def case(dtype, max_norm, scale, iters, warmup):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, device="cuda", dtype=dtype)) for s in SHAPES]
    saved = [torch.randn(s, device="cuda").mul_(scale).to(dtype) for s in SHAPES]
    grads = [torch.empty_like(g) for g in saved]
    for p, g in zip(params, grads):
        p.grad = g
    inv = torch.full((), 1.0 / scale, device="cuda")
    found = torch.zeros((), device="cuda")

    def restore():
        torch._foreach_copy_(grads, saved)

    def ours():
        unscale_check_clip_(grads, 1.0 / scale, max_norm)

    def theirs():
        if scale != 1.0:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    # Same results first: the comparison is only meaningful if both compute the same thing.
    restore()
    ours()
    expected = [g.clone() for g in grads]
    restore()
    theirs()
    for a, b in zip(expected, grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-7)
    # Interleaved measurements, so that drift hits both alike.
    ours_ms, theirs_ms = [], []
    for _ in range(3):
        ours_ms.append(timed(ours, restore, iters, warmup))
        theirs_ms.append(timed(theirs, restore, iters, warmup))
    return statistics.median(ours_ms), statistics.median(theirs_ms)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_grad_pass: needs a CUDA device")
    n = sum(torch.Size(s).numel() for s in SHAPES)
    cases = [
        # (name words, dtype, max_norm, loss scale, baseline)
        ("fp32 clipping", torch.float32, 1.0, 1024.0, "torch _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_ foreach"),
        ("fp32 no clipping needed", torch.float32, 1e9, 1024.0, "torch _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_ foreach"),
        ("bf16 grads clipping no loss scale", torch.bfloat16, 1.0, 1.0, "torch clip_grad_norm_ foreach"),
        ("fp16 grads clipping", torch.float16, 1.0, 1024.0, "torch _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_ foreach"),
    ]
    rows = []
    print(f"{'case':<48}{'ours ms':>10}{'torch ms':>10}{'speedup':>9}")
    for words, dtype, max_norm, scale, baseline in cases:
        ours_ms, theirs_ms = case(dtype, max_norm, scale, args.iters, args.warmup)
        name = f"amp fused unscale+check+norm+clip 124M params {words}"
        print(f"{words:<48}{ours_ms:>10.3f}{theirs_ms:>10.3f}{theirs_ms / ours_ms:>8.2f}x")
        rows.append({"name": name, "unit": "ms", "ours": round(ours_ms, 4), "baseline": round(theirs_ms, 4),
                     "baseline_name": baseline, "higher_is_better": False})
    if args.out:
        write_results(args.out, torch.cuda.get_device_name(), params=n, rows=rows)


if __name__ == "__main__":
    main()
