"""Where a ZeroAdamW(cpu_offload=True) step spends its time, on one GPU: HF GPT-2 124M, B16 x T1024, as
bench_zero.py runs it. Prints (1) the CPU AdamW alone on the model's size, (2) per-phase times with a
synchronisation between phases (forward, backward on the GPU, step, copies back), (3) a torch.profiler
summary of the optimizer's ranges (ZeroAdamW::land, ZeroAdamW::step_bucket) over a few unsynchronised
steps, and writes the chrome trace.
Usage: python benchmarks/python/profile_offload.py [--bf16] [--overlap] [--trace trace.json]
"""
import argparse
import statistics
import time

import torch

from scaletrain import _C
from scaletrain.optim import ZeroAdamW

B, T = 16, 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters (else fp32 + bf16 autocast)")
    parser.add_argument("--overlap", action="store_true", help="overlap_forward=True")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--trace", default="")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=T)).cuda()
    if args.bf16:
        model = model.to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"threads {torch.get_num_threads()}, {n / 1e6:.1f}M parameters")

    # (1) the CPU AdamW on n fp32 values with model-dtype gradients, in one call.
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    p, m, v = (torch.zeros(n) for _ in range(3))
    g = torch.randn(n).to(dtype)
    copies = [torch.empty(n, dtype=dtype)] if args.bf16 else []
    steps = [torch.zeros(1)]
    times = []
    for _ in range(6):
        start = time.perf_counter()
        _C.optim.adamw_step_([p], [g], [m], [v], steps, copies, 3e-4, 0.9, 0.999, 1e-8, 0.1, None, None)
        times.append(time.perf_counter() - start)
    print(f"cpu adamw {n / 1e6:.0f}M params ({dtype} grads): {statistics.median(times) * 1e3:.1f} ms")
    del p, m, v, g, copies

    opt = ZeroAdamW(model.parameters(), lr=3e-4, weight_decay=0.1, stage=args.stage, max_grad_norm=1.0,
                    cpu_offload=True, overlap_forward=args.overlap)
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def forward():
        with torch.autocast("cuda", torch.bfloat16, enabled=not args.bf16):
            return model(x, labels=x).loss

    # (2) phases, synchronised.
    phases = {k: [] for k in ("forward", "backward", "step", "copies back")}
    for i in range(12):
        t0 = time.perf_counter()
        loss = forward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        opt.synchronize()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        opt.zero_grad()
        if i >= 4:
            for k, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(t * 1e3)
    print("synchronised phases (ms): " + ", ".join(f"{k} {statistics.median(t):.1f}" for k, t in phases.items()))

    # (3) unsynchronised steps under the profiler.
    def step():
        forward().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    print(f"unsynchronised step: {(time.perf_counter() - start) * 100:.1f} ms")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
