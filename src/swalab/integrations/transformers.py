"""SWA and EMA of a Hugging Face model as a ``transformers.TrainerCallback``.

``AveragingCallback`` keeps a :class:`swalab.AveragedModel` of the ``Trainer``'s model, updated
after optimizer steps (the ``AveragedModel`` gating: from ``update_after``, every
``update_every``-th), and

- saves it beside every checkpoint as ``checkpoint-N/swalab_average/`` and after training as
  ``<output_dir>/swalab_average/``, in ``save_pretrained`` format (``from_pretrained`` loads it),
  with ``swalab_state.json`` holding how many models it averages;
- evaluates it whenever the Trainer evaluates, by the Trainer itself: ``trainer.evaluate`` runs
  its evaluation loop once more with the average swapped into the model and the metric prefix
  ``eval_average``, so ``eval_average_loss`` and every ``compute_metrics`` value
  (``eval_average_accuracy`` ...) are computed exactly as the live weights' ``eval_loss``,
  ``eval_accuracy`` (the same loss, the same normalisation), logged through ``Trainer.log``
  (``log_history``, the console, every ``report_to`` tracker) and returned with them;
- with ``metric_for_best_model`` naming an average's metric (``"average_loss"``), the best
  checkpoint is the one whose average is best: ``load_best_model_at_end`` loads that average
  into the model and ``<output_dir>/swalab_average/`` is that best average (else the final one);
- resumes it from the checkpoint that ``trainer.train(resume_from_checkpoint=...)`` continues
  (``TrainingArguments.resume_from_checkpoint``, else ``<output_dir>/checkpoint-<global_step>``).

A model sharded with FSDP2 (accelerate's ``fsdp_config={"version": 2}``) gets a sharded average
(:mod:`swalab.sharded`): checkpoints hold it as a DCP folder (any world size resumes it), the final
``swalab_average/`` is gathered once into ``save_pretrained`` format; DeepSpeed ZeRO-3 and FSDP1 are
refused.

Needs ``pip install 'swalab[integrations]'``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swalab import sharded
from swalab.averaging import AveragedModel, AveragingRule
from swalab.bn import update_bn
from swalab.integrations import require
from swalab.integrations._sharded import (
    gathered_on_rank0,
    is_zero3,
    save_dcp_whole,
    update_bn_inside,
)
from swalab.sharded import load_checkpoint

transformers = require("transformers", "Hugging Face transformers")

__all__ = ["AVERAGE_DIR", "AveragingCallback"]

AVERAGE_DIR = "swalab_average"
_STATE_FILE = "swalab_state.json"


class AveragingCallback(transformers.TrainerCallback):
    """EMA or SWA of the model trained by a Hugging Face ``Trainer`` (Izmailov et al., 2018).

    Args:
        rule: ``swalab.SWA()`` (default) or ``swalab.EMA(decay, warmup_gamma)``.
        update_every, update_after: the ``AveragedModel`` gating, in optimizer steps (0-based: the
            step after which ``state.global_step`` is ``index + 1``).
        device, dtype: where and in which floating dtype the average is kept (``AveragedModel``).
        evaluate_average: evaluate the average too whenever the Trainer evaluates (metrics
            ``eval_average_*``); this costs one more evaluation loop.
        update_bn: recompute BatchNorm statistics of the average after training (models with
            BatchNorm only; batches are passed as ``model(**batch)``).
        copy_to_model: after training, copy the average into the Trainer's model (off by default:
            ``load_best_model_at_end`` may have loaded another model by then).
        posthoc: a ``swalab.posthoc.Snapshots`` collecting the model after every optimizer step
            (``step = global_step - 1``), for post-hoc SWA windows, LAWA and EMA synthesis.

    Example:
        >>> callback = AveragingCallback(swalab.EMA(0.999, warmup_gamma=10), update_after=100)
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()
        >>> AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/swalab_average")
    """

    def __init__(
        self,
        rule: AveragingRule | None = None,
        *,
        update_every: int = 1,
        update_after: int = 0,
        device: int | str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        evaluate_average: bool = True,
        update_bn: bool = True,
        copy_to_model: bool = False,
        posthoc: Any = None,
    ) -> None:
        if rule is not None and not isinstance(rule, AveragingRule):
            raise ValueError(f"rule must be a swalab AveragingRule (SWA(), EMA(...)), got {rule!r}")
        self.rule = rule
        self.update_every, self.update_after = update_every, update_after
        self.device, self.dtype = device, dtype
        self.evaluate_average, self.update_bn = evaluate_average, update_bn
        self.copy_to_model = copy_to_model
        self.posthoc = posthoc
        self.averaged: AveragedModel | None = None
        self._evaluating = False  # the average's evaluation loop is running

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attach(_calling_trainer())

    def _attach(self, trainer: Any) -> None:
        """Wrap ``trainer.evaluate`` so that each evaluation also evaluates the average, through
        the Trainer's own loop and ``Trainer.log`` (a callback's ``on_evaluate`` comes after the
        Trainer has logged; callbacks are not handed the Trainer, so it is the one calling)."""
        if trainer is None:
            if self.evaluate_average:
                warnings.warn(
                    "swalab AveragingCallback: not called by a transformers.Trainer, the average "
                    "is not evaluated",
                    stacklevel=3,
                )
            return
        if getattr(trainer.evaluate, "swalab_callback", None) is self:
            return
        original = trainer.evaluate

        def evaluate(
            eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
        ) -> dict[str, float]:
            datasets = trainer.eval_dataset if eval_dataset is None else eval_dataset
            if (
                self._evaluating
                or not self.evaluate_average
                or self.averaged is None
                or self.averaged.count == 0
                or isinstance(datasets, dict)  # each dataset's own call evaluates the average
            ):
                return original(
                    eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
                )
            self._evaluating = True
            try:
                with _logged_once(trainer) as metrics:
                    metrics.update(
                        original(
                            eval_dataset,
                            ignore_keys=ignore_keys,
                            metric_key_prefix=metric_key_prefix,
                        )
                    )
                    with self.averaged.swapped_into(trainer.model):
                        metrics.update(
                            original(
                                eval_dataset,
                                ignore_keys=ignore_keys,
                                metric_key_prefix=f"{metric_key_prefix}_average",
                            )
                        )
            finally:
                self._evaluating = False
            return metrics

        evaluate.swalab_callback = self  # type: ignore[attr-defined]
        trainer.evaluate = evaluate

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any
    ) -> None:
        self._attach(_calling_trainer())  # (a callback added after the Trainer was built)
        _check_sharding(model)
        self.averaged = AveragedModel(
            model,
            self.device,
            rule=self.rule,
            dtype=self.dtype,
            update_every=self.update_every,
            update_after=self.update_after,
            snapshots=self.posthoc,
        )
        if state.global_step > 0:  # resuming
            self._load(self._resume_directory(args, state), model, state.global_step)

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any
    ) -> None:
        self.averaged.update_parameters(model, step=state.global_step - 1)

    # -- saving and resuming --------------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}" / AVERAGE_DIR
        if self.averaged is not None and self.averaged.sharded:  # every rank writes its shards
            _save_sharded(self.averaged, directory)
        elif state.is_world_process_zero:
            self._save(directory)

    def on_train_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.averaged is None or self.averaged.count == 0:
            return
        if self.averaged.sharded:
            self._end_sharded(args, state, model, train_dataloader)
            return
        best = _best_average(args, state)
        if best is not None:  # the best checkpoint's average is the result, not the final one
            if state.is_world_process_zero:
                self._save(Path(args.output_dir) / AVERAGE_DIR, source=best)
            if args.load_best_model_at_end or self.copy_to_model:
                saved = type(model).from_pretrained(best)
                model.load_state_dict(saved.state_dict())
            return
        if self.update_bn and train_dataloader is not None:
            device = next(self.averaged.module.parameters()).device
            update_bn(train_dataloader, self.averaged.module, device, unpack=True)
        if state.is_world_process_zero:
            self._save(Path(args.output_dir) / AVERAGE_DIR)
        if self.copy_to_model:
            model.load_state_dict(self.averaged.module.state_dict())

    def _save(self, directory: Path, source: Path | None = None) -> None:
        """``save_pretrained`` (or a copy of the saved average ``source``) into a temporary sibling
        directory, then rename it into place."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            if source is not None:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
            else:
                self.averaged.module.save_pretrained(tmp)
                (tmp / _STATE_FILE).write_text(json.dumps({"count": self.averaged.count}))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _resume_directory(args: Any, state: Any) -> Path:
        given = args.resume_from_checkpoint
        if isinstance(given, str) and os.path.isdir(given):
            return Path(given) / AVERAGE_DIR
        return Path(args.output_dir) / f"checkpoint-{state.global_step}" / AVERAGE_DIR

    def _load(self, directory: Path, model: nn.Module, step: int) -> None:
        if not (directory / _STATE_FILE).is_file():
            raise ValueError(
                f"resuming at step {step} but {directory} holds no swalab average: resume from a "
                "checkpoint saved with this callback, named in "
                "TrainingArguments.resume_from_checkpoint"
            )
        saved_state = json.loads((directory / _STATE_FILE).read_text())
        count = saved_state["count"]
        if count == 0:
            return
        if saved_state.get("format") == "dcp":  # saved by a sharded run: any world size reads it
            load_checkpoint(self.averaged, directory)
            return
        if self.averaged.sharded:
            raise ValueError(
                f"{directory} holds an average saved by an unsharded run (save_pretrained format): "
                "a sharded run resumes from the DCP average a sharded run saves"
            )
        saved = type(model).from_pretrained(directory)
        weights = {f"module.{k}": v for k, v in saved.state_dict().items()}
        weights["n_averaged"] = torch.tensor(count)
        self.averaged.load_state_dict(weights)

    def _end_sharded(self, args: Any, state: Any, model: nn.Module, loader: Any) -> None:
        """``on_train_end`` of a sharded average: the best checkpoint's average (when the best
        metric is one of the average's) or the final one with BatchNorm recomputed inside the
        model, gathered once into ``<output_dir>/swalab_average`` in ``save_pretrained`` format."""
        best = _best_average(args, state)
        if best is not None:
            load_checkpoint(self.averaged, best)
        elif self.update_bn and loader is not None and _has_batchnorm(model):
            update_bn_inside(self.averaged, model, loader, args.device, unpack=True)
        _export_sharded(self.averaged, model, Path(args.output_dir) / AVERAGE_DIR)
        if self.copy_to_model or (best is not None and args.load_best_model_at_end):
            sharded.reshard(model)
            model.load_state_dict(self.averaged.module.state_dict())


def _check_sharding(model: nn.Module) -> None:
    """Refuse, before anything is copied, the sharded set-ups whose average would be wrong:
    DeepSpeed ZeRO-3 (each rank holds empty placeholders, the average would hold nothing) and
    FSDP1 (``sharded.is_sharded`` raises). FSDP2 (``fully_shard``) gives a sharded average."""
    if is_zero3(model):
        raise ValueError(
            "swalab AveragingCallback does not support DeepSpeed ZeRO-3 (its parameters are "
            "partitioned into flat buffers): use FSDP2 (fsdp_config={'version': 2}) or ZeRO-1/2"
        )
    sharded.is_sharded(model)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _save_sharded(averaged: AveragedModel, directory: Path) -> None:
    """The average of a sharded model beside a checkpoint: a DCP folder (every rank its shards,
    float32, readable by any number of processes) with ``swalab_state.json``."""
    state = {"count": averaged.count, "format": "dcp"}
    save_dcp_whole(
        averaged, directory, lambda folder: (folder / _STATE_FILE).write_text(json.dumps(state))
    )


def _export_sharded(averaged: AveragedModel, model: nn.Module, directory: Path) -> None:
    """Gather the average once (one tensor at a time, kept on rank 0) and write it on rank 0 with
    the model's ``save_pretrained`` and ``state_dict=``: ``from_pretrained`` loads it unsharded."""
    whole = gathered_on_rank0(averaged)
    if whole is not None:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            model.save_pretrained(tmp, state_dict=whole)
            (tmp / _STATE_FILE).write_text(json.dumps({"count": averaged.count}))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _logged_once(trainer: Any) -> Iterator[dict[str, float]]:
    """One evaluation of the live weights and of the average, seen by the rest of the Trainer as
    one: inside, ``Trainer.log`` and the callbacks' ``on_evaluate`` are held back; on leaving
    (without an error) the metrics gathered in the yielded dict, live and average together, are
    logged once and every callback's ``on_evaluate`` runs once with all of them (so
    ``EarlyStoppingCallback`` finds its metric and counts each evaluation once)."""
    handler = trainer.callback_handler
    own = {k: vars(o)[k] for o, k in ((trainer, "log"), (handler, "on_evaluate")) if k in vars(o)}
    trainer.log = lambda logs, *args, **kwargs: None
    handler.on_evaluate = lambda args, state, control, metrics, **kwargs: control
    metrics: dict[str, float] = {}
    try:
        yield metrics
    finally:
        for owner, key in ((trainer, "log"), (handler, "on_evaluate")):
            if key in own:
                setattr(owner, key, own[key])
            else:
                delattr(owner, key)
    trainer.log(dict(metrics))
    trainer.control = handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics)


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is calling this callback, or None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, transformers.Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def _best_average(args: Any, state: Any) -> Path | None:
    """The saved average of the best checkpoint when ``metric_for_best_model`` names one of the
    average's metrics (``average_loss``, ``eval_average_accuracy`` ...), else None."""
    metric = args.metric_for_best_model or ""
    if "_average_" not in f"_{metric}" or not state.best_model_checkpoint:
        return None
    directory = Path(state.best_model_checkpoint) / AVERAGE_DIR
    return directory if (directory / _STATE_FILE).is_file() else None
