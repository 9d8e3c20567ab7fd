"""SWA, EMA, periodic SWA and SWAG for ``lightning.pytorch.Trainer`` as one callback.

``AveragingCallback`` keeps a :class:`swalab.AveragedModel` of the ``LightningModule`` (and
optionally a :class:`swalab.SWAG` posterior collected at the same steps), validates the average
inside the live module, checkpoints it, recomputes its BatchNorm statistics after training and
leaves it in the module. Needs ``pip install 'swalab[integrations]'``.

What it does differently from Lightning's ``StochasticWeightAveraging`` callback (experimental):

- it averages after any optimizer step or any epoch, every ``update_every``-th from
  ``update_after`` (the gating of ``AveragedModel``), with any rule (SWA, EMA with warm-up),
  instead of once per epoch;
- by default SWA starts at 80% of training (``update_after=None``, as Lightning's
  ``swa_epoch_start=0.8``; EMA from the start), and a run that averaged nothing says so;
- an optional swalab schedule writes the LR into every optimizer; a module's own LR scheduler
  drives until averaging starts and is then handed over (no longer stepped), without replacing it
  by ``SWALR`` (that swap is why Lightning's callback supports one optimizer and one scheduler,
  and why resuming loaded SWALR's state into the user's scheduler, Lightning issue #11665);
- BatchNorm statistics are recomputed by ``swalab.update_bn`` after training, outside the training
  loop, for any batch format (``bn_forward_fn``). Lightning adds one more training epoch that runs
  forward passes with no backward, which under AMP fails with "No inf checks were recorded for
  this optimizer" (#17245), and its statistics were computed wrongly (#14866);
- the average is validated (swapped into the module's storage, no copy) with its BatchNorm
  statistics recomputed for its current weights, so ``ModelCheckpoint`` can monitor the average's
  metric and keep the best average; every checkpoint holds that same model as the ``state_dict``
  (``load_from_checkpoint`` gives the model that was validated) and the live weights and step
  counters beside it, so a resumed run ends with the same average (#6074).

Under ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` / tensor parallelism in ``configure_model``)
the average is built in ``on_fit_start``, after the module is sharded, and held like its shards
(:mod:`swalab.sharded`); the checkpoint's ``state_dict`` (a DCP folder) is the average with the
live weights nested under ``swalab_model_state_dict``. ``FSDPStrategy`` (FSDP1) is refused.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from swalab import sharded
from swalab.averaging import EMA, AveragedModel, AveragingRule, restart_from_average
from swalab.bn import update_bn
from swalab.integrations import require
from swalab.integrations._sharded import update_bn_inside
from swalab.schedules import Schedule, set_lr
from swalab.swag import SWAG

pl = require("lightning.pytorch", "Lightning")

__all__ = ["AveragingCallback"]

_MODEL_STATE = "swalab_model_state_dict"  # checkpoint key of the live weights, beside the average


class AveragingCallback(pl.Callback):
    """Weight averaging for a ``LightningModule``: SWA (Izmailov et al., 2018), EMA, periodic SWA
    (Guo et al., 2023) and SWAG (Maddox et al., 2019).

    After each optimizer step (``interval="step"``) or each training epoch (``"epoch"``), with
    ``index`` its 0-based number (steps of this fit and of the run it resumes; the Trainer's
    ``current_epoch``), the module is folded into the average when
    ``AveragedModel.update_parameters(module, step=index)`` says so: from ``update_after``, every
    ``update_every``-th. With several optimizers (manual optimisation) a step is one training batch
    after which any optimizer stepped.

    Args:
        rule: ``swalab.SWA()`` (default) or ``swalab.EMA(decay, warmup_gamma)``.
        interval: ``"step"`` or ``"epoch"``: what ``update_every``/``update_after`` count.
        update_every, update_after: the ``AveragedModel`` gating, in ``interval`` units;
            ``update_after`` a float in (0, 1) is that fraction of training (of the Trainer's
            ``estimated_stepping_batches`` or ``max_epochs``); ``None`` (default): 0.8 for SWA
            (the last 20% of training, as Lightning's ``swa_epoch_start=0.8``), 0 for EMA.
        device, dtype, use_buffers: where and how the average is kept, as in ``AveragedModel``.
        restart_every: periodic SWA: after every ``restart_every``-th averaged model, the module
            restarts from the average with fresh optimizer states (``restart_from_average``).
        restart_until: index from which restarts stop and a fresh average starts (the final SWA).
        swag_max_models: also collect a ``swalab.SWAG`` posterior (rank ``K``) at the averaged
            steps, available as ``callback.swag`` (e.g. for ``swalab.bma_predict``).
        swag_no_cov_mat: SWAG-Diag only.
        lr_schedule: a swalab schedule (e.g. ``swa_reference_lr``) written into every param group of
            every optimizer. If the module configures LR schedulers of its own, they drive until
            averaging starts (``update_after``) and the schedule from then on (hand-over).
        lr_interval: ``lr_schedule`` is called with the 0-based epoch (``"epoch"``, at each epoch's
            start) or the 0-based step (``"step"``, before each step).
        validate_average: validate the average instead of the live weights once it holds a model
            (same metric names, so checkpoints and early stopping follow the average).
        update_bn: recompute the average's BatchNorm statistics before it is validated or
            checkpointed (when it changed since) and after training.
        bn_loader: data for that pass (default: the trainer's training dataloader).
        bn_forward_fn: ``bn_forward_fn(module, batch)`` runs the module on a batch (default: the
            input is the batch, its first element, or its keyword arguments).
        bn_max_batches: limit of that pass.
        copy_to_model: after training, copy the average into the module (``trainer.test`` and
            ``trainer.save_checkpoint`` then use it).
        posthoc: a ``swalab.posthoc.Snapshots`` collecting the module at every ``interval`` (each
            step, or each epoch's end), for post-hoc SWA windows, LAWA and EMA synthesis.

    Example:
        >>> callback = AveragingCallback(swalab.EMA(0.999, warmup_gamma=10), update_after=100)
        >>> lightning.Trainer(max_epochs=10, callbacks=[callback]).fit(module, loader)
        >>> callback.averaged.module   # the average, BN recomputed (also copied into `module`)
    """

    def __init__(
        self,
        rule: AveragingRule | None = None,
        *,
        interval: Literal["step", "epoch"] = "step",
        update_every: int = 1,
        update_after: int | float | None = None,
        device: int | str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        use_buffers: bool = False,
        restart_every: int | None = None,
        restart_until: int | None = None,
        swag_max_models: int | None = None,
        swag_no_cov_mat: bool = False,
        lr_schedule: Schedule | None = None,
        lr_interval: Literal["step", "epoch"] = "epoch",
        validate_average: bool = True,
        update_bn: bool = True,
        bn_loader: Iterable[Any] | None = None,
        bn_forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        bn_max_batches: int | None = None,
        copy_to_model: bool = True,
        posthoc: Any = None,
    ) -> None:
        if rule is not None and not isinstance(rule, AveragingRule):
            raise ValueError(f"rule must be a swalab AveragingRule (SWA(), EMA(...)), got {rule!r}")
        for name, value in (("interval", interval), ("lr_interval", lr_interval)):
            if value not in ("step", "epoch"):
                raise ValueError(f"{name} must be 'step' or 'epoch', got {value!r}")
        if restart_every is not None and not (
            isinstance(restart_every, int) and restart_every >= 1
        ):
            raise ValueError(
                f"restart_every must be an integer >= 1 or None, got {restart_every!r}"
            )
        if restart_until is not None and restart_every is None:
            raise ValueError("restart_until is the end of periodic SWA: give restart_every too")
        if restart_until is not None and not (
            isinstance(restart_until, int) and restart_until >= 0
        ):
            raise ValueError(
                f"restart_until must be an integer >= 0 or None, got {restart_until!r}"
            )
        fraction = isinstance(update_after, float) and 0.0 < update_after < 1.0
        integer = isinstance(update_after, int) and not isinstance(update_after, bool)
        if not (update_after is None or fraction or (integer and update_after >= 0)):
            raise ValueError(
                "update_after must be an integer >= 0 (a step or epoch), a fraction of training "
                f"in (0, 1), or None (0.8 for SWA, 0 for EMA), got {update_after!r}"
            )
        if lr_schedule is not None and not callable(lr_schedule):
            raise ValueError(f"lr_schedule must be a function of the step, got {lr_schedule!r}")
        _check_bn_options(bn_loader, bn_max_batches)  # not after all of training
        self.rule = rule
        self.interval, self.lr_interval = interval, lr_interval
        self.update_every, self.update_after = update_every, update_after
        self.device, self.dtype, self.use_buffers = device, dtype, use_buffers
        self.restart_every, self.restart_until = restart_every, restart_until
        self.swag_max_models, self.swag_no_cov_mat = swag_max_models, swag_no_cov_mat
        self.lr_schedule = lr_schedule
        self.validate_average, self.update_bn = validate_average, update_bn
        self.bn_loader, self.bn_forward_fn, self.bn_max_batches = (
            bn_loader,
            bn_forward_fn,
            bn_max_batches,
        )
        self.copy_to_model = copy_to_model
        self.posthoc = posthoc
        self.averaged: AveragedModel | None = None
        self.swag: SWAG | None = None
        # Progress, checkpointed: steps taken, the last global_step seen, the last epoch folded in,
        # whether periodic SWA's restarts are over.
        self._steps, self._last_global_step, self._last_epoch = 0, 0, -1
        self._final_phase = False
        self._swap: Any = None  # the open ``swapped_into`` context during validation
        self._average_weights: dict[str, torch.Tensor] | None = None  # read from a checkpoint
        self._bn_count = -1  # the average's count when its BatchNorm statistics were recomputed
        self._start = 0  # update_after resolved in steps or epochs (on_fit_start)
        self._sharded_strategy = False  # ModelParallelStrategy: built late, checkpointed with DCP

    # -- building -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_bn_options(self.bn_loader, self.bn_max_batches, empty=self.update_bn)
        if sum(isinstance(cb, AveragingCallback) for cb in trainer.callbacks) > 1:
            raise ValueError(
                "use one swalab AveragingCallback per Trainer "
                "(each owns the checkpoint's state_dict)"
            )
        # Each fit starts a new average; trainer.fit(ckpt_path=...) then restores the saved one.
        self._steps, self._last_global_step, self._last_epoch = 0, 0, -1
        self._final_phase = False
        self.averaged, self.swag = None, None
        # Under ModelParallelStrategy, configure_model shards the module after this hook: the
        # average is built in on_fit_start, held like the module's shards.
        self._sharded_strategy = _check_strategy(trainer.strategy, self)
        if not self._sharded_strategy:
            self._build(pl_module)

    def _build(self, pl_module: pl.LightningModule) -> None:
        # The module refers to its Trainer; copy the module alone.
        attached, pl_module.trainer = pl_module._trainer, None
        try:
            self.averaged = AveragedModel(
                pl_module,
                self.device,
                use_buffers=self.use_buffers,
                rule=self.rule,
                dtype=self.dtype,
                update_every=self.update_every,
                update_after=0,  # resolved against the length of training in on_fit_start
                snapshots=self.posthoc,
            )
            if self.swag_max_models is not None:
                self.swag = SWAG(
                    pl_module, self.swag_max_models, self.swag_no_cov_mat, device=self.device
                )
        finally:
            pl_module.trainer = attached

    def _resolve_start(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        """(``update_after`` in ``interval`` units, the length of training in them or None)."""
        length: int | None
        if self.interval == "epoch":
            length = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        else:
            steps = trainer.estimated_stepping_batches
            length = int(steps) if math.isfinite(steps) else None
        after = self.update_after
        if after is None:
            after = 0 if isinstance(self.rule, EMA) else 0.8
        if isinstance(after, float):
            if length is None:
                raise ValueError(
                    f"update_after={after} is a fraction of training, but the Trainer sets no "
                    "length (max_epochs/max_steps): give update_after as an integer"
                )
            return int(after * length), length
        return after, length

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaged is None:  # ModelParallelStrategy: the module is sharded by now
            self._build(pl_module)
        self._start, length = self._resolve_start(trainer)
        self.averaged.update_after = self._start
        if length is not None and self._start >= length:
            warnings.warn(
                f"AveragingCallback: update_after={self._start} ({self.interval}s) is past the end "
                f"of training ({length} {self.interval}s): nothing will be averaged",
                stacklevel=2,
            )

    # -- learning rate --------------------------------------------------------------------------

    def _set_lr(self, trainer: pl.Trainer, index: int) -> None:
        if trainer.lr_scheduler_configs:  # the module's own schedulers drive until averaging
            started = self._steps if self.interval == "step" else trainer.current_epoch
            if started < self._start:
                return
            trainer.strategy.lr_scheduler_configs = []  # handed over: no longer stepped
        lr = self.lr_schedule(index)
        for optimizer in trainer.optimizers:
            set_lr(optimizer, lr)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_schedule is not None and self.lr_interval == "epoch":
            self._set_lr(trainer, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.lr_schedule is not None and self.lr_interval == "step":
            self._set_lr(trainer, self._steps)

    # -- averaging ------------------------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step > self._last_global_step:  # an optimizer stepped on this batch
            self._last_global_step = trainer.global_step
            self._steps += 1
            if self.interval == "step":
                self._fold(trainer, pl_module, self._steps - 1)
        # Fold the epoch's model in after its last batch, before the epoch-end validation runs.
        if self.interval == "epoch" and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._end_epoch(trainer, pl_module)

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > self._last_epoch:
            self._last_epoch = trainer.current_epoch
            self._fold(trainer, pl_module, trainer.current_epoch)

    def _fold(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        """Average ``pl_module`` at ``index`` if the gating says so; then periodic SWA and SWAG."""
        if self.restart_until is not None and index >= self.restart_until and not self._final_phase:
            self._final_phase = True
            self.averaged.reset()
        if not self.averaged.update_parameters(pl_module, step=index):
            return
        if self.swag is not None:
            self.swag.collect_model(pl_module)
        restart = self.restart_every is not None and not self._final_phase
        if restart and self.averaged.count % self.restart_every == 0:
            for optimizer in trainer.optimizers:
                restart_from_average(self.averaged, pl_module, optimizer)

    # -- validation of the average --------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            self.validate_average
            and self.averaged is not None
            and self.averaged.count > 0
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
        ):
            self._fresh_bn(trainer)
            self._swap = self.averaged.swapped_into(pl_module)
            self._swap.__enter__()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._swap_back()

    def _swap_back(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)

    # -- end of training ------------------------------------------------------------------------

    def _fresh_bn(self, trainer: pl.Trainer, force: bool = False) -> None:
        """Recompute the average's BatchNorm statistics if its weights changed since the last
        time (``force``: always), leaving the RNG as it was (the pass draws the loader's order),
        so the training run goes on as without it. Buffers the average averages itself
        (``use_buffers``) are left alone."""
        if not self.update_bn or self.use_buffers or self.averaged is None:
            return
        count = self.averaged.count
        if count == 0 or (count == self._bn_count and not force):
            return
        # (a sharded average's tree holds plain modules: the module tells its BatchNorm layers)
        model = trainer.lightning_module if self.averaged.sharded else self.averaged.module
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return
        loader = self.bn_loader if self.bn_loader is not None else trainer.train_dataloader
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda), trainer.precision_plugin.train_step_context():
            options = dict(
                forward_fn=self.bn_forward_fn,
                max_batches=self.bn_max_batches,
                unpack=self.bn_forward_fn is None,  # the default documented above
            )
            if self.averaged.sharded:
                device = trainer.strategy.root_device
                update_bn_inside(self.averaged, model, loader, device, **options)
            else:
                device = next(model.parameters()).device
                update_bn(loader, model, device, **options)
        self._bn_count = count

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.averaged is None:
            return
        if self.averaged.count == 0:
            warnings.warn(
                f"AveragingCallback averaged no model: averaging starts at {self.interval} "
                f"{self._start} (update_after), training ended before it; the module keeps its "
                "own weights",
                stacklevel=2,
            )
            return
        self._fresh_bn(trainer, force=True)
        if self.copy_to_model:
            if self.averaged.sharded:  # FSDP2 left unsharded by a forward holds other tensors
                sharded.reshard(pl_module)
            pl_module.load_state_dict(self.averaged.module.state_dict())

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "steps": self._steps,
            "last_global_step": self._last_global_step,
            "last_epoch": self._last_epoch,
            "final_phase": self._final_phase,
            "count": self.averaged.count if self.averaged is not None else 0,
        }
        if self.swag is not None:
            state["swag"] = self.swag.state_dict()
        return state

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The checkpoint's model is the average (what was validated); the live weights beside it.
        if self.averaged is not None and self.averaged.count > 0:
            self._fresh_bn(trainer)  # the model validated (and loaded) is this one
            if self._sharded_strategy:  # the strategy writes "state_dict" with DCP, shard by shard
                checkpoint["state_dict"] = _sharded_checkpoint_state(
                    self.averaged, checkpoint["state_dict"]
                )
                return
            checkpoint[_MODEL_STATE] = checkpoint["state_dict"]
            checkpoint["state_dict"] = self.averaged.module.state_dict()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called before load_state_dict; the module was given checkpoint["state_dict"], the average.
        # Resuming fit restores the live weights; validate/test/predict keep the average.
        if self.averaged is not None and self._sharded_strategy:
            self._average_weights = _load_sharded_checkpoint(
                trainer.ckpt_path, pl_module, self.averaged
            )
            return
        if self.averaged is not None and _MODEL_STATE in checkpoint:
            self._average_weights = checkpoint["state_dict"]
            pl_module.load_state_dict(checkpoint[_MODEL_STATE])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.averaged is None:  # not fitting: nothing to resume
            return
        self._steps, self._last_global_step = state_dict["steps"], state_dict["last_global_step"]
        self._last_epoch, self._final_phase = state_dict["last_epoch"], state_dict["final_phase"]
        if state_dict["count"] > 0:
            if self._average_weights is None:
                raise ValueError("checkpoint has an average count but no averaged weights")
            weights = {f"module.{k}": v for k, v in self._average_weights.items()}
            weights["n_averaged"] = torch.tensor(state_dict["count"])
            self.averaged.load_state_dict(weights)
            self._average_weights = None
        if self.swag is not None and "swag" in state_dict:
            self.swag.load_state_dict(state_dict["swag"])


def _check_bn_options(loader: Any, max_batches: Any, empty: bool = False) -> None:
    """``bn_loader`` and ``bn_max_batches`` of :class:`AveragingCallback`, checked before training
    (an error after all of it would leave the average uncopied). ``empty``: a loader with a length
    must yield batches."""
    integral = isinstance(max_batches, numbers.Integral) and not isinstance(max_batches, bool)
    if max_batches is not None and not (integral and max_batches >= 1):
        raise ValueError(f"bn_max_batches must be an integer >= 1 or None, got {max_batches!r}")
    if loader is None:
        return
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes)):
        raise ValueError(f"bn_loader must be an iterable of batches, got {type(loader).__name__}")
    if empty and isinstance(loader, Sized) and len(loader) == 0:
        raise ValueError(
            "bn_loader yields no batches: the BatchNorm statistics cannot be recomputed"
        )


def _check_strategy(strategy: Any, callback: AveragingCallback) -> bool:
    """Whether ``strategy`` shards the module after ``setup`` (``ModelParallelStrategy``: FSDP2
    and tensor parallelism applied in ``configure_model``). ``FSDPStrategy`` (FSDP1, flat
    parameters) and the options a sharded average does not have are refused before training."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            f"AveragingCallback does not support {type(strategy).__name__} (FSDP1 flattens the "
            "parameters): use lightning.pytorch.strategies.ModelParallelStrategy and shard the "
            "module with torch.distributed.fsdp.fully_shard in configure_model"
        )
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    if not strategy._save_distributed_checkpoint:
        raise ValueError(
            "AveragingCallback under ModelParallelStrategy checkpoints the average shard by shard: "
            "keep save_distributed_checkpoint=True (the default)"
        )
    for name in ("swag_max_models", "posthoc", "device"):
        value = getattr(callback, name)
        if value is not None:
            raise ValueError(
                f"AveragingCallback({name}={value!r}) is not available under "
                f"{type(strategy).__name__}: the average of a sharded module is held with its "
                f"shards (leave {name} unset)"
            )
    return True


def _sharded_checkpoint_state(averaged: AveragedModel, live: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``state_dict`` under ``ModelParallelStrategy``: the average (the model
    validated; the strategy loads it into the module for validate/test), with the live weights
    nested under ``swalab_model_state_dict``; DCP writes both shard by shard, no gather."""
    return {**averaged.module.state_dict(), _MODEL_STATE: live}


def _load_sharded_checkpoint(
    path: str | os.PathLike | None, pl_module: pl.LightningModule, averaged: AveragedModel
) -> dict[str, torch.Tensor] | None:
    """Read back what :func:`_sharded_checkpoint_state` wrote (resharded by DCP): put the live
    weights into ``pl_module`` and return the average's (None when the checkpoint holds none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if path is None or not Path(path).is_dir():
        return None
    keys = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    if not any(k.startswith(f"state_dict.{_MODEL_STATE}.") for k in keys):
        return None
    live = {k: torch.empty_like(v) for k, v in get_model_state_dict(pl_module).items()}
    average = {k: torch.empty_like(v) for k, v in averaged.module.state_dict().items()}
    dcp.load({"state_dict": {**average, _MODEL_STATE: live}}, checkpoint_id=os.fspath(path))
    set_model_state_dict(pl_module, live)
    return average
