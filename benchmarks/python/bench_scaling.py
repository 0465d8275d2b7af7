"""Multi-GPU scaling on one host: scaletrain's ZeroAdamW (stages 1-3, CPU offload) against torch DDP,
FSDP2 and DeepSpeed ZeRO-2/3 on HF GPT-2 models built from config, for each GPU count, weak scaling
(B16 x T1024 per GPU) and strong scaling (a global batch of 16 x 1024 split over the GPUs).

    python benchmarks/python/bench_scaling.py --gpus 1,2,4,8 --models 355m,1.3b \
        --out benchmarks/results/scaling_h200x8.json

The driver launches `torchrun --nproc_per_node N bench_scaling.py --worker ...` once per (model,
mode, case, N), with NCCL's NVLink multicast off (NCCL_NVLS_ENABLE=0), and collects one JSON line
per run. Cases (--cases):
  ddp         torch DistributedDataParallel, fp32 params, bf16 autocast, AdamW(fused=True)
  fsdp2       torch fully_shard per block and at the root, bf16 params / fp32 reduce (MixedPrecisionPolicy)
  ds_zero2/3  DeepSpeed ZeRO-2 / ZeRO-3, bf16 (when `import deepspeed` works)
  zero1/2/3   scaletrain.optim.ZeroAdamW(stage=N), fp32 params, bf16 autocast (zero3: model=, units=blocks)
  zero2_bf16, zero3_bf16   bf16 params, ZeroAdamW's fp32 master (DeepSpeed's bf16 mode)
  zero2_offload            ZeroAdamW(stage=2, cpu_offload=True, overlap_forward=True), fp32 params + autocast
Every case clips the global gradient norm at 1.0 (lr 3e-4, weight decay 0.1). Timing: WARM steps,
then STEPS steps between barriers after a device synchronisation; tok/s counts every rank's tokens;
memory: the largest peak over the ranks.

Rows (BENCHMARKS.md): each scaletrain case against each peer at the same N (tok/s and peak GiB per
GPU); and each case's scaling efficiency, tok/s(N) / (N x tok/s(1)), against the peers'.

On a machine without GPUs, `--device cpu --models tiny --gpus 1,2` runs the same code over Gloo with
a two-layer model (a check of the script, not a measurement; DeepSpeed and FSDP2 cases that need
CUDA report an error row).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
T = 1024
# n_layer, n_embd, n_head
MODELS = {"tiny": (2, 64, 4), "124m": (12, 768, 12), "355m": (24, 1024, 16), "1.3b": (24, 2048, 16)}
CASES = ["ddp", "fsdp2", "ds_zero2", "ds_zero3", "zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16",
         "zero2_offload"]
PEERS = {"ddp": "torch DDP bf16 autocast", "fsdp2": "torch FSDP2 bf16 params fp32 reduce",
         "ds_zero2": "deepspeed 0.19.8 zero-2 bf16", "ds_zero3": "deepspeed 0.19.8 zero-3 bf16"}
WARM, STEPS = 5, 20


# ---------------------------------------------------------------- worker (one rank under torchrun)

def worker(case, size, batch, device_kind, out):
    import torch.distributed as dist

    record = measure(case, size, batch, device_kind)
    # Every model, optimizer and engine holding the group is gone before the group is destroyed.
    if int(os.environ["RANK"]) == 0:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
    dist.destroy_process_group()


def measure(case, size, batch, device_kind):
    """One rank's run of `case`; returns rank 0's record (tok/s over all ranks, the largest peak)."""
    import torch
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = device_kind == "cuda"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    n_layer, n_embd, n_head = MODELS[size]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_positions=T, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    seq = T if size != "tiny" else 64
    model = GPT2LMHeadModel(config).to(device)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=generator).to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    if case.startswith("ds_zero"):
        import deepspeed

        # DeepSpeed's JIT op builder parses the arch list as numbers ("9.0a" breaks it).
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace("a", "")
        deepspeed.init_distributed("nccl" if cuda else "gloo")
        cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
               "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}}, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": int(case[-1]), "overlap_comm": True}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

        def step():
            loss = engine(x, labels=x).loss
            engine.backward(loss)
            engine.step()
    else:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if case in ("ddp", "fsdp2"):
            if case == "ddp":
                run = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None,
                                                                gradient_as_bucket_view=True)
                autocast = True
            else:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                for block in model.transformer.h:
                    fully_shard(block, mp_policy=policy)
                run = fully_shard(model, mp_policy=policy)
                autocast = False
            opt = torch.optim.AdamW(run.parameters(), lr=3e-4, weight_decay=0.1, fused=cuda)

            def step():
                with torch.autocast(**amp, enabled=autocast):
                    loss = run(x, labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(run.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            from scaletrain.optim import ZeroAdamW

            stage = int(case[4])
            bf16 = case.endswith("_bf16")
            if bf16:
                model = model.to(torch.bfloat16)
            sharded = {"model": model, "units": model.transformer.h} if stage == 3 else {}
            offload = {"cpu_offload": True, "overlap_forward": True} if case.endswith("_offload") else {}
            opt = ZeroAdamW(model.parameters(), lr=3e-4, weight_decay=0.1, stage=stage, max_grad_norm=1.0,
                            **sharded, **offload)

            def step():
                with torch.autocast(**amp, enabled=not bf16):
                    loss = model(x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad()

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(WARM):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"tok_s": batch * seq * STEPS * world / seconds, "step_ms": seconds / STEPS * 1e3,
            "peak_GiB": round(float(peak), 3), "device": torch.cuda.get_device_name() if cuda else "cpu"}


# ---------------------------------------------------------------- driver

def launch(case, size, batch, gpus, device_kind, timeout):
    """One torchrun; returns the rank-0 record or {"error": ...}."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "result.jsonl"
        env = dict(os.environ, NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               str(Path(__file__).resolve()), "--worker", case, size, str(batch), device_kind, str(out)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out.exists():
            # The exception line of a rank's traceback (ModuleNotFoundError: No module named 'deepspeed').
            lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines()
                     if re.match(r"^\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b.*: ", line)
                     and "ChildFailedError" not in line]
            return {"error": (lines[-1] if lines else f"exit {proc.returncode}")[:300]}
        return json.loads(out.read_text().splitlines()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--gpus", default="1,2,4,8", help="comma-separated process counts (GPUs)")
    ap.add_argument("--models", default="355m,1.3b", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--modes", default="weak,strong", help="weak (16 per GPU), strong (16 in all)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per torchrun")
    args = ap.parse_args()
    counts = [int(n) for n in args.gpus.split(",")]
    models, cases, modes = args.models.split(","), args.cases.split(","), args.modes.split(",")
    for what, values, allowed in (("--models", models, MODELS), ("--cases", cases, CASES),
                                  ("--modes", modes, ("weak", "strong"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            sys.exit(f"{what}: unknown {', '.join(bad)}; expected some of {', '.join(allowed)}")
    if 1 not in counts:
        sys.exit("--gpus: needs 1 (the efficiency's reference)")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < max(counts):
            sys.exit(f"--gpus: {max(counts)} asked for, {torch.cuda.device_count()} CUDA devices here")
    runs, rows = [], []
    device_name = "cpu"
    from bench_results import write_results

    def save():
        write_results(args.out, device_name, runs=runs, rows=rows)

    for size in models:
        for mode in modes:
            for case in cases:
                for n in counts:
                    batch = 16 if mode == "weak" else max(1, 16 // n)
                    record = launch(case, size, batch, n, args.device, args.timeout)
                    device_name = record.get("device", device_name)
                    runs.append({"model": size, "mode": mode, "case": case, "gpus": n, "batch_per_gpu": batch,
                                 **record})
                    shown = (f"{record['tok_s']:>12,.0f} tok/s {record['peak_GiB']:7.2f} GiB"
                             if "tok_s" in record else record["error"])
                    print(f"{size:5} {mode:6} {case:14} {n} GPU  {shown}", flush=True)
                    save()
    rows = scaling_rows(runs)
    save()
    for row in rows:
        print(f"{row['name'][:64]:64} {row['baseline_name'][:36]:36} {row['ours']:>12} {row['baseline']:>12}")


def scaling_rows(runs):
    """Ours against each peer at the same (model, mode, N): tok/s, peak GiB and scaling efficiency."""
    ok = {(r["model"], r["mode"], r["case"], r["gpus"]): r for r in runs if "tok_s" in r}
    rows = []
    for (size, mode, case, n), r in sorted(ok.items()):
        if case in PEERS:
            continue
        one = ok.get((size, mode, case, 1))
        for peer, peer_name in PEERS.items():
            p = ok.get((size, mode, peer, n))
            if p is None:
                continue
            words = f"train gpt2-{size} {case} {mode} {n} gpu"
            rows.append({"name": f"{words} tok/s", "unit": "tok/s", "ours": round(r["tok_s"]),
                         "baseline": round(p["tok_s"]), "baseline_name": peer_name, "higher_is_better": True})
            rows.append({"name": f"{words} peak memory per gpu", "unit": "GiB", "ours": r["peak_GiB"],
                         "baseline": p["peak_GiB"], "baseline_name": peer_name, "higher_is_better": False})
            peer_one = ok.get((size, mode, peer, 1))
            if n > 1 and one is not None and peer_one is not None:
                rows.append({"name": f"{words} scaling efficiency", "unit": "ratio",
                             "ours": round(r["tok_s"] / (n * one["tok_s"]), 3),
                             "baseline": round(p["tok_s"] / (n * peer_one["tok_s"]), 3),
                             "baseline_name": peer_name, "higher_is_better": True})
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        case_, size_, batch_, device_, out_ = sys.argv[2:7]
        worker(case_, size_, int(batch_), device_, out_)
    else:
        sys.path.insert(0, str(HERE))
        main()
