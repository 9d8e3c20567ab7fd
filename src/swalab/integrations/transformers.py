"""SWA and EMA of a Hugging Face model as a ``transformers.TrainerCallback``.

``AveragingCallback`` keeps a :class:`swalab.AveragedModel` of the ``Trainer``'s model, updated
after optimizer steps (the ``AveragedModel`` gating: from ``update_after``, every
``update_every``-th), and

- saves it beside every checkpoint as ``checkpoint-N/swalab_average/`` and after training as
  ``<output_dir>/swalab_average/``, in ``save_pretrained`` format (``from_pretrained`` loads it),
  with ``swalab_state.json`` holding how many models it averages;
- evaluates it whenever the Trainer evaluates: ``eval_average_loss`` and, computed the same way
  for the live weights, ``eval_current_loss`` (the mean of ``model(**batch).loss`` over the
  samples; the Trainer's own ``eval_loss`` may be normalised otherwise, e.g. per label token) are
  added to the metrics (so ``metric_for_best_model="average_loss"`` keeps the checkpoint whose
  average is best) and to ``state.log_history``;
- resumes it from the checkpoint that ``trainer.train(resume_from_checkpoint=...)`` continues
  (``TrainingArguments.resume_from_checkpoint``, else ``<output_dir>/checkpoint-<global_step>``).

Needs ``pip install 'swalab[integrations]'``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swalab.averaging import AveragedModel, AveragingRule
from swalab.bn import move_to, update_bn
from swalab.integrations import require

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
        evaluate_average: add the average's and the live weights' losses to every evaluation.
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

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any
    ) -> None:
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

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, float] | None = None,
        model: nn.Module = None,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if not self.evaluate_average or self.averaged is None or self.averaged.count == 0:
            return
        if metrics is None or eval_dataloader is None:
            return
        prefix = next((k[: -len("_loss")] for k in metrics if k.endswith("_loss")), "eval")
        current = _mean_loss(model, eval_dataloader)
        if current is None:  # batches without labels: the model computes no loss
            return
        with self.averaged.swapped_into(model):
            average = _mean_loss(model, eval_dataloader)
        logs = {f"{prefix}_average_loss": average, f"{prefix}_current_loss": current}
        metrics.update(logs)
        state.log_history.append(dict(logs, step=state.global_step))

    # -- saving and resuming --------------------------------------------------------------------

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._save(Path(args.output_dir) / f"checkpoint-{state.global_step}" / AVERAGE_DIR)

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
        if self.update_bn and train_dataloader is not None:
            device = next(self.averaged.module.parameters()).device
            update_bn(train_dataloader, self.averaged.module, device, unpack=True)
        if state.is_world_process_zero:
            self._save(Path(args.output_dir) / AVERAGE_DIR)
        if self.copy_to_model:
            model.load_state_dict(self.averaged.module.state_dict())

    def _save(self, directory: Path) -> None:
        """``save_pretrained`` into a temporary sibling directory, then rename it into place."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
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
        count = json.loads((directory / _STATE_FILE).read_text())["count"]
        if count == 0:
            return
        saved = type(model).from_pretrained(directory)
        weights = {f"module.{k}": v for k, v in saved.state_dict().items()}
        weights["n_averaged"] = torch.tensor(count)
        self.averaged.load_state_dict(weights)


def _mean_loss(model: nn.Module, loader: Any) -> float | None:
    """Mean of ``model(**batch).loss`` over the samples of ``loader``, in eval mode."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = move_to(batch, device)
            loss = model(**batch).loss
            if loss is None:
                return None
            size = len(next(iter(batch.values())))
            total += float(loss) * size
            count += size
    finally:
        model.train(was_training)
    return total / count
