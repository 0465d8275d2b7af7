"""Hugging Face transformers' GPT-2 (built from a config: nothing is downloaded) trained by a plain
PyTorch loop with scaletrain's optimizer, accumulation, flash attention, fused loss and GELU (lines marked
`# scaletrain`). It learns the bytes of a text file (the README by default) with a 256-token vocabulary.

    python examples/python/hf_gpt2.py                          # a small GPT-2 on the CPU or one GPU
    python examples/python/hf_gpt2.py --gpt2-124m --batch 16 --seq 1024 --cpu-offload   # GPT-2 124M's shapes
    torchrun --nproc_per_node 2 examples/python/hf_gpt2.py     # 2 ranks: ZeRO-2 over Gloo or NCCL

Needs `pip install transformers`. The options, data and process-group set-up are train_gpt.py's.
"""
import time

import torch
import torch.distributed as dist

import scaletrain  # scaletrain
from train_gpt import ByteWindows, init_distributed, loop_arguments, report  # the loop's set-up, shared


def main():
    parser = loop_arguments(__doc__.splitlines()[0], steps=100, lr=1e-3)
    parser.add_argument("--gpt2-124m", action="store_true", help="12 layers, 12 heads, 768 wide (else 2, 4, 128)")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device, rank, world = init_distributed()
    windows = ByteWindows(args, rank, world, device)
    shape = dict(n_layer=12, n_head=12, n_embd=768) if args.gpt2_124m else dict(n_layer=2, n_head=4, n_embd=128)
    torch.manual_seed(0)
    # No dropout (as in nanoGPT's pretraining): attention dropout would keep transformers' SDPA path.
    config = GPT2Config(vocab_size=256, n_positions=max(args.seq, 64), bos_token_id=0, eos_token_id=0,
                        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **shape)
    model = GPT2LMHeadModel(config).to(device)
    scaletrain.nn.convert_model(model)  # scaletrain: flash attention, fused loss, one-kernel GELU
    sharded = dict(model=model, units=model.transformer.h) if args.stage == 3 else {}  # stage 3: per block
    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, stage=args.stage,  # scaletrain
                                     max_grad_norm=1.0, cpu_offload=args.cpu_offload,
                                     overlap_forward=args.cpu_offload, **sharded)
    acc = scaletrain.accum.accumulate(model, opt, args.micro_batches)  # scaletrain

    start = time.perf_counter()
    for step in range(args.steps):
        for micro in range(args.micro_batches):
            x = windows(step, micro)[:, :-1]
            with acc:  # scaletrain
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = model(x, labels=x).loss  # the mean over the seq - 1 shifted targets of each row
                acc.backward(loss, tokens=x.shape[0] * (x.shape[1] - 1))  # scaletrain
        report(args, step, loss, opt, start, world, rank)
    if rank == 0 and device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; optimizer state in host memory "
              f"{opt.memory()['host_bytes'] / 2**30:.2f} GiB")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
