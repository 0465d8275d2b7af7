"""GPT-2 124M (and 355M) training (configs/gpt2_124m.yaml, batch 16 x 1024 tokens) with scaletrain's
trainer (the `scaletrain train` executable) against the same model trained by plain PyTorch eager
with torch.amp (benchmarks/python/torch_gpt.py), in one run of this script on one GPU: tokens per
second and peak GPU memory for fp32, bf16 and fp16 with dynamic loss scaling. Both sides pad the
vocabulary of 50257 to 50304 rows.

    python benchmarks/python/bench_train_gpt2.py --build build-gpu --out benchmarks/results/train_gpt2_h100.json
    python benchmarks/python/bench_train_gpt2.py --build build-gpu --models 124m,355m --out ...

Ours runs with its defaults, which capture the step in a CUDA graph (train.cuda_graph auto); the
"cuda graph on vs off" row sets train.cuda_graph=off for the other side, and the "4 micro-batches cuda
graph on vs off" row does the same with gradient accumulation (--accum-steps). --variants adds bf16 rows
of the trainer with other settings against its defaults, e.g. the output layer and loss in chunks:

    python benchmarks/python/bench_train_gpt2.py --build build-gpu --variants model.loss_chunk_rows=4096 --out ...

GPT-2 355M (24 layers, 16 heads, width 1024) gets the bf16 rows (a), (b), (c) only.

Both sides: one micro-batch per optimizer step, AdamW with gradient clipping at 1.0, TF32 off.
Ours: scaletrain's fused AdamW (optim.fused auto = on CUDA). PyTorch: torch.optim.AdamW(fused=True),
its fastest eager optimizer. Data: random GPT-2 token ids in a uint16 file (throughput does not
depend on the text).

Baselines of the bf16 rows (baseline_name says which):
  (a) a nanoGPT-style model (benchmarks/python/nanogpt_ref.py: learned positions, no RoPE), eager;
  (b) the twin (benchmarks/python/torch_gpt.py: scaletrain's architecture), eager;
  (c) the twin under torch.compile (default mode; compile time excluded by the warm-up).
fp32 and fp16 + GradScaler rows compare against the twin eager.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_ref import NanoGPT  # noqa: E402
from torch_gpt import GPT  # noqa: E402
from bench_results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
B, T = 16, 1024
# scaletrain pads the embedding and output rows to a multiple of 64 (model.pad_vocab_to); the
# PyTorch twin gets the same rows, as nanoGPT pads its vocabulary, so both sides run the same GEMMs.
VOCAB = 50257
PADDED_VOCAB = (VOCAB + 63) // 64 * 64
# n_layer, n_head, n_embd
MODELS = {"124m": (12, 12, 768), "355m": (24, 16, 1024)}


def ours(exe, tokens, precision, steps, work, checkpointing=False, model="124m", extra=()):
    tag = "_".join(x.replace("=", "-").replace(".", "-") for x in extra)
    out = Path(work) / f"ours_{model}_{precision}_{int(checkpointing)}_{tag}"
    n_layer, n_head, n_embd = MODELS[model]
    sets = [f"model.n_layer={n_layer}", f"model.n_head={n_head}", f"model.n_embd={n_embd}", "train.grad_accum_steps=1",
            *extra]
    cmd = [str(exe), "train", "--config", str(ROOT / "configs/gpt2_124m.yaml"), *[a for x in sets for a in ("--set", x)],
           "--set", f"data.path={tokens}", "--set", f"amp.precision={precision}",
           "--set", f"train.max_steps={steps}", "--set", "train.log_every=10",
           "--set", f"train.out_dir={out}", "--set", "train.save_model=false", "--set", "eval.every=0",
           "--set", "eval.loss_batches=1", "--set", f"model.activation_checkpointing={str(checkpointing).lower()}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"scaletrain train failed ({precision}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rates = [json.loads(line)["tokens_per_second"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    # The first interval holds cuBLAS/cuDNN warm-up; the median of the others is the steady rate.
    return statistics.median(rates[1:]), summary["peak_memory_bytes"], summary["parameters"], summary


def theirs(tokens, precision, steps, warmup=10, checkpointing=False, kind="twin", compiled=False, size="124m"):
    torch.manual_seed(0)
    data = np.memmap(tokens, dtype=np.uint16, mode="r")
    n_layer, n_head, n_embd = MODELS[size]
    if kind == "nanogpt":
        model = NanoGPT(vocab_size=PADDED_VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd).cuda()
    else:
        model = GPT(vocab_size=PADDED_VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    checkpointing=checkpointing).cuda()
    forward = torch.compile(model) if compiled else model
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    rng = np.random.default_rng(0)
    torch.cuda.reset_peak_memory_stats()

    def step():
        offsets = rng.integers(0, len(data) - T - 1, B)
        batch = torch.from_numpy(np.stack([data[o:o + T + 1].astype(np.int64) for o in offsets])).cuda(non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = forward(batch[:, :-1], batch[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    torch.cuda.synchronize()
    rate = B * T * steps / (time.perf_counter() - start)
    return rate, torch.cuda.max_memory_allocated(), params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=str(ROOT / "build"), help="build folder holding the scaletrain executable")
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--no-checkpointing", action="store_true", help="leave out the activation checkpointing rows")
    parser.add_argument("--accum-steps", type=int, default=4,
                        help="micro-batches per step of the bf16 'micro-batches cuda graph on vs off' row (1: no row)")
    parser.add_argument("--models", default="124m", help="comma-separated: 124m, 355m (355m: bf16 rows only)")
    parser.add_argument("--zero-stages", default="",
                        help="comma-separated optim.zero_stage values (1-3), each optionally followed by "
                             "':key=value' optim settings (2:cpu_offload=true:offload_fraction=0.7): bf16 rows of the "
                             "trainer with ZeroAdamW "
                             "on one GPU against the same trainer with zero_stage 0; only these rows and the bf16 "
                             "twin eager one")
    parser.add_argument("--variants", default="",
                        help="comma-separated bf16 runs of the trainer with other settings, each 'key=value' or "
                             "several joined by ':' (model.loss_chunk_rows=4096), against the same trainer with its "
                             "defaults; only these rows and the bf16 twin eager one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_gpt2: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, table = [], []

    def save():  # after every row: a run cut short keeps what it measured
        if not args.out:
            return
        write_results(args.out, torch.cuda.get_device_name(), batch=B, sequence=T, steps=args.steps, rows=rows)

    def record(model, label, baseline, our_rate, torch_rate, our_peak=None, torch_peak=None):
        rows.append({"name": f"train gpt2-{model} {label} tok/s", "unit": "tok/s", "ours": round(our_rate),
                     "baseline": round(torch_rate), "baseline_name": baseline, "higher_is_better": True})
        if our_peak is not None:
            rows.append({"name": f"train gpt2-{model} {label} peak memory", "unit": "GiB",
                         "ours": round(our_peak / 2**30, 2), "baseline": round(torch_peak / 2**30, 2),
                         "baseline_name": baseline, "higher_is_better": False})
        table.append((f"{model} {label}", baseline, our_rate, torch_rate,
                      our_peak / 2**30 if our_peak else float("nan"), torch_peak / 2**30 if torch_peak else float("nan")))
        label_, base_, a, b, m, n = table[-1]
        print(f"{label_:<37}{base_[:42]:<44}{a:>12,.0f}{b:>12,.0f}{a / b:>6.2f}x{m:>10.2f}{n:>10.2f}", flush=True)
        save()

    exe = Path(args.build) / "scaletrain"
    with tempfile.TemporaryDirectory() as work:
        tokens = Path(work) / "tokens.bin"
        np.random.default_rng(0).integers(0, VOCAB, 20_000_000, dtype=np.uint16).tofile(tokens)
        for model in args.models.split(","):
            if model not in MODELS:
                raise SystemExit(f"--models: unknown model '{model}', expected one of {', '.join(MODELS)}")
            only_ours = bool(args.zero_stages or args.variants)  # rows of the trainer against itself
            precisions = args.precisions.split(",") if model == "124m" and not only_ours else ["bf16"]
            our_bf16_rate = our_bf16_peak = None
            for precision in precisions:
                our_rate, our_peak, our_params, summary = ours(exe, tokens, precision, args.steps, work, model=model)
                torch_rate, torch_peak, torch_params = theirs(tokens, precision, args.steps - 10, size=model)
                torch.cuda.empty_cache()
                if our_params != torch_params:
                    raise SystemExit(f"parameter counts differ: scaletrain {our_params}, PyTorch {torch_params}")
                baseline = f"PyTorch twin eager (vocab padded to {PADDED_VOCAB}), AdamW fused" + \
                    (" + torch.amp autocast" if precision != "fp32" else "") + \
                    (" + GradScaler" if precision == "fp16" else "")
                label = precision + (" + loss scaler" if precision == "fp16" else "")
                record(model, label, baseline, our_rate, torch_rate, our_peak, torch_peak)
                if precision == "bf16":
                    our_bf16_rate, our_bf16_peak = our_rate, our_peak
                    if summary.get("cuda_graph") and not only_ours:  # what the graph buys: the same run with it off
                        rate, peak, _, _ = ours(exe, tokens, precision, args.steps, work, model=model,
                                                extra=["train.cuda_graph=off"])
                        record(model, "bf16 cuda graph on vs off", "scaletrain with train.cuda_graph=off",
                               our_rate, rate, our_peak, peak)
                        if args.accum_steps > 1:  # the graph holding several micro-batches
                            k = f"train.grad_accum_steps={args.accum_steps}"
                            on = ours(exe, tokens, precision, args.steps, work, model=model, extra=[k])
                            off = ours(exe, tokens, precision, args.steps, work, model=model,
                                       extra=[k, "train.cuda_graph=off"])
                            record(model, f"bf16 {args.accum_steps} micro-batches cuda graph on vs off",
                                   f"scaletrain with {args.accum_steps} micro-batches and train.cuda_graph=off",
                                   on[0], off[0], on[1], off[1])
            for item in [s for s in args.zero_stages.split(",") if s]:
                stage, *options = item.split(":")  # 2:cpu_offload=true:offload_fraction=0.7
                rate, peak, _, _ = ours(exe, tokens, "bf16", args.steps, work, model=model,
                                        extra=[f"optim.zero_stage={int(stage)}", *[f"optim.{o}" for o in options]])
                record(model, " ".join([f"bf16 zero-{stage}", *options]),
                       "scaletrain bf16 optim.zero_stage 0 (fused AdamW, CUDA graph)", rate, our_bf16_rate, peak,
                       our_bf16_peak)
            for item in [s for s in args.variants.split(",") if s]:
                sets = item.split(":")
                rate, peak, _, _ = ours(exe, tokens, "bf16", args.steps, work, model=model, extra=sets)
                record(model, " ".join(["bf16", *sets]), "scaletrain bf16 with its defaults", rate, our_bf16_rate, peak,
                       our_bf16_peak)
            if only_ours:
                continue
            if our_bf16_rate is not None:
                # (a) nanoGPT-style eager and (c) the twin under torch.compile.
                rate, peak, _ = theirs(tokens, "bf16", args.steps - 10, kind="nanogpt", size=model)
                torch.cuda.empty_cache()
                record(model, "bf16", f"nanoGPT-style eager (learned positions, vocab {PADDED_VOCAB}), AdamW fused + autocast",
                       our_bf16_rate, rate, our_bf16_peak, peak)
                rate, peak, _ = theirs(tokens, "bf16", args.steps - 10, compiled=True, warmup=15, size=model)
                torch.cuda.empty_cache()
                record(model, "bf16", f"PyTorch twin under torch.compile (vocab {PADDED_VOCAB}), AdamW fused + autocast",
                       our_bf16_rate, rate, our_bf16_peak, peak)
            # Activation checkpointing (bf16): ours per block against torch.utils.checkpoint per block.
            if model == "124m" and our_bf16_rate is not None and not args.no_checkpointing:
                our_rate, our_peak, _, _ = ours(exe, tokens, "bf16", args.steps, work, checkpointing=True, model=model)
                torch_rate, torch_peak, _ = theirs(tokens, "bf16", args.steps - 10, checkpointing=True, size=model)
                torch.cuda.empty_cache()
                record(model, "bf16 + activation checkpointing",
                       f"PyTorch twin eager (vocab padded to {PADDED_VOCAB}) + autocast + torch.utils.checkpoint per block",
                       our_rate, torch_rate, our_peak, torch_peak)
    print(f"{'case':<37}{'baseline':<44}{'ours tok/s':>12}{'base tok/s':>12}{'ratio':>7}{'ours GiB':>10}{'base GiB':>10}")
    for label, baseline, a, b, m, n in table:
        print(f"{label:<37}{baseline[:42]:<44}{a:>12,.0f}{b:>12,.0f}{a / b:>6.2f}x{m:>10.2f}{n:>10.2f}")


if __name__ == "__main__":
    main()
