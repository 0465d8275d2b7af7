"""Hugging Face transformers' GPT-2 (built from a config: nothing is downloaded) trained by a plain
PyTorch loop with scaletrain's optimizer and accumulation (lines marked `# scaletrain`). It learns the
bytes of a text file (the README by default) with a 256-token vocabulary.

    python examples/python/hf_gpt2.py                          # a small GPT-2 on the CPU or one GPU
    python examples/python/hf_gpt2.py --gpt2-124m --batch 16 --seq 1024 --cpu-offload   # GPT-2 124M's shapes
    torchrun --nproc_per_node 2 examples/python/hf_gpt2.py     # 2 ranks: ZeRO-2 over Gloo or NCCL

Needs `pip install transformers`.
"""
import argparse
import os
import pathlib
import time

import torch
import torch.distributed as dist

import scaletrain  # scaletrain


def main():
    root = pathlib.Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--gpt2-124m", action="store_true", help="12 layers, 12 heads, 768 wide (else 2, 4, 128)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--data", default=str(root / "README.md"))
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    if "RANK" in os.environ:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    data = torch.frombuffer(bytearray(pathlib.Path(args.data).read_bytes()), dtype=torch.uint8).long()
    if data.numel() <= args.seq + 1:
        raise SystemExit(f"--data {args.data}: {data.numel()} bytes, expected more than --seq + 1 = {args.seq + 1}")
    shape = dict(n_layer=12, n_head=12, n_embd=768) if args.gpt2_124m else dict(n_layer=2, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=max(args.seq, 64), bos_token_id=0, eos_token_id=0, **shape)).to(device)
    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, stage=args.stage,  # scaletrain
                                     max_grad_norm=1.0, cpu_offload=args.cpu_offload,
                                     overlap_forward=args.cpu_offload)
    acc = scaletrain.accum.accumulate(model, opt, args.micro_batches)  # scaletrain

    def micro_batch(step, micro):
        g = torch.Generator().manual_seed(((step * args.micro_batches + micro) * world + rank) * 7919)
        starts = torch.randint(0, data.numel() - args.seq, (args.batch,), generator=g)
        return torch.stack([data[s:s + args.seq] for s in starts.tolist()]).to(device)

    start = time.perf_counter()
    for step in range(args.steps):
        for micro in range(args.micro_batches):
            x = micro_batch(step, micro)
            with acc:  # scaletrain
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(x, labels=x).loss  # the mean over the seq - 1 shifted targets of each row
                acc.backward(loss, tokens=x.shape[0] * (x.shape[1] - 1))  # scaletrain
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            reported = loss.detach().float().clone()
            if dist.is_initialized():
                dist.all_reduce(reported)
            if rank == 0:
                tokens = (step + 1) * args.micro_batches * args.batch * args.seq * world
                print(f"step {step:4d}  loss {float(reported) / world:.3f}  grad norm {float(opt.last_norm):.3f}  "
                      f"{tokens / (time.perf_counter() - start):,.0f} tok/s", flush=True)
    if rank == 0 and device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; optimizer state in host memory "
              f"{opt.memory()['host_bytes'] / 2**30:.2f} GiB")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
