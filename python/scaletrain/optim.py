"""Optimizers: ZeroAdamW, AdamW with its state sharded over the ranks of a process group (ZeRO
stages 1, 2 and 3), as a ``torch.optim.Optimizer``.

A script that trains with ``torch.optim.AdamW`` under ``torchrun`` changes one line::

    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=6e-4, weight_decay=0.1, stage=2,
                                     max_grad_norm=1.0)

and drops DDP: the optimizer averages the gradients itself, reduce-scattering them bucket by
bucket while backward runs, and keeps only its rank's share of AdamW's state (and, at stage 2,
of the gradients). With no ``torch.distributed`` group it is AdamW over flat buffers in one process.

``cpu_offload=True`` moves AdamW's state to pinned host memory and steps it on the CPU; on one GPU
it needs no ``torch.distributed`` set-up and no launcher::

    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=6e-4, stage=2, cpu_offload=True)

and with ``overlap_forward=True`` the CPU step overlaps the next forward.

``stage=3`` shards the parameters too; it needs the model, to gather each unit of parameters (a
transformer block) around its forward and backward::

    opt = scaletrain.optim.ZeroAdamW(model.parameters(), lr=6e-4, stage=3, model=model,
                                     units=model.transformer.h)
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from . import _C

__all__ = ["ZeroAdamW"]


def _default_group(process_group: Any) -> Any:
    if process_group is not None:
        return process_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _auto_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The elements of every ``nn.ModuleList`` / ``nn.Sequential`` that hold parameters (the
    transformer blocks), outermost first; nothing inside one of them is a unit of its own."""
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and \
                    next(child.parameters(), None) is not None:
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


Plan = list[tuple[torch.nn.Module, list[int], int, int]]


def _plan_units(model: torch.nn.Module, params: list[torch.Tensor],
                units: Optional[Iterable[torch.nn.Module]]) -> tuple[list[int], Plan]:
    """Stage 3: each parameter's unit and the hooks: (module, the units its forward gathers, the
    unit the forward needs next, the unit backward needs next; -1: none). Unit 0 holds the
    parameters outside every unit module (embeddings, final norm, head): ``model``'s forward
    gathers it for its whole length, with the units of any parameter that a module outside the
    unit modules shares with one (a tied head). Units 1.. are the unit modules in order, each
    gathered around its own forward (with the units of the parameters it shares with another)."""
    index = {id(p): i for i, p in enumerate(params)}
    given = list(units) if units is not None else _auto_units(model)
    for module in given:
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"ZeroAdamW: units must be modules, got {type(module).__name__}")
    inside = {id(m) for m in model.modules()}
    outside = [m for m in given if id(m) not in inside]
    if outside:
        raise ValueError(f"ZeroAdamW: {len(outside)} of units= are not modules of model=")
    in_model = {id(p) for p in model.parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in in_model]
    if missing:
        raise ValueError(f"ZeroAdamW: parameters {missing[:5]} are not in model= (stage 3 gathers each parameter "
                         "around the forward of model= or of its unit)")
    raw = [0] * len(params)
    for u, module in enumerate(given, start=1):
        for p in module.parameters():
            i = index.get(id(p))
            if i is not None and raw[i] == 0:
                raw[i] = u
    # Dense numbers, in order: 0 (when some parameter is outside every unit module), then the
    # unit modules that hold parameters of this optimizer.
    dense = {u: n for n, u in enumerate(sorted(set(raw)))}
    unit_of = [dense[u] for u in raw]
    unit_ids = [dense.get(u, -1) for u in range(1, len(given) + 1)]  # per unit module (-1: none)
    order = [u for u in unit_ids if u >= 0]
    first, last = (order[0], order[-1]) if order else (-1, -1)
    given_ids = {id(m) for m in given}
    # The parameters that modules outside every unit subtree hold directly.
    shared: set[int] = set()

    def walk(module: torch.nn.Module) -> None:
        for p in module._parameters.values():
            if p is not None and id(p) in index:
                shared.add(unit_of[index[id(p)]])
        for child in module.children():
            if id(child) not in given_ids:
                walk(child)

    walk(model)
    plan: Plan = []
    if 0 in dense and dense[0] == 0:
        plan.append((model, [0] + sorted(shared - {0}), first, last))
    for k, (module, u) in enumerate(zip(given, unit_ids)):
        if u < 0:
            continue
        needed = [u] + sorted({unit_of[index[id(p)]] for p in module.parameters() if id(p) in index} - {u})
        position = order.index(u)
        next_forward = order[position + 1] if position + 1 < len(order) else -1
        next_backward = order[position - 1] if position > 0 else -1
        plan.append((module, needed, next_forward, next_backward))
    return unit_of, plan


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s arithmetic) with ZeRO sharding.

    Args:
        params: parameters or param groups (dicts with ``params`` and any of ``lr``, ``betas``,
            ``eps``, ``weight_decay``), all of one dtype (fp32, bf16, fp16) and one device.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; per group; LR schedulers work.
        stage: 1 shards the optimizer state; 2 also the gradients (``p.grad`` is then ``None``
            after backward: each gradient moves into its bucket and is freed once reduced); 3 also
            the parameters: a rank keeps only its chunks, and each unit's parameters are
            all-gathered before the forward (and the backward) of a module that uses them and
            freed after, the next unit's gather overlapping the current unit's compute. Outside a
            module's forward the parameters have no storage: read or write them inside
            ``with opt.gathered_parameters():`` (saving the model, loading weights).
        model: stage 3: the module whose forward runs the parameters (hooks go on its submodules).
        units: stage 3: modules whose parameters are gathered together, in forward order (e.g.
            ``model.transformer.h``, the blocks), each around its own forward; the other parameters
            (embeddings, final norm, head) form one unit gathered around ``model``'s whole forward.
            Default: the elements of the model's ``nn.ModuleList`` and ``nn.Sequential`` containers.
        bucket_mb: size of a gradient bucket (the unit of reduce-scatter and all-gather) in MiB.
        max_grad_norm: clip the global gradient norm to this, as ``clip_grad_norm_`` (0: off).
        average_gradients: divide the summed gradients by the world size (DDP's mean).
        process_group: a ``torch.distributed`` group; default: the default group when one is
            initialised, else this process alone. Gloo for CPU parameters, NCCL for CUDA ones.
        cpu_offload: keep this rank's optimizer state (fp32 master, ``exp_avg``, ``exp_avg_sq``) in
            host memory (pinned for CUDA parameters) and step it with the CPU AdamW: each bucket's
            reduced gradients are copied to the host while backward goes on, and ``step()`` copies
            the updated values back bucket by bucket while the CPU steps the next one. The device
            keeps the parameters and the gradients in flight (stage 2: about 2 bytes per parameter
            of a bf16 model). The step is exact: the same results as without offload.
        overlap_forward: with ``cpu_offload``, ``step()`` returns once the gradient norm is known
            and the CPU steps the buckets behind it, from the model's first parameters; each
            module's forward waits (a global forward pre-hook) for its own parameters only, so the
            CPU step overlaps the next forward. Parameters read outside a module's forward before
            then are stale, and writes race with the copies back: call ``synchronize()`` first
            (``state_dict()`` and the optimizer's other methods do). With several ranks the
            optimizer makes its own process group (``dist.new_group``) for the collectives that run
            behind ``step()``.
        offload_fraction: with ``cpu_offload``, the share of the optimizer state moved to the host,
            in (0, 1]. The rest, the parameters the next forward needs first (whole buckets), keeps
            its state on the device and is stepped there, so that the forward starts at once while
            the CPU steps the others (with ``overlap_forward``).

    ``state_dict()`` / ``load_state_dict()`` hold torch.optim.AdamW's state, whole (see there).
    A parameter that gets no gradient in a step counts as a zero gradient (weight decay applies).
    ``torch.amp.GradScaler`` cannot see the gradients (stage 2 frees them; stage 1's are being
    reduced): ``scaletrain.amp.LossScaler``'s ``scaler.step(opt)`` passes ``inv_scale`` to ``step``
    (or pass it yourself).
    The parameters become views into one flat buffer (rank 0's values are broadcast to every
    rank). After ``step()``, ``last_found_inf`` and ``last_norm`` hold the step's inf flag (1: the
    step was skipped on every rank) and the global norm, as one-element tensors on the device (no
    synchronisation until read). ``step(inv_scale=t)`` multiplies the gradients by ``t`` first
    (1 / loss scale: a number, or a one-element tensor on any device).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        stage: int = 1,
        bucket_mb: float = 25.0,
        max_grad_norm: float = 0.0,
        average_gradients: bool = True,
        process_group: Any = None,
        cpu_offload: bool = False,
        overlap_forward: bool = False,
        offload_fraction: float = 1.0,
        model: Optional[torch.nn.Module] = None,
        units: Optional[Iterable[torch.nn.Module]] = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        groups = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            groups.append((list(group["params"]), group["lr"], beta1, beta2, group["eps"], group["weight_decay"]))
        first = self.param_groups[0]["params"][0]
        group = _default_group(process_group)
        if overlap_forward and group is not None:
            import torch.distributed as dist

            if dist.get_world_size(group) > 1:
                # The step's all-gathers run on a worker thread after step() returns: on a group of
                # their own, so that the script's collectives (a logged loss) cannot interleave.
                group = dist.new_group(ranks=dist.get_process_group_ranks(group), use_local_synchronization=True)
        flat = [p for g in self.param_groups for p in g["params"]]
        unit_of: list[int] = []
        plan: Plan = []
        if stage == 3:
            if not isinstance(model, torch.nn.Module):
                raise ValueError("ZeroAdamW: stage 3 needs model= (the module whose forward uses the parameters), "
                                 f"got {type(model).__name__}")
            unit_of, plan = _plan_units(model, flat, units)
        elif model is not None or units is not None:
            raise ValueError(f"ZeroAdamW: model= and units= are for stage 3 (got stage={stage})")
        # Bad options or parameters raise ValueError naming them; a failed collective RuntimeError.
        self._core = _C.optim.ZeroAdamWCore(
            groups,
            stage=stage,
            cpu_offload=cpu_offload,
            overlap_forward=overlap_forward,
            offload_fraction=offload_fraction,
            bucket_mb=bucket_mb,
            max_grad_norm=max_grad_norm,
            average_gradients=average_gradients,
            process_group=group,
            device_type=first.device.type,
            units=unit_of,
        )
        self.stage = stage
        self._device = first.device
        self.last_found_inf: Optional[torch.Tensor] = None
        self.last_norm: Optional[torch.Tensor] = None
        self._hook = None
        self._waiting: dict[int, int] = {}  # overlap_forward: id(param) -> index, of the step in flight
        self._unit_hooks: list[Any] = []
        if overlap_forward and stage != 3:  # stage 3 waits for a unit's step when it gathers it
            self._install_forward_wait()
        if stage == 3:
            self._install_unit_hooks(plan)

    def _install_unit_hooks(self, plan: Plan) -> None:
        core = self._core
        from torch.utils._pytree import tree_flatten

        def pre(needed: list[int], next_forward: int) -> Any:
            def hook(module: torch.nn.Module, args: Any) -> None:
                core.gather_unit(needed[0], next_forward)
                for u in needed[1:]:
                    core.gather_unit(u, -1)
            return hook

        def post(needed: list[int], next_backward: int) -> Any:
            def prepare(grad: torch.Tensor) -> None:
                core.prepare_backward(needed[0], next_backward)
                for u in needed[1:]:
                    core.prepare_backward(u, -1)

            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                for u in needed:
                    core.release_unit(u)
                if not torch.is_grad_enabled():
                    return
                # Backward gathers the units again when it reaches these outputs.
                for t in tree_flatten(output)[0]:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(prepare)
            return hook

        for module, needed, next_forward, next_backward in plan:
            self._unit_hooks.append(module.register_forward_pre_hook(pre(needed, next_forward)))
            # always_call: a forward that raises releases its units too.
            self._unit_hooks.append(module.register_forward_hook(post(needed, next_backward), always_call=True))

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Stage 3: every parameter whole inside (a collective: every rank enters together); writes
        made inside are kept (each rank keeps its chunks). Nothing to do at stages 1-2::

            with opt.gathered_parameters():
                torch.save(model.state_dict(), "model.pt")
        """
        self._core.gather_parameters()
        try:
            yield
        finally:
            self._core.release_parameters()

    def _install_forward_wait(self) -> None:
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._index = index
        ref = weakref.ref(self)

        def wait_for_parameters(module: torch.nn.Module, args: Any) -> None:
            opt = ref()
            if opt is None or not opt._waiting:
                return
            # A module with parameters of its own may also read its children's directly (as
            # nn.MultiheadAttention reads out_proj's): it waits for those too.
            own = list(module._parameters.values())
            params = module.parameters() if own and next(module.children(), None) is not None else own
            for p in params:
                i = opt._waiting.pop(id(p), None) if p is not None else None
                if i is not None:
                    opt._core.wait_parameter(i)

        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(wait_for_parameters)

    def __del__(self) -> None:
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
        for handle in getattr(self, "_unit_hooks", []):
            handle.remove()

    def synchronize(self) -> None:
        """Waits for a step still running on the CPU (``overlap_forward``) and makes the current CUDA
        stream wait for every parameter's new values."""
        self._waiting = {}
        self._core.synchronize()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_core"):  # torch.optim.Optimizer.__init__ adds the constructor's groups
            raise NotImplementedError("ZeroAdamW: param groups are fixed at construction (the flat buffer holds them)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None, inv_scale: Union[float, torch.Tensor, None] = None) -> Any:  # type: ignore[override]
        """One step on every rank (call it on all ranks together). ``inv_scale``: a number or a
        one-element tensor (moved to the parameters' device as float32)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            self._core.set_group(index, float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])
        if isinstance(inv_scale, torch.Tensor):
            inv_scale = inv_scale.to(self._device, torch.float32).reshape(1)
        elif inv_scale is not None:  # filled on the device: no host-to-device copy, no synchronisation
            inv_scale = torch.full((1,), float(inv_scale), dtype=torch.float32, device=self._device)
        self.last_found_inf, self.last_norm = self._core.step(inv_scale)
        if self._hook is not None:
            self._waiting = dict(self._index)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Stage 1 zeroes the flat gradient buffer (gradients stay views of it); stage 2 drops them."""
        self._core.zero_grad()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside add gradients up locally; the next one outside reduces them::

            for i, batch in enumerate(micro_batches):
                with opt.no_sync() if i + 1 < len(micro_batches) else contextlib.nullcontext():
                    (model(batch).loss / len(micro_batches)).backward()
            opt.step()
        """
        previous = self._core.gradient_sync()
        self._core.set_gradient_sync(False)
        try:
            yield
        finally:
            self._core.set_gradient_sync(previous)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds now on the parameters' device: ``parameter_bytes``, ``gradient_bytes``,
        ``optimizer_bytes``; and ``host_bytes`` (``cpu_offload``: the optimizer state, gradient chunks and
        the values copied back, in host memory)."""
        return dict(self._core.memory())

    @property
    def shard_numel(self) -> int:
        """Elements of this rank's share of the flat buffer (the same on every rank)."""
        return int(self._core.shard_numel())

    def save_checkpoint(self, directory: str, step: int, files: Optional[dict[str, bytes]] = None) -> str:
        """Writes a sharded checkpoint (a collective: every rank, the same step): each rank its own
        part of the state, rank 0 also ``files`` (e.g. the model's ``torch.save`` bytes) and the
        manifest (sizes and CRC-32 of every file), into ``directory/step_<step>`` atomically: a
        rank that dies during the save leaves no new checkpoint. Returns the checkpoint's folder."""
        return self._core.save_sharded(directory, step, files or {})

    def load_checkpoint(self, directory: str, step: Optional[int] = None) -> tuple[int, dict[str, bytes]]:
        """Loads a checkpoint of ``save_checkpoint`` (the newest valid one when ``step`` is None)
        written on any number of ranks, at any stage or offload setting; every rank calls it.
        Returns its step and the other files saved with it. OSError when none verifies."""
        step, files = self._core.load_sharded(directory, step)
        return int(step), dict(files)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``torch.optim.AdamW``'s state dict, whole: every rank's chunks gathered (a collective: call
        it on every rank). Per parameter ``step``, ``exp_avg``, ``exp_avg_sq`` (CPU, fp32) and, for a
        bf16/fp16 model, ``master`` (the fp32 values). It loads into a ZeroAdamW of any world size,
        stage or bucket size, and into ``torch.optim.AdamW``."""
        state = {}
        for index, (step, exp_avg, exp_avg_sq, master) in enumerate(self._core.gather_state()):
            entry = {"step": torch.tensor(float(step)), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
            if master is not None:
                entry["master"] = master
            state[index] = entry
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Loads a state dict of ``state_dict()`` (any world size or stage) or of ``torch.optim.AdamW``
        (call it on every rank). Group hyperparameters (lr, betas, ...) come from it too."""
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("ZeroAdamW.load_state_dict: the state dict's param groups hold "
                             f"{[len(g['params']) for g in groups]} parameters, this optimizer's "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for mine, saved in zip(self.param_groups, groups):
            mine.update({k: v for k, v in saved.items() if k != "params"})
        entries = []
        ids = [i for g in groups for i in g["params"]]
        for param_id in ids:
            entry = state_dict["state"].get(param_id)
            if entry is None:
                raise ValueError(f"ZeroAdamW.load_state_dict: no state for parameter {param_id}")
            entries.append((float(entry["step"]), entry["exp_avg"].float(), entry["exp_avg_sq"].float(),
                            entry["master"].float() if "master" in entry else None))
        self._core.scatter_state(entries)
