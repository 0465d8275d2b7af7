"""A plain PyTorch loop with scaletrain.optim.ZeroAdamW in place of torch.optim.AdamW + DDP.

    python examples/python/zero_adamw.py                            # one process
    torchrun --nproc_per_node 2 examples/python/zero_adamw.py       # 2 ranks (Gloo on CPU, NCCL on GPUs)
    python examples/python/zero_adamw.py --cpu-offload              # the state in host memory, stepped by the CPU
"""
import os
import sys

import torch
import torch.distributed as dist

import scaletrain

if "RANK" in os.environ:
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
else:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).to(device)
offload = "--cpu-offload" in sys.argv[1:]
opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, stage=2, max_grad_norm=1.0,
                                 cpu_offload=offload, overlap_forward=offload)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

for step in range(100):
    torch.manual_seed(step)  # the same global batch on every rank; each takes its rows
    x = torch.randn(64, 64, device=device)
    y = x.flip(1)
    rows = slice(rank * 64 // world, (rank + 1) * 64 // world)
    loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    if step % 25 == 0 or step == 99:
        dist.all_reduce(loss) if dist.is_initialized() else None
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item() / world:.4f}  grad norm {opt.last_norm.item():.3f}")
if rank == 0:
    memory = opt.memory()
    if offload:
        print(f"rank 0 of {world}: on the device {memory['optimizer_bytes'] / 1024:.1f} KiB of optimizer state; in host "
              f"memory {memory['host_bytes'] / 1024:.1f} KiB (fp32 master, moments and gradient chunks)")
    else:
        print(f"rank 0 of {world}: optimizer state {memory['optimizer_bytes'] / 1024:.1f} KiB "
              f"(AdamW over all {sum(p.numel() for p in model.parameters())} parameters: "
              f"{8 * sum(p.numel() for p in model.parameters()) / 1024:.1f} KiB)")
if dist.is_initialized():
    dist.destroy_process_group()
