"""Mixed precision: a dynamic loss scaler shaped like ``torch.amp.GradScaler``.

    scaler = scaletrain.amp.LossScaler()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer, max_norm=1.0)   # optional: fused unscale + inf check + clip
    scaler.step(optimizer)                     # skipped when a gradient is inf/NaN
    scaler.update()

Differences from GradScaler: ``hysteresis`` (overflows tolerated before backing off, as
Megatron-LM), optional ``min_scale``/``max_scale``, ``skipped_steps``, and ``unscale_(optimizer,
max_norm)`` that unscales, checks and clips all gradients in one fused pass (``clip_grad_norm_``
afterwards is then unnecessary). The scale is a float32 updated with GradScaler's arithmetic, so
with ``hysteresis=1`` and no bounds (the default) the scale trajectory, the skipped steps and the
weights are GradScaler's for any init_scale and factors.
"""

from __future__ import annotations

import math

import torch

from scaletrain._C import amp as _amp

unscale_check_clip_ = _amp.unscale_check_clip_

# GradScaler's scale is a float32 with no bounds of its own: the smallest normal and largest float32.
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max

__all__ = ["LossScaler", "unscale_check_clip_"]


class LossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float | None = None,
        max_scale: float | None = None,
        dynamic: bool = True,
        enabled: bool = True,
    ) -> None:
        """Arguments as torch.amp.GradScaler's, plus ``hysteresis`` (overflows tolerated before the
        scale backs off), ``min_scale`` and ``max_scale`` (bounds of the scale; None: none beyond
        float32's own, as GradScaler) and ``dynamic`` (False: the scale stays at ``init_scale``).
        Raises ValueError naming a bad argument."""
        self._enabled = enabled
        min_scale = _FLOAT32_TINY if min_scale is None else min_scale
        max_scale = _FLOAT32_MAX if max_scale is None else max_scale
        self._options = dict(
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            hysteresis=hysteresis,
            min_scale=min_scale,
            max_scale=max_scale,
            dynamic=dynamic,
        )
        self._core = self._make_core(self._options)
        self._checks: dict[int, torch.Tensor] = {}  # id(optimizer) -> [found_inf, norm], this step
        self._scale_tensors: dict[torch.device, tuple[float, torch.Tensor]] = {}

    @staticmethod
    def _make_core(options: dict):
        """The native scaler for ``options``; raises ValueError naming a bad option (a float32 scale:
        init_scale, min_scale and max_scale must be finite, init_scale within [min_scale, max_scale])."""
        return _amp.LossScalerCore(
            float(options["init_scale"]),
            float(options["growth_factor"]),
            float(options["backoff_factor"]),
            int(options["growth_interval"]),
            int(options["hysteresis"]),
            float(options["min_scale"]),
            float(options["max_scale"]),
            bool(options["dynamic"]),
        )

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
            # As GradScaler: times a float32 0-dim tensor, so an fp16 loss is scaled in float32.
            return outputs * self._scale_tensor(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise ValueError(f"outputs: expected a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def _scale_tensor(self, device: torch.device) -> torch.Tensor:
        scale = self._core.get_scale()
        cached = self._scale_tensors.get(device)
        if cached is None or cached[0] != scale:
            cached = (scale, torch.full((), scale, dtype=torch.float32, device=device))
            self._scale_tensors[device] = cached
        return cached[1]

    @staticmethod
    def _grads(optimizer) -> list[torch.Tensor]:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, (list, tuple)):
            raise TypeError(
                f"optimizer: expected a torch.optim.Optimizer (an object with param_groups), "
                f"got {type(optimizer).__name__}"
            )
        return [p.grad for group in groups for p in group["params"] if p.grad is not None]

    @staticmethod
    def _is_zero(optimizer) -> bool:
        from scaletrain.optim import ZeroAdamW

        return isinstance(optimizer, ZeroAdamW)

    def unscale_(self, optimizer, max_norm: float = 0.0) -> torch.Tensor:
        """Unscale the optimizer's gradients in place, check them for inf/NaN and, with max_norm > 0,
        clip their global norm. Returns the norm before clipping (a 0-dim device tensor)."""
        if self._is_zero(optimizer):
            raise RuntimeError("unscale_(): a ZeroAdamW unscales, checks and clips inside its step (its gradients "
                               "are being reduced or freed): give it max_grad_norm and call scaler.step(optimizer)")
        max_norm = float(max_norm)
        if math.isnan(max_norm) or max_norm < 0:
            raise ValueError(f"max_norm: got {max_norm}, expected a number >= 0 (0 or inf: no clipping)")
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
            self._grads(optimizer)  # the same TypeError for a non-optimizer, enabled or not
            return optimizer.step(*args, **kwargs)
        if self._is_zero(optimizer):
            # ZeroAdamW: 1 / scale goes into its step, which skips on an inf on any rank; its flag
            # and norm are this step's check.
            result = optimizer.step(*args, inv_scale=1.0 / self._core.get_scale(), **kwargs)
            self._checks[id(optimizer)] = torch.cat([optimizer.last_found_inf.reshape(1), optimizer.last_norm.reshape(1)])
            return result
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
        options = {k: v for k, v in self._options.items() if k != "init_scale"}
        return {
            "scale": scale,
            "_growth_tracker": growth,
            "_hysteresis_tracker": hysteresis,
            "skipped_steps": skipped,
            **options,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a LossScaler or torch.amp.GradScaler state: the scale and growth tracker, and the
        options the state holds (growth_factor, backoff_factor, growth_interval as GradScaler does;
        hysteresis, min_scale, max_scale, dynamic from a LossScaler state)."""
        if not self._enabled:
            return
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("scale", "_growth_tracker") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing {', '.join(missing)} (expected a LossScaler or GradScaler state)")
        options = dict(self._options)
        options.update({k: state_dict[k] for k in self._options if k in state_dict and k != "init_scale"})
        scale = float(state_dict["scale"])
        # GradScaler sets its init_scale to the loaded scale; here it must also lie in the bounds.
        options["init_scale"] = min(max(scale, float(options["min_scale"])), float(options["max_scale"]))
        core = self._make_core(options)
        core.load_state(
            scale,
            int(state_dict["_growth_tracker"]),
            int(state_dict.get("_hysteresis_tracker", options["hysteresis"])),
            int(state_dict.get("skipped_steps", 0)),
        )
        self._core, self._options = core, options
        self._checks.clear()
