"""ZeroAdamW on one GPU against the optimizers a user would pick instead, in one run: HF GPT-2 124M
(transformers, built from config), B16 x T1024, clip 1.0, lr 3e-4, weight decay 0.1.

  torch eager       fp32 params, bf16 autocast, torch.optim.AdamW(fused=True)
  scaletrain zeroN  the same model and autocast, scaletrain.optim.ZeroAdamW(stage=N) over an NCCL
                    group of one (torch.distributed initialised as torchrun would)
  scaletrain zero2 bf16 params   the model in bf16, ZeroAdamW keeps the fp32 master (DeepSpeed's bf16 mode)
  deepspeed zero2   DeepSpeed 0.19.8, bf16, ZeRO-2 (when installed; see ../shared/anchors)
  scaletrain zero3 [bf16] [offload overlap]   ZeroAdamW(stage=3, model=m, units=m.transformer.h): each
                    block's parameters gathered around its forward and backward
  deepspeed zero3   DeepSpeed ZeRO-3, bf16
  scaletrain zero2 offload [overlap] [f07]   ZeroAdamW(stage=2, cpu_offload=True[, overlap_forward=True]
                    [, offload_fraction=0.7]) on one GPU with no torch.distributed set-up; fp32 params +
                    autocast, or bf16 params
  torchao offload   torchao 0.18 CPUOffloadOptimizer(AdamW fused, offload_gradients=True), fp32 params +
                    autocast; it cannot clip (the gradients leave the GPU), so it runs without clipping
  deepspeed zero2 offload   DeepSpeed ZeRO-2 with offload_optimizer to pinned CPU memory (DeepSpeedCPUAdam)
  torch compile     torch eager's set-up under torch.compile (default mode; compiled in the warm-up)
  scaletrain hf [autocast] [compile] [offload]   the plain loop with scaletrain's pieces:
                    scaletrain.nn.convert_model (flash attention where no dropout applies, the output
                    layer padded to 50304 rows with the fused cross-entropy, one-kernel GELU), bf16
                    params with ZeroAdamW's fp32 master and fused step on one GPU, no process group
                    (autocast: fp32 params + bf16 autocast instead); under torch.compile; with
                    cpu_offload, overlap_forward, offload_fraction=0.7

Each case runs in its own subprocess (fresh memory statistics). Rows per BENCHMARKS.md: ours
against torch eager and against DeepSpeed ZeRO-2 measured in this run.
Usage: python benchmarks/python/bench_zero.py --out benchmarks/results/zero_h200.json [--cases a,b]
"""
import argparse
import json
import os
import subprocess
import sys
import time

B, T, WARM, STEPS = 16, 1024, 5, 20


def model(dtype=None):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_positions=T)).cuda()
    return m.to(dtype) if dtype is not None else m


def timed(step):
    import torch

    for _ in range(WARM):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    return {"tok_s": B * T / median, "step_ms": median * 1e3, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


def init_group(port):
    import torch
    import torch.distributed as dist

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", device_id=torch.device("cuda", 0))


def torch_eager(compile=False):
    """The user's script: fp32 params, bf16 autocast, fused AdamW, clipping (under torch.compile)."""
    import torch

    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    run = torch.compile(m) if compile else m
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = run(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step)


def scaletrain_hf(bf16_params=True, compile=False, offload=False):
    """The plain loop of a user's script with scaletrain's pieces (five changed lines)."""
    import torch

    import scaletrain
    from scaletrain.optim import ZeroAdamW

    m = model(torch.bfloat16 if bf16_params else None)
    scaletrain.nn.convert_model(m)
    extra = {"cpu_offload": True, "overlap_forward": True, "offload_fraction": 0.7} if offload else {}
    opt = ZeroAdamW(m.parameters(), lr=3e-4, weight_decay=0.1, stage=1, max_grad_norm=1.0, **extra)
    run = torch.compile(m) if compile else m
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=not bf16_params):
            loss = run(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return timed(step)


def scaletrain_zero(stage, bf16_params=False, offload=False, overlap=False, fraction=1.0):
    """``stage`` 3 gathers each block (``units=m.transformer.h``); the rest per module."""
    import torch

    from scaletrain.optim import ZeroAdamW

    if not offload:
        init_group(29521)  # offload runs on one GPU as a plain script would: no process group
    m = model(torch.bfloat16 if bf16_params else None)
    sharded = {"model": m, "units": m.transformer.h} if stage == 3 else {}
    opt = ZeroAdamW(m.parameters(), lr=3e-4, weight_decay=0.1, stage=stage, max_grad_norm=1.0, cpu_offload=offload,
                    overlap_forward=overlap, offload_fraction=fraction, **sharded)
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=not bf16_params):
            loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    result = timed(step)
    result.update({f"zero_{k}": v for k, v in opt.memory().items()})
    return result


def torchao_offload():
    import torch
    from torchao.optim import CPUOffloadOptimizer

    m = model()
    opt = CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, offload_gradients=True, fused=True, lr=3e-4,
                              weight_decay=0.1)
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    return timed(step)


def deepspeed_zero(offload=False, stage=2):
    import deepspeed
    import torch

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29522")
    # DeepSpeed's JIT op builder parses the arch list as numbers ("9.0a" breaks it).
    os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace("a", "")
    cfg = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    m = model()
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        loss = engine(x, labels=x).loss
        engine.backward(loss)
        engine.step()

    return timed(step)


CASES = {
    "torch_eager": torch_eager,
    "scaletrain_zero1": lambda: scaletrain_zero(1),
    "scaletrain_zero2": lambda: scaletrain_zero(2),
    "scaletrain_zero2_bf16": lambda: scaletrain_zero(2, bf16_params=True),
    "deepspeed_zero2": deepspeed_zero,
    "scaletrain_zero3": lambda: scaletrain_zero(3),
    "scaletrain_zero3_bf16": lambda: scaletrain_zero(3, bf16_params=True),
    "deepspeed_zero3": lambda: deepspeed_zero(stage=3),
    "scaletrain_zero3_offload_overlap": lambda: scaletrain_zero(3, offload=True, overlap=True),
    "scaletrain_zero2_offload": lambda: scaletrain_zero(2, offload=True),
    "scaletrain_zero2_offload_overlap": lambda: scaletrain_zero(2, offload=True, overlap=True),
    "scaletrain_zero2_offload_overlap_f07": lambda: scaletrain_zero(2, offload=True, overlap=True, fraction=0.7),
    "scaletrain_zero2_bf16_offload_overlap_f07": lambda: scaletrain_zero(2, bf16_params=True, offload=True, overlap=True,
                                                                          fraction=0.7),
    "torchao_offload": torchao_offload,
    "torch_compile": lambda: torch_eager(compile=True),
    "scaletrain_hf": scaletrain_hf,
    "scaletrain_hf_autocast": lambda: scaletrain_hf(bf16_params=False),
    "scaletrain_hf_compile": lambda: scaletrain_hf(compile=True),
    "scaletrain_hf_offload": lambda: scaletrain_hf(offload=True),
    "deepspeed_zero2_offload": lambda: deepspeed_zero(offload=True),
}

OURS = {"scaletrain_zero1": "zero-1 fp32 params bf16 autocast", "scaletrain_zero2": "zero-2 fp32 params bf16 autocast",
        "scaletrain_zero2_bf16": "zero-2 bf16 params fp32 master"}
ZERO3 = {"scaletrain_zero3": ("zero-3 fp32 params bf16 autocast", "scaletrain_zero2"),
         "scaletrain_zero3_bf16": ("zero-3 bf16 params fp32 master", "scaletrain_zero2_bf16"),
         "scaletrain_zero3_offload_overlap": ("zero-3 cpu offload overlap_forward fp32 params bf16 autocast",
                                              "scaletrain_zero3")}
# Offload rows: against the peers' offload, and against the same set-up without offload.
OFFLOAD = {"scaletrain_zero2_offload": ("zero-2 cpu offload fp32 params bf16 autocast", "scaletrain_zero2"),
           "scaletrain_zero2_offload_overlap": ("zero-2 cpu offload overlap_forward fp32 params bf16 autocast",
                                                "scaletrain_zero2"),
           "scaletrain_zero2_offload_overlap_f07": ("zero-2 cpu offload 0.7 overlap_forward fp32 params bf16 autocast",
                                                    "scaletrain_zero2"),
           "scaletrain_zero2_bf16_offload_overlap_f07": ("zero-2 cpu offload 0.7 overlap_forward bf16 params fp32 master",
                                                         "scaletrain_zero2_bf16")}
# The plain loop with scaletrain's pieces against the user's eager and compiled script.
PIECES = {"scaletrain_hf": "convert_model bf16 params zeroadamw",
          "scaletrain_hf_autocast": "convert_model fp32 params bf16 autocast zeroadamw",
          "scaletrain_hf_compile": "convert_model bf16 params zeroadamw torch.compile",
          "scaletrain_hf_offload": "convert_model bf16 params zeroadamw cpu offload 0.7 overlap_forward"}
PIECES_BASES = {"torch_eager": "torch eager fused AdamW bf16 autocast",
                "torch_compile": "torch.compile fused AdamW bf16 autocast"}
OFFLOAD_BASES = {"torch_eager": "torch eager fused AdamW bf16 autocast",
                 "torchao_offload": "torchao 0.18 CPUOffloadOptimizer fused AdamW bf16 autocast (no clipping)",
                 "deepspeed_zero2_offload": "deepspeed 0.19.8 zero-2 offload_optimizer bf16"}


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print("RESULT " + json.dumps(CASES[sys.argv[2]]()), flush=True)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from bench_results import write_results

    cases = {}
    for name in args.cases.split(","):
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                                  timeout=float(os.environ.get("BENCH_CASE_TIMEOUT", 900)))
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(e.cmd, -1, "", f"timed out after {e.timeout} s")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        cases[name] = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-1500:]}
        cases[name]["wall_s"] = round(time.perf_counter() - start, 1)
        print(f"{name:24s} {json.dumps(cases[name])[:300]}", flush=True)
    rows = []

    def compare(ours, words, bases):
        """A tok/s row and a peak-memory row per baseline measured in this run."""
        for base, base_name in bases.items():
            if "tok_s" in cases.get(ours, {}) and "tok_s" in cases.get(base, {}):
                rows.append({"name": f"train hf-gpt2-124m {words} 1 gpu tok/s", "unit": "tok/s",
                             "ours": cases[ours]["tok_s"], "baseline": cases[base]["tok_s"], "baseline_name": base_name,
                             "ratio": cases[ours]["tok_s"] / cases[base]["tok_s"], "higher_is_better": True})
                rows.append({"name": f"train hf-gpt2-124m {words} 1 gpu peak memory", "unit": "GiB",
                             "ours": cases[ours]["peak_GiB"], "baseline": cases[base]["peak_GiB"],
                             "baseline_name": base_name, "higher_is_better": False})

    for ours, words in OURS.items():
        compare(ours, words, {"torch_eager": "torch eager fused AdamW bf16 autocast",
                              "deepspeed_zero2": "deepspeed 0.19.8 zero-2 bf16"})
    # ZeRO-3 against our ZeRO-2 on the same set-up (the bar: >= 0.9x) and DeepSpeed's ZeRO-3.
    for ours, (words, same) in ZERO3.items():
        compare(ours, words, {same: f"scaletrain {same[11:].replace('_', ' ')} (same set-up)",
                              "deepspeed_zero3": "deepspeed 0.19.8 zero-3 bf16", "torch_eager":
                              "torch eager fused AdamW bf16 autocast"})
    for ours, (words, same) in OFFLOAD.items():
        compare(ours, words, dict(OFFLOAD_BASES, **{
            same: f"scaletrain {same[11:].replace('_', ' ')} without offload (same set-up)"}))
    for ours, words in PIECES.items():
        offload = {"torchao_offload": OFFLOAD_BASES["torchao_offload"],
                   "scaletrain_hf": "scaletrain hf without offload (same set-up)"} if "offload" in ours else {}
        compare(ours, words, dict(PIECES_BASES, **offload))
    for row in rows:
        print(f"{row['name']:70s} {row['ours']:12.1f} {row['baseline']:12.1f} {row['baseline_name']}")
    write_results(args.out, torch.cuda.get_device_name(), batch=B, seq=T, cases=cases, rows=rows)


if __name__ == "__main__":
    main()
