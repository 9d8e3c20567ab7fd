"""``swalab run --jobs N``: worker processes give the sequential results, survive a failed or
diverged run, stop together on Ctrl-C and resume; bad --jobs, device, precision: 1 line, exit 2."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from swalab.cli import main
from swalab.lab.config import ConfigError, load_config, to_dict
from swalab.lab.jobs import RunsFailed, Slot, check_jobs, slots
from swalab.lab.rundir import read_results
from swalab.lab.runner import run_experiment

# two seeds x two methods, with a pre-training phase whose cache the runs of a seed share
TINY = [
    "train.epochs=3",
    "train.eval_every=3",
    "seeds=[0, 1]",
    "pretrain.epochs=1",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]
METRICS = [
    "method",
    "seed",
    "epochs",
    "status",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "test_ece",
]


def metrics(out: Path) -> list[dict[str, str]]:
    return [{k: row[k] for k in METRICS} for row in read_results(out)]


@pytest.mark.slow
def test_two_jobs_equal_the_sequential_run_and_pretrain_once(tmp_path):
    cfg = load_config("mnist1d", TINY)
    run_experiment(cfg, tmp_path / "seq", progress=False, log=lambda text: None)
    lines: list[str] = []
    rows = run_experiment(cfg, tmp_path / "par", progress=False, log=lines.append, jobs=2)
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("sgd", 0),
        ("swa", 0),
        ("sgd", 1),
        ("swa", 1),
    ]
    assert metrics(tmp_path / "par") == metrics(tmp_path / "seq")
    assert len(metrics(tmp_path / "seq")) == 4
    for seed in (0, 1):  # the pre-training cache of each seed: computed once, by one job
        assert sum(line == f"started pre-training seed {seed} on cpu" for line in lines) == 1
        a = torch.load(tmp_path / "seq" / "pretrain" / f"seed{seed}.pt")
        b = torch.load(tmp_path / "par" / "pretrain" / f"seed{seed}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # one line per event without a terminal: every job's start (a seed's two runs share their
    # first epoch: one job) and every run's result
    assert sum(line.startswith("started sgd, swa seed") for line in lines) == 2
    assert sum(line.startswith("[") and "test_accuracy" in line for line in lines) == 4


@pytest.mark.slow
def test_failed_and_diverged_jobs_do_not_stop_the_others(tmp_path):
    cfg = load_config(
        "mnist1d",
        [
            "train.epochs=2",
            "seeds=[0, 1]",
            "data.name=friedman1",
            "data.options={}",
            "model.name=mlp",
            "model.options={}",
            "train.lr=0.01",
            (
                "methods=[{method: swa, label: wild,"
                " options: {swa_start: 1, schedule: cyclic, swa_lr: 1.0e+8}},"
                " {method: sgd}]"
            ),
        ],
    )
    out = tmp_path / "run"
    (out / "sgd" / "seed0").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "sgd" / "seed0" / "checkpoint.pt").write_bytes(b"not a checkpoint")  # this run fails
    lines: list[str] = []
    with pytest.raises(RunsFailed, match=r"1 run\(s\) failed.*sgd seed 0"):
        run_experiment(cfg, out, progress=False, log=lines.append, jobs=2)
    saved = {(r["method"], r["seed"]): r for r in read_results(out)}
    assert set(saved) == {("wild", "0"), ("wild", "1"), ("sgd", "1")}
    assert saved[("wild", "0")]["status"] == saved[("wild", "1")]["status"] == "diverged"
    assert saved[("sgd", "1")]["status"] == "done" and float(saved[("sgd", "1")]["test_mse"]) < 1.0
    assert any(line.startswith("failed: sgd seed 0") for line in lines)
    # the failed run is retried by the same command; the finished ones are not
    (out / "sgd" / "seed0" / "checkpoint.pt").unlink()
    lines.clear()
    rows = run_experiment(cfg, out, progress=False, log=lines.append, jobs=2)
    assert rows[1]["status"] == "done" and lines[0].startswith("mnist1d: 4 runs (3 already done)")


@pytest.mark.slow
def test_ctrl_c_stops_every_job_and_a_rerun_resumes_them(tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    sets = [
        "train.epochs=8",
        "train.eval_every=8",
        "seeds=[0]",
        "methods=[{method: sgd}, {method: swa, options: {swa_start: 4}}]",
    ]
    argv = [sys.executable, "-m", "swalab", "run", "mnist1d", "--out", str(out), "--jobs", "2"]
    for s in sets:
        argv += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    main_process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    checkpoints = [out / label / "seed0" / "checkpoint.pt" for label in ("sgd", "swa")]
    deadline = time.monotonic() + 240
    while not all(p.exists() for p in checkpoints):  # both jobs are training
        assert main_process.poll() is None and time.monotonic() < deadline, (
            main_process.communicate()
        )
        time.sleep(0.2)
    workers = psutil.Process(main_process.pid).children(recursive=True)
    main_process.send_signal(signal.SIGINT)
    _, err = main_process.communicate(timeout=60)
    assert main_process.returncode == 130 and "interrupted" in err
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not (out / "sgd" / "seed0" / "result.json").exists()
    interrupted = [torch.load(p, weights_only=False)["epoch"] + 1 for p in checkpoints]
    assert all(1 <= e < 8 for e in interrupted)
    resumed = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr
    # the resumed runs equal uninterrupted sequential ones
    run_experiment(
        load_config("mnist1d", sets), tmp_path / "seq", progress=False, log=lambda text: None
    )
    assert metrics(out) == metrics(tmp_path / "seq")


def test_threads_are_divided_and_gpus_dealt_round_robin(monkeypatch):
    cpu = torch.device("cpu")
    assert slots(2, cpu, None, cores=2) == [Slot(cpu, 1), Slot(cpu, 1)]
    assert slots(3, cpu, None, cores=16) == [Slot(cpu, 5)] * 3  # 3 x 5 <= 16
    assert slots(2, cpu, 2, cores=16) == [Slot(cpu, 2)] * 2  # train.threads is kept when it fits
    assert slots(4, cpu, None, cores=2) == [Slot(cpu, 1)] * 4  # at least one thread
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    dealt = [s.device for s in slots(3, torch.device("cuda"), None, cores=16)]
    assert dealt == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]
    assert {s.device for s in slots(3, torch.device("cuda", 1), None, cores=16)} == {
        torch.device("cuda", 1)
    }


def test_auto_jobs_fit_the_cores_or_gpus_without_changing_a_run(monkeypatch):
    from swalab.lab import jobs

    cpu = torch.device("cpu")
    monkeypatch.setattr(jobs, "cpu_cores", lambda: 8)
    assert jobs.auto_jobs(1, cpu, runs=80) == 8  # one thread per run: a process per core
    assert jobs.auto_jobs(3, cpu, runs=80) == 2  # 2 x 3 threads <= 8 cores
    assert jobs.auto_jobs(None, cpu, runs=80) == 1  # torch's default: every core for one run
    assert jobs.auto_jobs(16, cpu, runs=80) == 1
    assert jobs.auto_jobs(1, cpu, runs=3) == 3  # no more than the runs
    assert jobs.auto_jobs(1, cpu, runs=80, processes=2) == 1  # under torchrun
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert jobs.auto_jobs(1, torch.device("cuda"), runs=80) == 2
    assert jobs.auto_jobs(1, torch.device("cuda", 1), runs=80) == 1


@pytest.mark.parametrize("flag, expected", [([], 2), (["--jobs", "1"], 1), (["--jobs", "auto"], 2)])
def test_cli_jobs_default_to_auto(flag, expected, tmp_path, monkeypatch):
    from swalab.lab import jobs, runner

    seen = {}
    monkeypatch.setattr(jobs, "cpu_cores", lambda: 2)  # the mnist1d preset: 1 thread per run
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **kw: seen.update(kw) or [])
    assert main(["run", "mnist1d", "--device", "cpu", "--out", str(tmp_path / "r"), *flag]) == 0
    assert seen["jobs"] == expected


def test_check_jobs():
    check_jobs(4, 4)
    with pytest.raises(ConfigError, match="--jobs must be an integer >= 1, got 0"):
        check_jobs(0, 4)
    with pytest.raises(ConfigError, match="--jobs 5 is more than the 4 runs"):
        check_jobs(5, 4)
    with pytest.raises(ConfigError, match="cannot be combined with torchrun"):
        check_jobs(2, 4, processes=2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
        (["--jobs", "81"], "--jobs 81 is more than the 80 runs"),  # 8 seeds x 10 methods
        (
            ["--set", "train.precision=fp8"],
            "train.precision must be one of fp32, bf16, fp16, got 'fp8'",
        ),
        (
            ["--set", "train.precision=fp16", "--device", "cpu"],
            "train.precision fp16 needs a CUDA device",
        ),
        pytest.param(
            ["--device", "cuda:3"],
            "'cuda:3' does not exist",
            marks=pytest.mark.skipif(torch.cuda.device_count() > 3, reason="cuda:3 exists here"),
        ),
        (["--device", "tpu"], "must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
        (
            ["--jobs", "2", "--set", "methods.swa.options.swa_start=500"],
            "swa_start must be an epoch in 1..30",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main(["run", "mnist1d", "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cli_cuda_without_gpu_is_one_line(capsys, tmp_path):
    assert main(["run", "mnist1d", "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "swalab: error: --device 'cuda' does not exist: no CUDA GPU is available here; "
        "use --device cpu\n"
    )
