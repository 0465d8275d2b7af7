"""scaletrain.amp.LossScaler against torch.amp.GradScaler (the reference): same scale after every
update, same skipped steps and bit-identical weights on a crafted overflow sequence; hysteresis
against Megatron-LM's DynamicGradScaler rules; the fused clip against torch.nn.utils.clip_grad_norm_."""

import random
import warnings

import pytest
import torch

import scaletrain
from scaletrain.amp import LossScaler, unscale_check_clip_

# Steps whose gradients get an inf or a NaN (as an fp16 overflow would), and a run long enough for
# the scale to grow several times with growth_interval=3.
OVERFLOW_STEPS = {2, 3, 4, 9, 10, 17, 18, 19, 20, 21, 30}


def lockstep(device, steps=40, poison=float("inf")):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2)).to(device)
    ours = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2)).to(device)
    ours.load_state_dict(theirs.state_dict())
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    reference = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    scaler = LossScaler(init_scale=2.0**10, growth_interval=3)
    history = []
    for step in range(steps):
        x, y = torch.randn(32, 8, device=device), torch.randn(32, 2, device=device)
        for model, opt, s in ((theirs, opt_theirs, reference), (ours, opt_ours, scaler)):
            opt.zero_grad()
            s.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if step in OVERFLOW_STEPS:
                model[0].weight.grad[0, 0] = poison
            s.step(opt)
            s.update()
        history.append((reference.get_scale(), scaler.get_scale()))
        for a, b in zip(theirs.parameters(), ours.parameters()):
            assert torch.equal(a, b), f"step {step}: weights differ from GradScaler's run"
    return history, scaler


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_same_scale_trajectory_and_skips_as_gradscaler(poison):
    history, scaler = lockstep("cpu", poison=poison)
    assert [theirs for theirs, _ in history] == [ours for _, ours in history]
    assert scaler.skipped_steps == len(OVERFLOW_STEPS)
    scales = [s for s, _ in history]
    assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:]))


@pytest.mark.gpu
def test_same_scale_trajectory_and_skips_as_gradscaler_cuda():
    history, scaler = lockstep("cuda")
    assert [theirs for theirs, _ in history] == [ours for _, ours in history]
    assert scaler.skipped_steps == len(OVERFLOW_STEPS)


class MegatronDynamicGradScaler:
    """megatron/core/optimizer/grad_scaler.py DynamicGradScaler.update, in plain Python."""

    def __init__(self, initial_scale, min_scale, growth_factor, backoff_factor, growth_interval, hysteresis):
        self.scale, self.min_scale = initial_scale, min_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker, self.hysteresis_tracker = 0, hysteresis

    def update(self, found_inf):
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor


def test_hysteresis_follows_megatron_rules():
    rng = random.Random(3)
    overflows = [rng.random() < 0.35 for _ in range(300)]
    reference = MegatronDynamicGradScaler(2.0**12, 4.0, 2.0, 0.5, 4, 3)
    scaler = LossScaler(init_scale=2.0**12, min_scale=4.0, growth_interval=4, hysteresis=3, max_scale=2.0**40)
    grads = [torch.ones(4)]
    for found in overflows:
        grads[0].fill_(float("inf") if found else 1.0)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
        opt.param_groups[0]["params"][0].grad = grads[0]
        scaler.step(opt)
        scaler.update()
        reference.update(found)
        assert scaler.get_scale() == reference.scale
    assert scaler.skipped_steps == sum(overflows)


def test_fused_clip_matches_clip_grad_norm():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 1000, 70000, 5)]
    for p in params:
        p.grad = torch.randn_like(p) * 512
    ours = [p.grad.clone() for p in params]
    torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], torch.zeros(1), torch.full((1,), 1 / 512))
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    found, our_norm = unscale_check_clip_(ours, 1 / 512, 1.0).tolist()
    assert found == 0
    assert our_norm == pytest.approx(norm.item(), rel=1e-5)
    for p, g in zip(params, ours):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


def test_state_dict_round_trip_and_gradscaler_state():
    _, scaler = lockstep("cpu", steps=12)
    state = scaler.state_dict()
    again = LossScaler(init_scale=2.0**10, growth_interval=3)
    again.load_state_dict(state)
    assert again.state_dict() == state
    reference = torch.amp.GradScaler("cpu", init_scale=123.0)
    from_torch = LossScaler()
    from_torch.load_state_dict(reference.state_dict())
    assert from_torch.get_scale() == 123.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)
    with pytest.raises(ValueError, match=r"grads\[0\]: dtype Int"):
        unscale_check_clip_([torch.ones(3, dtype=torch.int32)], 1.0, 0.0)
    with pytest.raises(ValueError, match="expected a tensor"):
        LossScaler().scale("loss")
    with pytest.raises(RuntimeError, match="No inf checks"):
        LossScaler().update()
    assert scaletrain.amp.LossScaler is LossScaler


@pytest.mark.parametrize(
    "options",
    [
        dict(init_scale=0.1, growth_interval=3),
        dict(init_scale=2.0**10, growth_interval=3, growth_factor=1.5, backoff_factor=0.3),
        dict(init_scale=3.0, growth_interval=2, growth_factor=3.0, backoff_factor=0.7),
        dict(init_scale=1e-3, growth_interval=1, growth_factor=1.1, backoff_factor=0.999),
    ],
    ids=["init0.1", "growth1.5", "growth3", "growth1.1"],
)
def test_gradscaler_float32_arithmetic_with_factors_that_are_not_powers_of_two(options):
    """GradScaler keeps its scale in float32: with such factors every scale, skip and weight must
    still match it, and a state round trip through GradScaler and back must continue in lockstep."""
    torch.manual_seed(0)
    theirs = torch.nn.Linear(8, 2)
    ours = torch.nn.Linear(8, 2)
    ours.load_state_dict(theirs.state_dict())
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    reference = torch.amp.GradScaler("cpu", **options)
    scaler = LossScaler(**options)
    for step in range(60):
        if step == 30:  # GradScaler's state into a fresh LossScaler with default options
            scaler = LossScaler()
            scaler.load_state_dict(reference.state_dict())
        x, y = torch.randn(16, 8), torch.randn(16, 2)
        for model, opt, s in ((theirs, opt_theirs, reference), (ours, opt_ours, scaler)):
            opt.zero_grad()
            s.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if step % 7 in (2, 3):
                model.weight.grad[0, 0] = float("inf")
            s.step(opt)
            s.update()
        assert reference.get_scale() == scaler.get_scale(), f"step {step}"
        for a, b in zip(theirs.parameters(), ours.parameters()):
            assert torch.equal(a, b), f"step {step}: weights differ from GradScaler's run"
    state = scaler.state_dict()
    for key in ("growth_factor", "backoff_factor", "growth_interval"):
        assert state[key] == reference.state_dict()[key], key


def test_fp16_loss_is_scaled_in_float32_as_gradscaler():
    loss = torch.tensor(3.0, dtype=torch.float16)
    ours, theirs = LossScaler().scale(loss), torch.amp.GradScaler("cpu").scale(loss)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.item() == theirs.item() == 3.0 * 2**16


def test_more_bad_input_is_named():
    with pytest.raises(ValueError, match="max_scale: got inf"):
        LossScaler(max_scale=float("inf"))
    with pytest.raises(ValueError, match=r"init_scale: got 0.5, expected a number in \[min_scale, max_scale\]"):
        LossScaler(init_scale=0.5, min_scale=1.0)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    opt = torch.optim.SGD([param], lr=0.1)
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="max_norm: got"):
            LossScaler().unscale_(opt, max_norm=bad)
        with pytest.raises(ValueError, match="max_norm: got"):
            unscale_check_clip_([param.grad], 1.0, bad)
    grad = torch.ones(8)
    with pytest.raises(ValueError, match=r"grads\[1\]: shares memory with grads\[0\]"):
        unscale_check_clip_([grad, grad], 0.5, 0.0)
    with pytest.raises(ValueError, match=r"grads\[1\]: shares memory with grads\[0\]"):
        unscale_check_clip_([grad[:5], grad[3:]], 0.5, 0.0)
    unscale_check_clip_([grad[:4], grad[4:]], 0.5, 0.0)  # adjacent views do not overlap
    assert torch.equal(grad, torch.full((8,), 0.5))
    for not_an_optimizer in (None, 3, [param]):
        with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
            LossScaler().unscale_(not_an_optimizer)
        with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
            LossScaler().step(not_an_optimizer)


def test_the_gradient_pass_is_a_dispatcher_op_torch_compile_traces():
    """torch.ops.scaletrain.unscale_check_clip_ / gradient_factor against torch's arithmetic, eager
    and under torch.compile(fullgraph=True) (the Meta kernels give the shapes)."""
    torch.manual_seed(0)
    grads = [torch.randn(37, 5), torch.randn(11)]
    scale, max_norm = 64.0, 0.5
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]) / scale)
    coef = min(1.0, max_norm / (float(norm) + 1e-6))

    values, factor = torch.ops.scaletrain.gradient_factor(grads, torch.tensor([1 / scale]), max_norm)
    assert float(values[0]) == 0 and abs(float(values[1]) - float(norm)) <= 1e-6 * float(norm)
    assert abs(float(factor) - coef / scale) <= 1e-6 * coef / scale

    compiled = torch.compile(lambda gs, s: torch.ops.scaletrain.gradient_factor(gs, s, max_norm), fullgraph=True,
                             backend="eager")
    c_values, c_factor = compiled(grads, torch.tensor([1 / scale]))
    assert torch.equal(c_values, values) and torch.equal(c_factor, factor)

    written = [g.clone() for g in grads]
    values, factor = torch.ops.scaletrain.unscale_check_clip_(written, 1 / scale, max_norm)
    for w, g in zip(written, grads):
        torch.testing.assert_close(w, g * (coef / scale), rtol=1e-6, atol=0)
    # The in-place op under torch.compile (functionalised) writes the same gradients.
    compiled_ = torch.compile(lambda gs: torch.ops.scaletrain.unscale_check_clip_(gs, 1 / scale, max_norm),
                              fullgraph=True)
    again = [g.clone() for g in grads]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*alias.*")  # torch's warning about outputs that alias
        c_values, _ = compiled_(again)
    assert torch.equal(c_values, values) and all(torch.equal(a, w) for a, w in zip(again, written))
    grads[1][3] = float("inf")
    values, _ = torch.ops.scaletrain.unscale_check_clip_([g.clone() for g in grads], 1 / scale, max_norm)
    assert float(values[0]) == 1
    with pytest.raises(ValueError, match="grads is empty"):
        torch.ops.scaletrain.gradient_factor([], torch.tensor([1.0]), 0.0)


def test_with_zero_adamw_the_scale_goes_into_its_step():
    """scaler.step(ZeroAdamW) passes 1 / scale into the optimizer's step (stage 2 frees the
    gradients): the same parameters as torch's AdamW on the unscaled loss; an inf step is skipped
    and the scale backs off."""
    from scaletrain.optim import ZeroAdamW

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))

    reference, model = make(), make()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, eps=1e-5)
    opt = ZeroAdamW(model.parameters(), lr=1e-3, eps=1e-5, stage=2, max_grad_norm=0.5)
    scaler = LossScaler(init_scale=1024.0, growth_interval=1000)
    for step in range(6):
        torch.manual_seed(10 + step)
        x, y = torch.randn(5, 6), torch.randn(5, 2)
        poison = step == 3
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if not poison:
            torch.nn.functional.mse_loss(reference(x), y).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()
        for a, b in zip(model.parameters(), reference.parameters()):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-6, f"step {step}"
    assert scaler.get_scale() == 512.0 and scaler.skipped_steps == 1
    with pytest.raises(RuntimeError, match="give it max_grad_norm"):
        scaler.unscale_(opt)
