"""scaletrain.accum.accumulate against one big batch: micro-batches with different numbers of real
tokens, weighted by tokens, give the step of the whole batch's mean token loss (torch.optim.AdamW,
ZeroAdamW, DDP on 2 Gloo ranks); the hand-written loop that divides by the number of micro-batches
does not."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scaletrain.accum import accumulate
from scaletrain.optim import ZeroAdamW

VOCAB, SEQ, ROWS, MICRO, STEPS, LR, EPS = 11, 6, 4, 3, 3, 1e-3, 1e-5


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 16), torch.nn.Tanh(), torch.nn.Linear(16, VOCAB))


def micro_batches(step, rows=ROWS):
    """MICRO micro-batches of `rows` sequences; in micro-batch i, row r ends with i + 1 + r // 2
    padded (-100) targets, so the micro-batches' real token counts differ, and so do those of the
    first and the second half of the rows (two ranks' shares)."""
    torch.manual_seed(1000 + step)
    out = []
    for i in range(MICRO):
        x = torch.randint(0, VOCAB, (rows, SEQ))
        y = torch.randint(0, VOCAB, (rows, SEQ))
        for r in range(rows):
            y[r, SEQ - 1 - i - r // 2:] = -100
        out.append((x, y))
    return out


def mean_loss(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)


def one_batch_run(clip=0.5):
    """The reference: each step's micro-batches concatenated, one mean over all real tokens."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    params = []
    for step in range(STEPS):
        batches = micro_batches(step)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        mean_loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        params.append([p.detach().clone() for p in model.parameters()])
    return params


def accumulate_run(optimizer="torch", tokens=True, rank=0, world=1, ddp=False):
    model = make_model()
    if optimizer == "zero":
        opt = ZeroAdamW(model.parameters(), lr=LR, eps=EPS, stage=2, max_grad_norm=0.5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    trained = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    acc = accumulate(trained, opt, MICRO, max_grad_norm=0.5)
    params = []
    local = ROWS // world
    for step in range(STEPS):
        for x, y in micro_batches(step):
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            with acc:
                loss = mean_loss(trained, x, y)
                acc.backward(loss, tokens=(y != -100).sum() if tokens else None)
        assert acc.stepped
        params.append([p.detach().clone() for p in model.parameters()])
    return params


def worst_error(got, expected):
    return max(float((a - b).abs().max() / b.abs().max()) for gs, es in zip(got, expected) for a, b in zip(gs, es))


def test_token_weighted_micro_batches_equal_one_batch():
    assert worst_error(accumulate_run(), one_batch_run()) <= 1e-6


def test_dividing_by_the_number_of_micro_batches_does_not():
    """What the hand-written loop does: each micro-batch's mean weighs 1/MICRO. Its tokens do not
    weigh alike, so it is not the one-batch step."""
    assert worst_error(accumulate_run(tokens=False), one_batch_run()) > 1e-4


def test_without_tokens_it_is_the_divided_loop():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    expected = []
    for step in range(STEPS):
        for x, y in micro_batches(step):
            (mean_loss(model, x, y) / MICRO).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        expected.append([p.detach().clone() for p in model.parameters()])
    assert worst_error(accumulate_run(tokens=False), expected) <= 1e-6


def test_with_zero_adamw():
    """ZeroAdamW (stage 2 frees the gradients): the 1 / tokens factor goes into its step."""
    assert worst_error(accumulate_run(optimizer="zero"), one_batch_run()) <= 1e-6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, optimizer, ddp, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = accumulate_run(optimizer=optimizer, rank=rank, world=world, ddp=ddp)
        queue.put((rank, [[p.tolist() for p in step] for step in params]))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer,ddp", [("torch", True), ("zero", False)])
def test_two_ranks_equal_one_batch(optimizer, ddp):
    """Each rank takes half of every micro-batch's rows; its token counts differ from the other's.
    The counts are summed over the ranks: the step is the one-batch step of all rows."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=rank_main, args=(r, 2, port, optimizer, ddp, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = one_batch_run()
    for rank, params in results:
        assert worst_error([[torch.tensor(p) for p in step] for step in params], expected) <= 1e-6, rank


def test_bad_arguments_name_themselves():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="steps 0"):
        accumulate(model, opt, 0)
    with pytest.raises(ValueError, match="max_grad_norm -1"):
        accumulate(model, opt, 2, max_grad_norm=-1)
    acc = accumulate(model, opt, 2)
    x, y = micro_batches(0)[0]
    with acc:
        acc.backward(mean_loss(model, x, y), tokens=(y != -100).sum())
    with pytest.raises(ValueError, match="tokens on every micro-step"):
        with acc:
            acc.backward(mean_loss(model, x, y))
