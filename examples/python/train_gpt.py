"""A nanoGPT-style GPT trained by a plain PyTorch loop with scaletrain's pieces (lines marked
`# scaletrain`): ZeroAdamW in place of AdamW + DDP, accumulate() over micro-batches, and scaletrain's
flash attention through convert_model_to_efficient_attention (on CUDA its kernels take bf16/fp16
and head_dim 64 or 128: `--dim 256 --heads 4` uses them; other shapes keep torch's SDPA).
It learns the bytes of a text file (the README by default).

    python examples/python/train_gpt.py                          # CPU, or one GPU (bf16 autocast)
    torchrun --nproc_per_node 2 examples/python/train_gpt.py     # 2 ranks: ZeRO-2 over Gloo or NCCL
    python examples/python/train_gpt.py --cpu-offload            # AdamW's state in host memory

Options: --steps, --micro-batches (per optimizer step), --batch (sequences per micro-batch and
rank), --seq, --layers, --heads, --dim, --lr, --stage, --data FILE.
"""
import argparse
import math
import os
import pathlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import scaletrain  # scaletrain


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.fc_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.attention_function = F.scaled_dot_product_attention  # what convert_model_to_efficient_attention swaps

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln_1(x)).split(c, 2))
        y = self.attention_function(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, seq, layers, heads, dim):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied embeddings


def loop_arguments(description, steps, lr):
    """The options of the loop (hf_gpt2.py shares them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "README.md"))
    return parser


def init_distributed():
    """(device, rank, world): torchrun's process group when launched by it (NCCL on GPUs, else Gloo)."""
    if "RANK" in os.environ:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        return device, dist.get_rank(), dist.get_world_size()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0, 1


class ByteWindows:
    """Random windows of seq + 1 bytes of a file, different on every rank and micro-batch."""

    def __init__(self, args, rank, world, device):
        self.data = torch.frombuffer(bytearray(pathlib.Path(args.data).read_bytes()), dtype=torch.uint8).long()
        if self.data.numel() <= args.seq + 1:
            raise SystemExit(f"--data {args.data}: {self.data.numel()} bytes, expected more than --seq + 1 = "
                             f"{args.seq + 1}")
        self.args, self.rank, self.world, self.device = args, rank, world, device

    def __call__(self, step, micro):
        a = self.args
        g = torch.Generator().manual_seed(((step * a.micro_batches + micro) * self.world + self.rank) * 7919)
        starts = torch.randint(0, self.data.numel() - a.seq - 1, (a.batch,), generator=g)
        return torch.stack([self.data[s:s + a.seq + 1] for s in starts.tolist()]).to(self.device)


def report(args, step, loss, opt, start, world, rank, lr=None):
    """Every steps / 8 steps and the last: the mean loss over ranks, the norm, tokens per second."""
    if not (step % max(1, args.steps // 8) == 0 or step == args.steps - 1):
        return
    reported = loss.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(reported)
    if rank == 0:
        tokens = (step + 1) * args.micro_batches * args.batch * args.seq * world
        rate = f"lr {lr:.2e}  " if lr is not None else ""
        print(f"step {step:4d}  loss {float(reported) / world:.3f}  grad norm {float(opt.last_norm):.3f}  {rate}"
              f"{tokens / (time.perf_counter() - start):,.0f} tok/s", flush=True)


def main():
    parser = loop_arguments(__doc__.splitlines()[0], steps=200, lr=3e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    device, rank, world = init_distributed()
    windows = ByteWindows(args, rank, world, device)
    torch.manual_seed(0)
    model = GPT(256, args.seq, args.layers, args.heads, args.dim).to(device)
    scaletrain.nn.convert_model_to_efficient_attention(model)  # scaletrain
    # Stage 3 gathers each block's parameters around its forward and backward (the rest per module).
    sharded = dict(model=model, units=model.blocks) if args.stage == 3 else {}
    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,  # scaletrain
                                     stage=args.stage, max_grad_norm=1.0, cpu_offload=args.cpu_offload,
                                     overlap_forward=args.cpu_offload, **sharded)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    acc = scaletrain.accum.accumulate(model, opt, args.micro_batches, scheduler=sched)  # scaletrain

    start = time.perf_counter()
    for step in range(args.steps):
        for micro in range(args.micro_batches):
            window = windows(step, micro)
            x, y = window[:, :-1], window[:, 1:]
            with acc:  # scaletrain: no_sync but on the last micro-batch, which steps the optimizer
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
                acc.backward(loss, tokens=y.numel())  # scaletrain
        report(args, step, loss, opt, start, world, rank, lr=sched.get_last_lr()[0])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
