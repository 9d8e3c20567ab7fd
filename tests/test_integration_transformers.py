"""swalab.integrations.transformers against the real Hugging Face Trainer on the CPU.

A one-layer GPT-2 built from a config (no hub download) on 16 in-memory sequences. Oracles: the
average equals the mean (or EMA recurrence) of the weights recorded after the averaged steps; the
average saved beside a checkpoint loads with ``from_pretrained`` and equals the average then;
the logged ``eval_average_loss`` equals the saved average's loss, computed sample by sample; a
resumed run ends with the uninterrupted run's average.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from integration_helpers import assert_all_close, ema, mean, params, run_readme_example

import swalab

transformers = pytest.importorskip("transformers")
from swalab.integrations.transformers import AVERAGE_DIR, AveragingCallback  # noqa: E402

STEPS = 8


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _data(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(out, **kwargs):
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        max_steps=STEPS,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.TrainingArguments(**dict(base, **kwargs))


class Recorder(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(params(model))


def _train(out, callback, recorder=None, resume=None, **kwargs):
    callbacks = [callback] + ([recorder] if recorder else [])
    trainer = transformers.Trainer(
        model=_model(),
        args=_args(out, **kwargs),
        train_dataset=_data(0),
        eval_dataset=_data(1, n=7),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_swa_every_k_steps_saved_beside_each_checkpoint(tmp_path):
    recorder, callback = Recorder(), AveragingCallback(update_every=2, update_after=1)
    _train(tmp_path, callback, recorder)
    assert len(recorder.steps) == STEPS
    expected = mean(recorder.steps[1::2])  # steps 1, 3, 5, 7
    assert_all_close(params(callback.averaged.module), expected)
    at_4 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "checkpoint-4" / AVERAGE_DIR)
    assert_all_close(params(at_4), mean([recorder.steps[1], recorder.steps[3]]))
    final = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / AVERAGE_DIR)
    assert_all_close(params(final), params(callback.averaged.module))


def test_ema_with_warmup_follows_the_recurrence(tmp_path):
    decay, gamma, power = 0.9, 2.0, 2 / 3
    recorder = Recorder()
    callback = AveragingCallback(swalab.EMA(decay, warmup_gamma=gamma), update_after=2)
    _train(tmp_path, callback, recorder, save_strategy="no")
    expected = ema(recorder.steps[2:], decay, gamma, power)  # the first averaged step copies
    assert_all_close(params(callback.averaged.module), expected)


def _mean_loss(model, data):
    """The oracle: each sample's loss with the model in eval mode, averaged over the samples."""
    model.eval()
    with torch.no_grad():
        return sum(float(model(**{k: v[None] for k, v in row.items()}).loss) for row in data) / len(
            data
        )


def _token_accuracy(prediction):
    """compute_metrics: the next-token accuracy of the logits."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}


def _scalars(log_dir):
    from tensorboard.backend.event_processing import event_accumulator

    values = {}
    for events in Path(log_dir).rglob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return values


def test_the_average_is_evaluated_logged_and_kept_best_by_the_trainer(tmp_path):
    """The average's loss and compute_metrics reach log_history and TensorBoard, computed as
    the Trainer's own eval_loss; the best-average checkpoint is what load_best_model_at_end
    gives and what swalab_average/ holds."""
    pytest.importorskip("tensorboard")
    callback = AveragingCallback(update_after=2)
    trainer = transformers.Trainer(
        model=_model(),
        args=_args(
            tmp_path,
            eval_strategy="steps",
            eval_steps=4,
            metric_for_best_model="average_loss",
            greater_is_better=False,
            load_best_model_at_end=True,
            report_to=["tensorboard"],
        ),
        train_dataset=_data(0),
        eval_dataset=_data(1, n=7),
        callbacks=[callback],
        compute_metrics=_token_accuracy,
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "eval_average_loss" in e]
    assert [e["step"] for e in logged] == [4, 8]
    assert all("eval_average_accuracy" in e for e in logged)
    best = min(logged, key=lambda e: e["eval_average_loss"])
    assert trainer.state.best_metric == best["eval_average_loss"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    # the checkpoint's average, evaluated by the Trainer as the live weights are (same loss)
    saved = tmp_path / f"checkpoint-{best['step']}" / AVERAGE_DIR
    average = transformers.GPT2LMHeadModel.from_pretrained(saved)
    plain = transformers.Trainer(
        model=average,
        args=_args(tmp_path / "plain"),
        eval_dataset=_data(1, n=7),
        compute_metrics=_token_accuracy,
    )
    reference = plain.evaluate()
    assert best["eval_average_loss"] == pytest.approx(reference["eval_loss"], rel=1e-5)
    assert best["eval_average_accuracy"] == pytest.approx(reference["eval_accuracy"])
    # load_best_model_at_end loaded that average; swalab_average/ is it too
    assert_all_close(params(trainer.model), params(average))
    final_dir = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / AVERAGE_DIR)
    assert_all_close(params(final_dir), params(average))
    # TensorBoard (report_to) holds the average's metrics at the evaluation steps
    scalars = _scalars(tmp_path / "runs")  # the Trainer's default logging dir
    assert [step for step, _ in scalars["eval/average_loss"]] == [4, 8]
    assert [step for step, _ in scalars["eval/average_accuracy"]] == [4, 8]
    # an evaluate() after training evaluates both, each under its prefix
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy", "eval_average_loss", "eval_average_accuracy"} <= set(
        metrics
    )


def test_without_a_best_average_metric_the_final_average_is_saved(tmp_path):
    callback = AveragingCallback(update_after=2)
    trainer = _train(tmp_path, callback, eval_strategy="steps", eval_steps=4)
    final = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / AVERAGE_DIR)
    assert_all_close(params(final), params(callback.averaged.module))
    assert trainer.state.best_model_checkpoint is None  # no metric_for_best_model: the final one


@pytest.mark.parametrize("where", ["output_dir", "args"])
def test_resume_gives_the_uninterrupted_average(tmp_path, where):
    rule = swalab.EMA(0.8, warmup_gamma=3)
    whole = AveragingCallback(rule, update_after=1)
    _train(tmp_path / "whole", whole)
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    resumed = AveragingCallback(rule, update_after=1)
    if where == "output_dir":  # trainer.train(resume_from_checkpoint=True) finds checkpoint-4 there
        shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-4")
        _train(tmp_path / "resumed", resumed, resume=True)
    else:  # a checkpoint elsewhere, named in TrainingArguments too
        _train(
            tmp_path / "resumed",
            resumed,
            resume=str(checkpoint),
            resume_from_checkpoint=str(checkpoint),
        )
    assert resumed.averaged.count == whole.averaged.count == 7
    assert_all_close(params(resumed.averaged.module), params(whole.averaged.module))


def test_resume_without_a_saved_average_is_refused(tmp_path):
    _train(tmp_path, transformers.TrainerCallback(), max_steps=4)
    with pytest.raises(ValueError, match="resuming at step 4 but .* holds no swalab average"):
        _train(tmp_path, AveragingCallback(), resume=str(tmp_path / "checkpoint-4"))


class TinyConfig(transformers.PretrainedConfig):
    model_type = "swalab-tiny-bn"


class TinyBN(transformers.PreTrainedModel):
    """A Hugging Face model with BatchNorm as its first layer: its statistics are the inputs'."""

    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.norm = torch.nn.BatchNorm1d(4)
        self.linear = torch.nn.Linear(4, 1)
        self.post_init()

    def forward(self, x, labels=None):
        out = self.linear(self.norm(x))
        loss = None if labels is None else torch.nn.functional.mse_loss(out, labels)
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=out)


def test_batchnorm_recomputed_after_training(tmp_path):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3)) * 2 + 1
    data = [{"x": row, "labels": row.sum(0, keepdim=True)} for row in x]
    args = _args(tmp_path, save_strategy="no")
    trainer = transformers.Trainer(
        model=TinyBN(TinyConfig()), args=args, train_dataset=data, callbacks=[AveragingCallback()]
    )
    trainer.train()
    saved = TinyBN.from_pretrained(tmp_path / AVERAGE_DIR)
    # 4 shuffled batches of 4: the mean of their means is the mean of x
    torch.testing.assert_close(saved.norm.running_mean, x.mean(0))
    assert int(saved.norm.num_batches_tracked) == 4


def test_bad_rule_is_a_one_line_error():
    with pytest.raises(ValueError, match="rule must be a swalab AveragingRule"):
        AveragingCallback(rule="ema")


def test_import_swalab_needs_neither_framework_and_a_missing_one_names_the_extra():
    code = (
        "import sys\n"
        "import swalab\n"
        "assert 'lightning' not in sys.modules and 'transformers' not in sys.modules\n"
        "for name in ('lightning', 'transformers'):\n"
        "    sys.modules[name] = None  # what Python does for a package that is not installed\n"
        "for module in ('lightning', 'transformers'):\n"
        "    try:\n"
        "        __import__(f'swalab.integrations.{module}')\n"
        "    except ImportError as error:\n"
        "        print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("Lightning is not installed: pip install 'swalab[integrations]'")
    assert lines[1].startswith(
        "Hugging Face transformers is not installed: pip install 'swalab[integrations]'"
    )


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    out = run_readme_example("**Hugging Face**", tmp_path)
    assert "'eval_average_loss'" in out and "'eval_loss'" in out
    for directory in ("out/swalab_average", "out/checkpoint-20/swalab_average"):
        assert (tmp_path / directory / "config.json").is_file(), directory


class EvaluateRecorder(transformers.TrainerCallback):
    """Another callback: what each ``on_evaluate`` and each logged evaluation hands it."""

    def __init__(self):
        self.evaluated, self.logged = [], []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evaluated.append((state.global_step, dict(metrics)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(k.startswith("eval_") for k in logs):
            self.logged.append((state.global_step, dict(logs)))


class _Warnings(__import__("logging").Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _early_stopped(out, metric, averaging):
    """Train with EarlyStoppingCallback (patience 2, a threshold no change passes: every
    evaluation after the first is a non-improvement), an evaluation every 2 steps."""
    stopper, recorder = transformers.EarlyStoppingCallback(2, early_stopping_threshold=1e9), None
    recorder = EvaluateRecorder()
    callbacks = [stopper, recorder] + ([AveragingCallback(update_after=0)] if averaging else [])
    trainer = transformers.Trainer(
        model=_model(),
        args=_args(
            out,
            max_steps=16,
            eval_strategy="steps",
            eval_steps=2,
            save_steps=2,
            metric_for_best_model=metric,
            greater_is_better=False,
            load_best_model_at_end=True,
        ),
        train_dataset=_data(0),
        eval_dataset=_data(1, n=7),
        callbacks=callbacks,
        compute_metrics=_token_accuracy,
    )
    handler = _Warnings()
    logger = transformers.logging.get_logger("transformers.trainer_callback")
    logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        logger.removeHandler(handler)
    return trainer, stopper, recorder, handler.messages


@pytest.mark.parametrize("metric", ["loss", "average_loss"])
def test_other_callbacks_see_one_evaluation_with_live_and_average_metrics(tmp_path, metric):
    """Issue 24: EarlyStoppingCallback finds its metric (live or average) in every on_evaluate and
    counts each evaluation once: it stops where it stops without the average (live metric) or where
    the same patience gives (average metric); every callback sees one on_evaluate and one logged
    record per evaluation, holding the live and the average metrics."""
    trainer, stopper, recorder, warned = _early_stopped(tmp_path / "avg", metric, averaging=True)
    assert not [m for m in warned if "did not find" in m], warned
    steps = [step for step, _ in recorder.evaluated]
    assert steps == [2, 4, 6] and trainer.state.global_step == 6  # patience 2: the 3rd stops
    assert stopper.early_stopping_patience_counter == 2
    everything = {"eval_loss", "eval_accuracy", "eval_average_loss", "eval_average_accuracy"}
    assert all(everything <= set(m) for _, m in recorder.evaluated)
    assert [step for step, _ in recorder.logged] == steps
    assert all(everything <= set(m) for _, m in recorder.logged)
    history = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in history] == steps and all(everything <= set(e) for e in history)
    if metric == "loss":  # the same stop as without the callback
        plain, plain_stopper, plain_recorder, _ = _early_stopped(tmp_path / "plain", metric, False)
        assert [s for s, _ in plain_recorder.evaluated] == steps
        assert plain_stopper.early_stopping_patience_counter == 2
        # the live metrics are the same numbers either way (the average is swapped back out)
        for (_, with_avg), (_, without) in zip(recorder.evaluated, plain_recorder.evaluated):
            assert with_avg["eval_loss"] == pytest.approx(without["eval_loss"], rel=1e-6)
    # an evaluate() outside training: one on_evaluate, with both
    before = len(recorder.evaluated)
    metrics = trainer.evaluate()
    assert len(recorder.evaluated) == before + 1 and everything <= set(recorder.evaluated[-1][1])
    assert everything <= set(metrics)


def test_several_eval_datasets_each_one_evaluation_with_its_average(tmp_path):
    """A dict of eval datasets: as without the callback, one on_evaluate per dataset; each holds
    that dataset's live and average metrics."""
    recorder = EvaluateRecorder()
    trainer = transformers.Trainer(
        model=_model(),
        args=_args(tmp_path, max_steps=2, save_strategy="no"),
        train_dataset=_data(0),
        eval_dataset={"a": _data(1, n=5), "b": _data(2, n=4)},
        callbacks=[AveragingCallback(update_after=0), recorder],
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert [sorted(k for k in m if k.endswith("_loss")) for _, m in recorder.evaluated] == [
        ["eval_a_average_loss", "eval_a_loss"],
        ["eval_b_average_loss", "eval_b_loss"],
    ]
    assert {"eval_a_loss", "eval_a_average_loss", "eval_b_loss", "eval_b_average_loss"} <= set(
        metrics
    )
    assert len(recorder.logged) == 2
