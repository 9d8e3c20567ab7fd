"""``--executor local|submitit|ray``: the same results.csv and result.json files as --jobs 1;
bad executors, options, missing engines and a silent Ray address: one line, exit 2, nothing
trained or claimed."""

import json
import socket
import sys
from pathlib import Path

import pytest

from swalab.cli import main
from swalab.lab.config import ConfigError, load_config
from swalab.lab.executors import open_executor, parse_options
from swalab.lab.rundir import read_results
from swalab.lab.runner import run_experiment

TINY = [  # as tests/test_jobs.py: two seeds x two methods sharing a trunk, and pre-training
    "train.epochs=3",
    "train.eval_every=3",
    "seeds=[0, 1]",
    "pretrain.epochs=1",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]


def _table(out: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_results(out)]


def _result_files(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(out.glob("*/seed*/result.json")):
        row = json.loads(path.read_text())
        row.pop("seconds")
        found[str(path.relative_to(out))] = row
    return found


def _run(out: Path, **kwargs) -> None:
    run_experiment(load_config("mnist1d", TINY), out, progress=False, log=lambda t: None, **kwargs)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("executors") / "jobs1"
    _run(out, jobs=1)
    assert len(read_results(out)) == 4
    return out


@pytest.mark.slow
def test_jobs_2_and_submitit_local_equal_jobs_1(sequential, tmp_path):
    _run(tmp_path / "jobs2", jobs=2)
    _run(tmp_path / "submitit", executor="submitit", executor_options={"cluster": "local"})
    for out in (tmp_path / "jobs2", tmp_path / "submitit"):
        assert _table(out) == _table(sequential)
        assert _result_files(out) == _result_files(sequential)
    assert list((tmp_path / "submitit" / ".submitit").glob("*_result.pkl"))  # two jobs ran
    # a second run finds everything done: nothing is submitted again
    _run(tmp_path / "submitit", executor="submitit", executor_options={"cluster": "local"})
    assert len(list((tmp_path / "submitit" / ".submitit").glob("*_result.pkl"))) == 2


@pytest.mark.slow
def test_a_local_ray_cluster_equals_jobs_1(sequential, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        _run(tmp_path / "ray", executor="ray", executor_options={"num_cpus": "1"})
    finally:
        ray.shutdown()
    assert _table(tmp_path / "ray") == _table(sequential)
    assert _result_files(tmp_path / "ray") == _result_files(sequential)


def test_parse_and_check_options(tmp_path):
    assert parse_options(["partition=gpu", "time=60"]) == {"partition": "gpu", "time": "60"}
    with pytest.raises(ConfigError, match="must be KEY=VALUE, got 'partition'"):
        parse_options(["partition"])
    assert open_executor("local", {}, tmp_path) is None
    with pytest.raises(ConfigError, match="must be one of local, submitit, ray, got 'slurm-typo'"):
        open_executor("slurm-typo", {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown --executor-option 'partiton' for --executor"):
        open_executor("submitit", {"partiton": "gpu"}, tmp_path)
    with pytest.raises(ConfigError, match="time='soon' for submitit: expected int"):
        open_executor("submitit", {"time": "soon"}, tmp_path)
    with pytest.raises(ConfigError, match="num_gpus must be >= 0"):
        open_executor("ray", {"num_gpus": "-1"}, tmp_path)
    with pytest.raises(
        ConfigError, match="unknown --executor-option 'address' for --executor local"
    ):
        open_executor("local", {"address": "x:1"}, tmp_path)
    with pytest.raises(ConfigError, match="cannot be combined with torchrun"):
        open_executor("ray", {}, tmp_path, processes=2)
    assert not any(tmp_path.iterdir())  # nothing written


def _silent_port() -> int:
    with socket.socket() as s:  # bound, then closed: nobody listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--executor", "slurm-typo"], "--executor must be one of local, submitit, ray"),
        (
            ["--executor", "submitit", "--executor-option", "gpus=1"],
            "unknown --executor-option 'gpus' for --executor submitit (known: cluster, folder,",
        ),
        (["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local"),
        (["--executor-option", "partition=gpu"], "unknown --executor-option 'partition' for"),
        (
            ["--executor", "ray", "--executor-option", f"address=127.0.0.1:{_silent_port()}"],
            "does not answer",
        ),
    ],
)
def test_cli_bad_executor_is_one_line_exit_2(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["run", "mnist1d", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())  # nothing trained or claimed


@pytest.mark.parametrize(
    "engine, package, extra", [("submitit", "submitit", "slurm"), ("ray", "ray", "ray")]
)
def test_a_missing_engine_names_its_extra(engine, package, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    out = tmp_path / "out"
    assert main(["run", "mnist1d", "--out", str(out), "--executor", engine]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"swalab: error: --executor {engine} needs the {package} package: "
        f"pip install 'swalab[{extra}]'\n"
    )
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_a_preempted_slurm_job_is_requeued_and_resumes_bit_identically(
    sequential, tmp_path, monkeypatch
):
    import signal
    import threading
    import time

    psutil = pytest.importorskip("psutil")

    from swalab.lab import executors
    from swalab.lab.leases import Claims

    out = tmp_path / "submitit"
    submit = executors._Submitit.submit
    interrupted: list[str] = []

    def preempt_after_an_epoch(jobs) -> None:
        claims, deadline = Claims(out), time.monotonic() + 240
        while time.monotonic() < deadline and not interrupted:
            for job in jobs:
                seed = jobs.index(job)
                info = claims.info(f"sgd/seed{seed}")
                if info is not None and info.live and (info.epoch or 0) >= 1:
                    for task in psutil.Process(job._process.pid).children(recursive=True):
                        task.send_signal(signal.SIGUSR2)  # Slurm's preemption signal
                    interrupted.append(job.job_id)
                    return
            time.sleep(0.05)

    def submit_and_preempt(self, calls):
        jobs = submit(self, calls)
        if not interrupted:
            threading.Thread(target=preempt_after_an_epoch, args=(jobs,), daemon=True).start()
        return jobs

    monkeypatch.setattr(executors._Submitit, "submit", submit_and_preempt)
    _run(out, executor="submitit", executor_options={"cluster": "local"})
    assert interrupted
    log = next((out / ".submitit").glob(f"{interrupted[0]}_0_log.out")).read_text()
    assert "Requeued" in log and log.count("Loading pickle") == 2, log  # started again
    assert _table(out) == _table(sequential)
    assert _result_files(out) == _result_files(sequential)


@pytest.mark.slow
def test_ctrl_c_cancels_the_ray_tasks_and_a_rerun_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import time

    pytest.importorskip("ray")
    from swalab.lab.leases import Claims

    sets = [
        "train.epochs=8",
        "train.eval_every=8",
        "seeds=[0, 1]",
        "methods=[{method: sgd}]",
        "landscape.pieces=[]",
    ]
    out = tmp_path / "ray"
    argv = [sys.executable, "-m", "swalab", "run", "mnist1d", "--out", str(out)]
    argv += ["--executor", "ray", "--executor-option", "num_cpus=1"]
    argv += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    main_process = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    claims, deadline = Claims(out), time.monotonic() + 300
    keys = ["sgd/seed0", "sgd/seed1"]
    while not any((info := claims.info(k)) and info.live and (info.epoch or 0) >= 1 for k in keys):
        assert main_process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    main_process.send_signal(signal.SIGINT)
    _, err = main_process.communicate(timeout=120)
    assert main_process.returncode == 130 and "interrupted" in err, err
    time.sleep(2)
    assert not any((info := claims.info(k)) and info.live for k in keys)  # the tasks are gone
    assert not (out / "sgd" / "seed0" / "result.json").exists()
    try:
        resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"the re-run hung: {err.stdout!r} {err.stderr!r}") from None
    assert resumed.returncode == 0, resumed.stderr
    _run_sets = load_config("mnist1d", sets)
    run_experiment(_run_sets, tmp_path / "one", progress=False, log=lambda t: None, jobs=1)
    assert _table(out) == _table(tmp_path / "one")
    assert _result_files(out) == _result_files(tmp_path / "one")
