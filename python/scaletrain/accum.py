"""Gradient accumulation for a plain PyTorch loop: one optimizer step over several micro-batches that
equals the step of one big batch.

A loop that accumulates by hand divides each micro-batch's mean loss by the number of micro-batches
and all-reduces gradients (under DDP) on every backward. Both are wrong or slow: micro-batches with
different numbers of real tokens (padding, ragged lengths) are weighted wrongly, and the
all-reduces of all micro-batches but the last are wasted. ``accumulate`` fixes both::

    acc = scaletrain.accum.accumulate(model, opt, steps=4, max_grad_norm=1.0)
    for x, y in loader:                      # micro-batches
        with acc:                            # no_sync except on every 4th; the 4th steps the optimizer
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())    # mean over real tokens
            acc.backward(loss, tokens=(y != -100).sum())

With ``tokens`` the step's gradient is that of the mean loss over every real token of the step (on
every rank: the token count is summed over the ranks of a ``torch.distributed`` group); without,
each micro-batch weighs ``1 / steps``. ``model`` may be a ``DistributedDataParallel`` (its
``no_sync`` is used) and ``opt`` a ``scaletrain.optim.ZeroAdamW`` (its ``no_sync``; the 1 / tokens
factor goes into its ``step(inv_scale=...)``) or any ``torch.optim.Optimizer``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Union

import torch

__all__ = ["accumulate"]


class accumulate:  # noqa: N801  (used as a context manager, like torch.no_grad)
    """Counts micro-steps; every ``steps``-th one ends with the optimizer step.

    Args:
        model: the module being trained (``DistributedDataParallel`` or not).
        optimizer: a ``torch.optim.Optimizer`` or ``scaletrain.optim.ZeroAdamW``.
        steps: micro-batches per optimizer step (1: no accumulation).
        max_grad_norm: clip the global gradient norm to this before the step (``clip_grad_norm_``;
            ZeroAdamW clips with its own ``max_grad_norm`` option instead). None: no clipping.
        scheduler: an LR scheduler stepped after each optimizer step (optional).

    After a micro-step, ``stepped`` says whether it stepped the optimizer and ``grad_norm`` holds
    the norm clip_grad_norm_ returned (a tensor; None without clipping or with ZeroAdamW, whose
    ``last_norm`` has it).
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, steps: int, *, max_grad_norm: Optional[float] = None,
                 scheduler: Any = None) -> None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulate: steps {steps!r} (expected an int >= 1)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"accumulate: max_grad_norm {max_grad_norm!r} (expected > 0, or None)")
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.max_grad_norm = max_grad_norm
        self.scheduler = scheduler
        self.micro = 0
        self.stepped = False
        self.grad_norm: Optional[torch.Tensor] = None
        self._tokens: Optional[torch.Tensor] = None  # real tokens backpropagated in this step so far
        self._weighted: Optional[bool] = None        # whether this step's micro-steps gave tokens
        self._no_sync: Optional[contextlib.ExitStack] = None

    def _is_zero(self) -> bool:
        from .optim import ZeroAdamW

        return isinstance(self.optimizer, ZeroAdamW)

    def __enter__(self) -> "accumulate":
        self.stepped = False
        if self.micro + 1 < self.steps:  # gradients add up locally; the last micro-step reduces them
            self._no_sync = contextlib.ExitStack()
            if hasattr(self.model, "no_sync"):
                self._no_sync.enter_context(self.model.no_sync())
            if self._is_zero():
                self._no_sync.enter_context(self.optimizer.no_sync())
        return self

    def backward(self, loss: torch.Tensor, tokens: Union[int, torch.Tensor, None] = None) -> None:
        """Backpropagates this micro-batch's ``loss``: its mean over ``tokens`` real tokens (then
        weighted by its share of the step's tokens), or a mean loss weighted ``1 / steps``."""
        weighted = tokens is not None
        if self._weighted is None:
            self._weighted = weighted
        elif self._weighted != weighted:
            raise ValueError("accumulate.backward: give tokens on every micro-step of a step or on none")
        if not weighted:
            (loss / self.steps).backward()
            return
        count = torch.as_tensor(tokens, dtype=torch.float64, device=loss.device)
        if count.numel() != 1:
            raise ValueError(f"accumulate.backward: tokens has {count.numel()} elements (expected one count)")
        # The sum of this micro-batch's token losses (in fp32: a bf16 count is exact to 256 only);
        # the step divides by the total.
        (loss.float() * count.float()).backward()
        self._tokens = count if self._tokens is None else self._tokens + count

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if self._no_sync is not None:
            self._no_sync.close()
            self._no_sync = None
        if kind is not None:  # an error in the micro-step: leave the counts for the caller to reset
            return
        self.micro += 1
        if self.micro == self.steps:
            self._step()

    def _factor(self) -> Optional[torch.Tensor]:
        """1 / the step's real tokens (summed over ranks), times the world size when the gradients
        are averaged over ranks (DDP, ZeroAdamW): the factor that makes them the mean's."""
        if not self._weighted:
            return None
        total = self._tokens.clone()
        world = 1
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                dist.all_reduce(total)
        if not float(total) > 0:
            raise ValueError("accumulate: the step's micro-batches hold no tokens (the sum over ranks is 0)")
        return (world / total).to(torch.float32)

    def _step(self) -> None:
        factor = self._factor()
        if self._is_zero():
            self.optimizer.step(inv_scale=factor)
            self.grad_norm = None
        else:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if factor is not None and grads:
                torch._foreach_mul_(grads, float(factor))
            self.grad_norm = None
            if self.max_grad_norm is not None:
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad()
        if self.scheduler is not None:
            self.scheduler.step()
        self.micro = 0
        self._tokens = None
        self._weighted = None
        self.stepped = True
