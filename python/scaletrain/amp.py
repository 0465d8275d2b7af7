"""Mixed precision: a dynamic loss scaler shaped like ``torch.amp.GradScaler``.

    scaler = scaletrain.amp.LossScaler()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer, max_norm=1.0)   # optional: fused unscale + inf check + clip
    scaler.step(optimizer)                     # skipped when a gradient is inf/NaN
    scaler.update()

Differences from GradScaler: ``hysteresis`` (overflows tolerated before backing off, as
Megatron-LM), ``min_scale``/``max_scale``, ``skipped_steps``, and ``unscale_(optimizer, max_norm)``
that unscales, checks and clips all gradients in one fused pass (``clip_grad_norm_`` afterwards
is then unnecessary). With ``hysteresis=1`` and the scale within its bounds, the scale trajectory
and the skipped steps are GradScaler's.
"""

from __future__ import annotations

import torch

from scaletrain._C import amp as _amp

unscale_check_clip_ = _amp.unscale_check_clip_

__all__ = ["LossScaler", "unscale_check_clip_"]


class LossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        dynamic: bool = True,
        enabled: bool = True,
    ) -> None:
        self._enabled = enabled
        self._core = _amp.LossScalerCore(
            init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale, dynamic
        )
        self._options = dict(
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
            dynamic=dynamic,
        )
        self._checks: dict[int, torch.Tensor] = {}  # id(optimizer) -> [found_inf, norm], this step

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        return self._core.get_scale() if self._enabled else 1.0

    @property
    def skipped_steps(self) -> int:
        return self._core.skipped_steps()

    def scale(self, outputs):
        """Multiply a tensor (or nested lists/tuples of tensors) by the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            return outputs * self._core.get_scale()
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise ValueError(f"outputs: expected a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    @staticmethod
    def _grads(optimizer) -> list[torch.Tensor]:
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def unscale_(self, optimizer, max_norm: float = 0.0) -> torch.Tensor:
        """Unscale the optimizer's gradients in place, check them for inf/NaN and, with max_norm > 0,
        clip their global norm. Returns the norm before clipping (a 0-dim device tensor)."""
        if not self._enabled:
            grads = self._grads(optimizer)
            return _amp.unscale_check_clip_(grads, 1.0, max_norm)[1] if grads else torch.zeros(())
        if id(optimizer) in self._checks:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        grads = self._grads(optimizer)
        if grads:
            check = _amp.unscale_check_clip_(grads, 1.0 / self._core.get_scale(), max_norm)
        else:
            check = torch.zeros(2)
        self._checks[id(optimizer)] = check
        return check[1]

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless done this step) and call optimizer.step() unless a gradient was inf/NaN."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if id(optimizer) not in self._checks:
            self.unscale_(optimizer)
        if self._checks[id(optimizer)][0].item() != 0:
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """End the step: back off after an overflow, grow after growth_interval good steps."""
        if not self._enabled:
            return
        if new_scale is not None:
            _, growth, hysteresis, skipped = self._core.state()
            self._core.load_state(float(new_scale), growth, hysteresis, skipped)
            self._checks.clear()
            return
        if not self._checks:
            raise RuntimeError("No inf checks were recorded prior to update(): call unscale_() or step() first.")
        found_inf = any(check[0].item() != 0 for check in self._checks.values())
        self._checks.clear()
        self._core.update(found_inf)

    def state_dict(self) -> dict:
        if not self._enabled:
            return {}
        scale, growth, hysteresis, skipped = self._core.state()
        return {
            "scale": scale,
            "_growth_tracker": growth,
            "_hysteresis_tracker": hysteresis,
            "skipped_steps": skipped,
            **self._options,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        missing = [k for k in ("scale", "_growth_tracker") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing {', '.join(missing)} (expected a LossScaler or GradScaler state)")
        self._core.load_state(
            float(state_dict["scale"]),
            int(state_dict["_growth_tracker"]),
            int(state_dict.get("_hysteresis_tracker", self._options["hysteresis"])),
            int(state_dict.get("skipped_steps", 0)),
        )
