"""The cost of ``Trainer.evaluate()`` with swalab's Hugging Face ``AveragingCallback``.

    python benchmarks/hf_eval.py [--repeats N] [--samples N] [--threads N]

Contenders, each ``trainer.evaluate()`` of the same GPT-2 sized-down model on the same data, with
``compute_metrics`` (next-token accuracy):

- ``plain``: a Trainer without the callback (one evaluation loop: the live weights);
- ``callback``: with the callback holding an average (it evaluates the live weights and the
  average: two loops, both through the Trainer);
- ``two plain``: two plain evaluations, the least that evaluating two models costs.

The callback's overhead is ``callback / two plain`` (target <= 1.3); ``callback / plain`` is what
a user sees against not evaluating the average at all. Medians of N rounds, interleaved (each
round times every contender once, in a new order, so a busy machine slows all alike).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch
import transformers

import swalab
from swalab.integrations.transformers import AveragingCallback


def _model() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config)


def _accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}


def _trainer(out: str, data: list, callbacks: list) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        out,
        max_steps=4,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    return transformers.Trainer(
        model=_model(),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        callbacks=callbacks,
        compute_metrics=_accuracy,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    transformers.logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (opts.samples, 64), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    with tempfile.TemporaryDirectory() as out:
        plain = _trainer(out, data, [])
        callback = AveragingCallback(swalab.SWA(), update_after=0)
        averaged = _trainer(out, data, [callback])
        averaged.train()  # the average holds 4 models
        assert "eval_average_accuracy" in averaged.evaluate()
        contenders = {
            "plain": plain.evaluate,
            "callback": averaged.evaluate,
            "two plain": lambda: (plain.evaluate(), plain.evaluate()),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for run in contenders.values():  # warm-up
            run()
        for _ in range(opts.repeats):
            order = list(contenders)
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"trainer.evaluate(), {opts.samples} samples, median of {opts.repeats} (seconds)")
    print(f"{'contender':<12} {'median s':>9} {'/ plain':>8} {'/ two plain':>12}")
    for name, value in median.items():
        print(
            f"{name:<12} {value:>9.4f} {value / median['plain']:>8.2f} "
            f"{value / median['two plain']:>12.2f}"
        )


if __name__ == "__main__":
    main()
