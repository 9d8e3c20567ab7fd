"""A run directory many processes share: per-run claims (lab/leases.py), `swalab run` twice on one
--out, a killed process's runs taken over, `swalab status`."""

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from swalab.cli import main
from swalab.lab.config import ConfigError, load_config, to_dict
from swalab.lab.leases import ClaimLost, Claims
from swalab.lab.rundir import RunDirectory, read_results
from swalab.lab.runner import run_experiment
from swalab.lab.status import run_status

TINY = [  # as tests/test_jobs.py: two seeds x two methods sharing a trunk, and pre-training
    "train.epochs=3",
    "train.eval_every=3",
    "seeds=[0, 1]",
    "pretrain.epochs=1",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]
ENV = dict(
    os.environ,
    PYTHONPATH=str(Path(__file__).parents[1] / "src"),
    OMP_NUM_THREADS="1",
    SWALAB_CLAIM_TIMEOUT="120",
)
EPOCH_LINE = re.compile(r" epoch \d+/\d+: ")


def _argv(out: Path, sets: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "swalab", "run", "mnist1d", "--out", str(out), "--jobs", "1"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _comparable(out: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_results(out)]


def _result_files(out: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(out.glob("*/seed*/result.json")):
        row = json.loads(path.read_text())
        row.pop("seconds")
        found[str(path.relative_to(out))] = row
    return found


# --- the claims themselves ---


def _hold_and_die(out: str, key: str) -> None:
    Claims(out).claim(key)
    os._exit(0)  # gone without releasing: a killed process


def _race(out: str, key: str, wins: "mp.Queue") -> None:
    claims = Claims(out)
    wins.put(claims.claim(key))
    time.sleep(1.0)
    os._exit(0)


def test_a_claim_is_taken_by_one_live_process_and_released(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)  # this process: a live owner
    assert first.claim("sgd/seed0")
    assert not second.claim("sgd/seed0")  # live (same machine, pid alive): never taken
    second.timeout = 0.0  # even with no patience: a live process on this machine keeps it
    assert not second.claim("sgd/seed0")
    info = second.info("sgd/seed0")
    assert info.pid == os.getpid() and info.live and info.generation == 0
    first.set_epoch("sgd/seed0", 3)
    first.beat()
    assert second.info("sgd/seed0").epoch == 3
    first.release("sgd/seed0")
    assert second.claim("sgd/seed0") and second.info("sgd/seed0").generation == 1
    first.close()
    second.close()


def test_the_claim_of_a_dead_process_is_taken_over(tmp_path):
    ctx = mp.get_context("spawn")
    process = ctx.Process(target=_hold_and_die, args=(str(tmp_path), "swa/seed1"))
    process.start()
    process.join()
    claims = Claims(tmp_path)
    dead = claims.info("swa/seed1")
    assert dead.pid == process.pid and not dead.released and not dead.live
    assert claims.claim("swa/seed1")
    assert claims.info("swa/seed1").generation == 1 and claims.info("swa/seed1").pid == os.getpid()
    claims.close()


def test_of_several_takers_of_a_stale_claim_exactly_one_wins(tmp_path):
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=_hold_and_die, args=(str(tmp_path), "k/seed0"))
    dead.start()
    dead.join()
    wins = ctx.Queue()
    racers = [ctx.Process(target=_race, args=(str(tmp_path), "k/seed0", wins)) for _ in range(4)]
    for r in racers:
        r.start()
    results = [wins.get(timeout=60) for _ in racers]
    for r in racers:
        r.join()
    assert sorted(results) == [False, False, False, True]


def _fake(folder: Path, machine: str, beat: float, generation: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "token": "t",
        "host": machine.split("/")[0],
        "machine": machine,
        "pid": 1,
        "since": beat,
        "beat": beat,
        "released": False,
    }
    (folder / f"{generation:06d}.json").write_text(json.dumps(record))


def test_another_machines_claim_is_stale_only_past_the_timeout(tmp_path):
    claims = Claims(tmp_path, timeout=60)
    _fake(claims.folder("sgd/seed0"), "node7/4026531836", time.time() - 5)
    assert not claims.claim("sgd/seed0")  # heartbeat 5 s old: alive
    _fake(claims.folder("sgd/seed1"), "node7/4026531836", time.time() - 300)
    assert claims.claim("sgd/seed1")  # 300 s without a heartbeat: its machine is gone
    assert claims.info("sgd/seed1").generation == 1
    claims.close()


def test_a_holder_taken_over_notices_and_stops(tmp_path):
    holder = Claims(tmp_path, timeout=60)
    assert holder.claim("sgd/seed0")
    # another machine judged it stale (say, a network partition) and took it: generation 1
    _fake(holder.folder("sgd/seed0"), "node7/1", time.time(), generation=1)
    holder.beat()
    with pytest.raises(ClaimLost, match="sgd/seed0"):
        holder.check("sgd/seed0")
    holder.release("sgd/seed0")  # leaves the new holder's claim alone
    assert holder.info("sgd/seed0").host == "node7" and not holder.info("sgd/seed0").released
    holder.close()


def test_a_different_config_is_refused_while_another_process_writes(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("mnist1d", TINY)
    out.mkdir()  # another process has just set up --out with its config, nothing trained yet
    RunDirectory(out).write_config(to_dict(load_config("mnist1d", [*TINY, "train.lr=0.05"])))
    other = Claims(out)  # a live process that set up the first config, nothing claimed yet
    assert other.claim("writers/node7-1")
    with pytest.raises(ConfigError, match="another swalab process with a different config"):
        run_experiment(cfg, out, progress=False, log=lambda text: None, jobs=1)
    assert not (out / "sgd").exists()  # nothing trained
    other.close()
    run_experiment(  # once that process is gone, the directory (nothing started) is ours
        load_config("mnist1d", [*TINY, "seeds=[0]", "train.epochs=2", "methods=[{method: sgd}]"]),
        out,
        progress=False,
        log=lambda text: None,
        jobs=1,
    )
    assert [row["method"] for row in read_results(out)] == ["sgd"]


# --- two `swalab run` on one --out ---


@pytest.mark.slow
def test_two_processes_share_one_out_and_train_no_epoch_twice(tmp_path):
    reference: list[str] = []
    run_experiment(
        load_config("mnist1d", TINY), tmp_path / "one", progress=False, log=reference.append, jobs=1
    )
    expected = sum(bool(EPOCH_LINE.search(line)) for line in reference)
    # per seed: 1 pre-training epoch, then sgd and swa (3 epochs each) share their first epochs
    assert 2 * (1 + 3) < expected < 2 * (1 + 3 + 3)
    out = tmp_path / "shared"
    a, b = (
        subprocess.Popen(_argv(out, TINY), env=ENV, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    )
    outputs = [p.communicate(timeout=400)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outputs
    trained = [sum(bool(EPOCH_LINE.search(line)) for line in o.splitlines()) for o in outputs]
    assert sum(trained) == expected, (trained, outputs)  # no epoch trained twice
    assert _comparable(out) == _comparable(tmp_path / "one")
    assert _result_files(out) == _result_files(tmp_path / "one")
    assert all(s.state == "done" for s in run_status(out))


@pytest.mark.slow
def test_a_killed_process_leaves_its_runs_to_the_other(tmp_path):
    sets = [
        "train.epochs=8",
        "train.eval_every=8",
        "seeds=[0, 1]",
        "methods=[{method: sgd}, {method: swa, options: {swa_start: 4}}]",
    ]
    out = tmp_path / "shared"
    a = subprocess.Popen(_argv(out, sets), env=ENV, stdout=subprocess.PIPE, text=True)
    b = subprocess.Popen(_argv(out, sets), env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    claims = Claims(out)
    while not any(
        (info := claims.info(key)) and info.pid == a.pid and (info.epoch or 0) >= 1
        for key in ("sgd/seed0", "sgd/seed1")
    ):
        assert a.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    a.send_signal(signal.SIGKILL)  # mid-run, claims held
    a.wait()
    output = b.communicate(timeout=400)[0]
    assert b.returncode == 0, output
    run_experiment(
        load_config("mnist1d", sets), tmp_path / "one", progress=False, log=lambda t: None, jobs=1
    )
    assert _comparable(out) == _comparable(tmp_path / "one")
    assert _result_files(out) == _result_files(tmp_path / "one")


def test_status_lists_done_running_failed_stopped_and_waiting(tmp_path, capsys):
    out = tmp_path / "run"
    run_experiment(
        load_config("mnist1d", [*TINY, "seeds=[0]", "pretrain.epochs=0"]),
        out,
        progress=False,
        log=lambda text: None,
        jobs=1,
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "seeds": [0, 1, 2]}))
    claims = Claims(out)
    claims.claim("sgd/seed1")
    claims.set_epoch("sgd/seed1", 2)
    claims.beat()
    claims.claim("swa/seed1")
    claims.release("swa/seed1", failed="RunFileError: cannot load x")
    (out / "sgd" / "seed2").mkdir(parents=True)
    (out / "sgd" / "seed0" / "checkpoint.pt").rename(out / "sgd" / "seed2" / "checkpoint.pt")
    states = {(s.label, s.seed): s for s in run_status(out)}
    assert states[("sgd", 0)].state == "done" and states[("swa", 0)].state == "done"
    assert states[("sgd", 1)].state == "running" and "epoch 2" in states[("sgd", 1)].detail
    assert f"pid {os.getpid()}" in states[("sgd", 1)].detail
    assert states[("swa", 1)].state == "failed" and "cannot load x" in states[("swa", 1)].detail
    assert states[("sgd", 2)].state == "stopped" and "epoch 3" in states[("sgd", 2)].detail
    assert states[("swa", 2)].state == "waiting"
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].endswith("2 done, 1 running, 1 failed, 1 stopped, 1 waiting")
    claims.close()
