"""``FreezeSchedule``: freeze parts of the model, then unfreeze them on a schedule written as data.

YAML (under ``trainer.callbacks``)::

    - class_path: project.callbacks.FreezeSchedule
      init_args:
        frozen: ["net.backbone"]          # frozen from the start (module names or regexes)
        phases:                           # each unfreezes modules at an epoch, in a new param group
          - {epoch: 2, modules: ["net.backbone.fc"], lr_factor: 0.3}
          - {epoch: 4, modules: ["net.backbone"], lr: 1.0e-4}
        train_bn: false                   # BatchNorm in frozen modules: frozen and in eval mode

Presets: no ``phases`` is a linear probe (``frozen`` stays frozen for the whole run);
``unfreeze_at_epoch: K`` (with ``unfreeze_lr_factor``, default 0.1) unfreezes everything in
``frozen`` at epoch K at a lower LR than the head's.

Built on Lightning's ``BaseFinetuning``, with its resume gap closed: resuming (``--ckpt_path``)
in the middle of a schedule restores which parameters are trainable, the optimizer's parameter
groups (then their LRs and state from the checkpoint) and the LR schedule's view of them.
"""

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from project.errors import UserError
from project.tasks.optim import LR_KEYS



@dataclass
class Phase:
    """One step of a :class:`FreezeSchedule`.

    Args:
        epoch: Epoch (0-based) at whose start the modules unfreeze.
        modules: Module names or regexes (matched in full against ``named_modules()`` of the
            LightningModule, e.g. ``net.backbone``, ``net\\.backbone\\.layer[34]``); everything under a
            matched module unfreezes.
        lr: Absolute LR of the new parameter group (on the optimizer's ``lr`` scale; an LR schedule
            then scales it like the other groups). Give ``lr`` or ``lr_factor``, not both.
        lr_factor: LR of the new group as a factor of the optimizer's LR. Default 1.0 when no ``lr``.
    """

    epoch: int
    modules: list[str] = field(default_factory=list)
    lr: float | None = None
    lr_factor: float | None = None


class FreezeSchedule(BaseFinetuning):
    """Freeze modules at the start of training and unfreeze them on a schedule (see the module docstring).

    Args:
        frozen: Module names or regexes frozen from the start (matched in full against
            ``named_modules()``; everything under a matched module is frozen). Default: the backbone.
        phases: The unfreezing schedule, a list of ``{epoch, modules, lr | lr_factor}``. Every module a
            phase names must be inside ``frozen``. None (and no ``unfreeze_at_epoch``): linear probe.
        unfreeze_at_epoch: Shorthand for one phase unfreezing all of ``frozen`` at this epoch.
        unfreeze_lr_factor: LR factor of that phase's parameter group (a lower LR for the pretrained part).
        train_bn: False: BatchNorm layers inside frozen modules are frozen too and kept in eval mode
            (running statistics untouched) until their module unfreezes. True: they keep training
            (affine parameters and statistics) while the rest of the module is frozen.
    """

    def __init__(
        self,
        frozen: list[str] | None = None,
        phases: list[Phase] | None = None,
        unfreeze_at_epoch: int | None = None,
        unfreeze_lr_factor: float = 0.1,
        train_bn: bool = False,
    ) -> None:
        super().__init__()
        self.frozen = list(frozen) if frozen is not None else ["net.backbone"]
        if not self.frozen:
            raise UserError("FreezeSchedule: frozen is empty; name the modules to freeze, e.g. [net.backbone]")
        if phases and unfreeze_at_epoch is not None:
            raise UserError("FreezeSchedule: give phases or unfreeze_at_epoch, not both")
        if unfreeze_at_epoch is not None:
            phases = [Phase(epoch=unfreeze_at_epoch, modules=list(self.frozen), lr_factor=unfreeze_lr_factor)]
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases or []]
        for i, phase in enumerate(self.phases):
            if phase.epoch < 0 or not phase.modules:
                raise UserError(f"FreezeSchedule phase {i}: needs epoch >= 0 and a non-empty modules list, got {asdict(phase)}")
            if phase.lr is not None and phase.lr_factor is not None:
                raise UserError(f"FreezeSchedule phase {i}: give lr or lr_factor, not both")
            if (phase.lr is not None and phase.lr <= 0) or (phase.lr_factor is not None and phase.lr_factor <= 0):
                raise UserError(f"FreezeSchedule phase {i}: the LR must be > 0, got {asdict(phase)}")
        self.train_bn = train_bn
        self.applied: list[int] = []  # indices of the phases already applied, in order
        self._frozen_bn: list[nn.Module] = []
        self._trainer: pl.Trainer | None = None

    # ---- presets for Python users --------------------------------------------------------------

    @classmethod
    def linear_probe(cls, frozen: list[str] | None = None) -> "FreezeSchedule":
        """Train the head only: ``frozen`` (default the backbone) stays frozen for the whole run."""
        return cls(frozen=frozen)

    @classmethod
    def unfreeze_later(cls, epoch: int, lr_factor: float = 0.1, frozen: list[str] | None = None) -> "FreezeSchedule":
        """Frozen backbone for ``epoch`` epochs, then all of it trains at ``lr_factor`` x the LR."""
        return cls(frozen=frozen, unfreeze_at_epoch=epoch, unfreeze_lr_factor=lr_factor)

    # ---- module selection ----------------------------------------------------------------------

    @staticmethod
    def _match(pl_module: nn.Module, patterns: list[str], what: str) -> list[str]:
        """Names of the modules that the patterns match in full (outermost only)."""
        names = [n for n, _ in pl_module.named_modules() if n]
        matched: list[str] = []
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise UserError(f"FreezeSchedule {what}: {pattern!r} is not a valid regex ({err})") from None
            hits = [n for n in names if regex.fullmatch(n)]
            if not hits:
                top = sorted({n.rsplit(".", 1)[0] if n.count(".") > 1 else n for n in names if n.count(".") <= 2})
                raise UserError(f"FreezeSchedule {what}: {pattern!r} matches no module; module names look like {', '.join(top[:8])}")
            matched += hits
        return [n for n in matched if not any(n.startswith(m + ".") for m in matched)]

    def _modules(self, pl_module: nn.Module, patterns: list[str], what: str) -> list[nn.Module]:
        return [pl_module.get_submodule(n) for n in dict.fromkeys(self._match(pl_module, patterns, what))]

    @staticmethod
    def _under(name: str, roots: list[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    def frozen_module_names(self, pl_module: nn.Module) -> list[str]:
        """Names of the modules frozen now: under ``frozen`` and under no applied phase."""
        frozen = self._match(pl_module, self.frozen, "frozen")
        thawed = [n for i in self.applied for n in self._match(pl_module, self.phases[i].modules, f"phase {i}")]
        return [n for n, _ in pl_module.named_modules() if self._under(n, frozen) and not self._under(n, thawed)]

    def _hold_frozen_bn(self, pl_module: nn.Module | None = None) -> None:
        """Put BatchNorm layers of frozen modules in eval mode (recomputing which they are if given the module).

        Lightning puts the whole model in train mode at each epoch start (and after validation).
        """
        if self.train_bn:
            return
        if pl_module is not None:
            names = self.frozen_module_names(pl_module)
            self._frozen_bn = [m for m in map(pl_module.get_submodule, names) if isinstance(m, _BatchNorm)]
        for module in self._frozen_bn:
            module.eval()

    # ---- BaseFinetuning hooks ------------------------------------------------------------------

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        frozen = self._match(pl_module, self.frozen, "frozen")
        for i, phase in enumerate(self.phases):
            outside = [n for n in self._match(pl_module, phase.modules, f"phase {i}") if not self._under(n, frozen)]
            if outside:
                raise UserError(f"FreezeSchedule phase {i}: {', '.join(outside[:3])} is not inside frozen {self.frozen}; it is trainable already")
        self.freeze(self._modules(pl_module, self.frozen, "frozen"), train_bn=self.train_bn)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        for i, phase in enumerate(self.phases):
            if i in self.applied or epoch < phase.epoch:
                continue
            modules = self._modules(pl_module, phase.modules, f"phase {i}")
            added = self._unfreeze_into(modules, optimizer, phase)
            self.applied.append(i)
            rank_zero_info(f"FreezeSchedule: epoch {epoch}: unfroze {phase.modules} ({added} tensors) at lr {optimizer.param_groups[-1]['lr']:.3g}")
            self._extend_schedulers(self._trainer, optimizer)
            if added:
                self._rewrap_ddp(self._trainer)

    def _unfreeze_into(self, modules: list[nn.Module], optimizer: Optimizer, phase: Phase) -> int:
        """Unfreeze ``modules`` and give their new trainable parameters a group of their own."""
        self.make_trainable(modules)
        for module in modules:  # BatchNorm held in eval mode while frozen trains again
            for bn in module.modules():
                if isinstance(bn, _BatchNorm):
                    bn.train()
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        # identity, not BaseFinetuning.filter_on_optimizer's torch.equal: equal-valued tensors are distinct parameters
        params = [p for p in self.filter_params(modules, train_bn=True) if id(p) not in present]
        if not params:
            return 0
        base = optimizer.defaults["lr"]
        first = optimizer.param_groups[0]
        ratio = (phase.lr / base if phase.lr is not None else phase.lr_factor or 1.0) / first.get("lr_factor", 1.0)
        group = {k: v for k, v in first.items() if k not in ("params", "name", "lr_factor")}
        for key in LR_KEYS:
            if key in group:
                group[key] = group[key] * ratio
        optimizer.add_param_group({**group, "params": params, "name": f"phase{self.phases.index(phase)}"})
        return len(params)

    @staticmethod
    def _extend_schedulers(trainer: "pl.Trainer | None", optimizer: Optimizer) -> None:
        """Give the LR schedules of ``optimizer`` an entry for each group added after they were built."""
        if trainer is None:
            return
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        while schedulers:
            scheduler = schedulers.pop()
            schedulers += getattr(scheduler, "_schedulers", [])  # SequentialLR / ChainedScheduler
            if getattr(scheduler, "optimizer", None) is not optimizer:
                continue
            for group in optimizer.param_groups[len(getattr(scheduler, "base_lrs", optimizer.param_groups)):]:
                scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
            for attr in ("lr_lambdas", "min_lrs"):  # LambdaLR / MultiplicativeLR; ReduceLROnPlateau
                values = getattr(scheduler, attr, None)
                while isinstance(values, list) and values and len(values) < len(optimizer.param_groups):
                    values.append(values[0])
            last = getattr(scheduler, "_last_lr", None)
            if isinstance(last, list):
                last[len(last):] = [g["lr"] for g in optimizer.param_groups[len(last):]]

    @staticmethod
    def _rewrap_ddp(trainer: "pl.Trainer | None") -> None:
        """Wrap the model in DDP again: DDP all-reduces only the parameters that were trainable when it wrapped them.

        Without this, parameters unfrozen mid-fit train on each process's own gradients and the replicas drift apart.
        """
        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.model.module
            strategy.configure_ddp()

    # ---- training hooks ------------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        restarting = self._restarting
        if restarting and len(trainer.optimizers) != 1:
            raise UserError("FreezeSchedule supports one optimizer")
        super().on_fit_start(trainer, pl_module)  # rebuilds the param groups saved in the checkpoint
        if restarting:
            # Lightning restores the groups but not requires_grad: unfreeze what the applied phases unfroze.
            for i in self.applied:
                self.make_trainable(self._modules(pl_module, self.phases[i].modules, f"phase {i}"))
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.requires_grad_(True)
                self._extend_schedulers(trainer, optimizer)
            self._rewrap_ddp(trainer)

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise UserError(f"FreezeSchedule supports one optimizer, the model has {len(trainer.optimizers)}")
        super().on_train_epoch_start(trainer, pl_module)
        self._hold_frozen_bn(pl_module)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._hold_frozen_bn()

    # ---- checkpoint state ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "applied": list(self.applied)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.applied = list(state_dict.pop("applied", []))
        super().load_state_dict(state_dict)
