"""Distributed search: worker processes on PostgreSQL and journal studies, a worker killed
mid-trial, SQLite refused for several workers, and a client we did not write reading the
study. PostgreSQL comes from `.ci/run` (a throwaway cluster on 127.0.0.1) through
`HYBRID_TEST_POSTGRES`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

POSTGRES = os.environ.get("HYBRID_TEST_POSTGRES")
needs_postgres = pytest.mark.skipif(
    POSTGRES is None and not os.environ.get("CI"),
    reason="set HYBRID_TEST_POSTGRES (CI starts a throwaway cluster and never skips this)",
)


def _space(
    folder: Path,
    name: str,
    steps: int,
    n_trials: int,
    objectives: list | None = None,
    search: dict | None = None,
    ratios: list | None = None,
) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(8):
        (corpus / f"{i}.txt").write_text(
            f"Act {i}. " + "Now is the winter of our discontent. " * 40
        )
    spec = {
        "name": name,
        "model": {
            "d_model": 32,
            "n_mixers": 3,
            "mamba3": {"d_state": 16, "headdim": 16, "chunk_size": 16},
            "attention": {"n_heads": 2},
            "mlp": {"hidden": 64},
            "layout": {
                "attention_ratio": {"choices": ratios or [0.0, 0.34, 0.67, 1.0]},
                "placement": {"choices": ["front", "back", "even"]},
            },
        },
        "data": {"corpus": str(corpus), "seq_len": 32, "val_fraction": 0.25},
        "train": {
            "steps": steps,
            "batch_size": 4,
            "eval_tokens": 256,
            "lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
        },
        "objectives": objectives or [{"metric": "val_perplexity"}, {"metric": "params"}],
        "search": {
            "sampler": "random",
            "n_trials": n_trials,
            "heartbeat_interval": 0.5,
            "grace_period": 3,
            **(search or {}),
        },
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _hybrid(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hybrid.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def _run(*args: str, cwd: Path, timeout: float = 300) -> str:
    process = _hybrid(*args, cwd=cwd)
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


def _children(folder: Path, study: optuna.Study) -> list:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000
    )


def _inside_a_trial(worker: subprocess.Popen, name: str, storage) -> optuna.trial.FrozenTrial:
    """Wait until `worker` is inside a trial of study `name` (its MLflow child exists) and a
    second into it; return that trial."""
    deadline = time.time() + 120
    while True:
        running = optuna.load_study(study_name=name, storage=storage).get_trials(
            states=(TrialState.RUNNING,)
        )
        if running and "mlflow_run_id" in running[0].user_attrs:
            break
        assert time.time() < deadline and worker.poll() is None, worker.stdout.read()
        time.sleep(0.2)
    time.sleep(1.0)
    return running[0]


def _unique_postgres_url(name: str) -> str:
    """One study name per test run, so reruns on a kept database never collide."""
    return POSTGRES, f"{name}-{os.getpid()}-{int(time.time())}"


@needs_postgres
def test_three_workers_on_postgres(tmp_path):
    storage, name = _unique_postgres_url("three")
    # a CPU latency objective: the study records the device with the workers' thread count
    latency = {"metric": "decode_latency_ms", "context": 16}
    path = _space(
        tmp_path, name, steps=20, n_trials=7, objectives=[{"metric": "val_perplexity"}, latency]
    )
    out = _run("search", str(path), "--workers", "3", "--storage", storage, cwd=tmp_path)
    assert "Pareto set" in out
    study = optuna.load_study(
        study_name=name, storage=storage.replace("postgresql://", "postgresql+psycopg://")
    )
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 7
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // 3)
    assert study.user_attrs["latency_device"].endswith(f", {threads} threads)")
    assert all(0 < t.user_attrs["metrics"]["decode_latency_ms"] < 1e4 for t in complete)
    trained = [t.user_attrs["arch_key"] for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(trained) == len(set(trained))  # no architecture trained twice
    logs = sorted((tmp_path / "hybrid-workers" / name).glob("worker-*.log"))
    assert len(logs) == 3 and all("worker done" in log.read_text() for log in logs)
    assert sum(int(log.read_text().split("worker done: ")[1].split()[0]) for log in logs) >= 7
    children = _children(tmp_path, study)
    ran = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(children) == len(ran)
    assert {r.info.status for r in children} <= {"FINISHED", "FAILED"}
    # the front, exported from the PostgreSQL study
    out = _run("export", str(path), "--storage", storage, "--out", "front", cwd=tmp_path)
    exported = sorted(d.name for d in (tmp_path / "front").glob("trial-*"))
    assert exported and f"exported {len(exported)} trial(s)" in out
    assert all((tmp_path / "front" / d / "model_config.json").is_file() for d in exported)


@pytest.mark.parametrize("store", ["journal", pytest.param("postgres", marks=needs_postgres)])
def test_a_killed_worker_trial_is_rerun_with_the_same_parameters(tmp_path, store):
    if store == "journal":
        storage, name = f"journal:{tmp_path / 'study.log'}", "killed"
    else:
        storage, name = _unique_postgres_url("killed")
    # Mamba-3 only: ~4 s of training on a 2-core CPU, where all-attention takes ~1.5 s and
    # could end before the signal
    path = _space(tmp_path, name, steps=400, n_trials=3, ratios=[0.0])
    _run("search", str(path), "--storage", storage, "--init", cwd=tmp_path)
    load = storage.replace("postgresql://", "postgresql+psycopg://")
    if store == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        load = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    victim = _hybrid("worker", str(path), "--storage", storage, "--quiet", cwd=tmp_path)
    killed = _inside_a_trial(victim, name, load)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    _run("worker", str(path), "--storage", storage, "--quiet", cwd=tmp_path)
    study = optuna.load_study(study_name=name, storage=load)
    lost = study.trials[killed.number]
    assert lost.state == TrialState.FAIL and "worker lost" in lost.user_attrs["fail_reason"]
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == TrialState.COMPLETE
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    children = {int(r.data.tags["hybrid.study.trial"]): r for r in _children(tmp_path, study)}
    assert children[killed.number].info.status == "FAILED"
    assert children[retries[0].number].data.tags["retry_of"] == str(killed.number)
    assert all(r.info.status != "RUNNING" for r in children.values())
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        study.user_attrs["mlflow_parent_run_id"]
    )
    assert parent.info.status == "FINISHED"  # closed by the worker that completed the study

    # a client we did not write, in a fresh process, sees the same trials
    if store == "journal":
        opener = (
            "from optuna.storages import JournalStorage\n"
            "from optuna.storages.journal import JournalFileBackend\n"
            f"storage = JournalStorage(JournalFileBackend({str(tmp_path / 'study.log')!r}))\n"
        )
    else:
        opener = f"storage = {load!r}\n"
    script = (
        f"import optuna\n{opener}"
        f"study = optuna.load_study(study_name={name!r}, storage=storage)\n"
        "print(sorted((t.number, t.state.name) for t in study.trials))\n"
    )
    seen = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert seen == str(sorted((t.number, t.state.name) for t in study.trials))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_worker_says_so_and_its_trial_is_rerun(tmp_path, stop):
    """Ctrl-C (or Slurm's SIGTERM) mid-trial: one line and exit 130 (143), no traceback; the
    trial fails and its parameters wait to be run again, as after a crash."""
    storage, name = f"journal:{tmp_path / 'study.log'}", "interrupted"
    # Mamba-3 only: ~4 s of training on a 2-core CPU, where all-attention takes ~1.5 s and
    # could end before the signal
    path = _space(tmp_path, name, steps=400, n_trials=3, ratios=[0.0])
    _run("search", str(path), "--storage", storage, "--init", cwd=tmp_path)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    load = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    worker = _hybrid("worker", str(path), "--storage", storage, "--quiet", cwd=tmp_path)
    running = _inside_a_trial(worker, name, load)
    os.killpg(worker.pid, stop)
    out, _ = worker.communicate(timeout=60)
    how, code = ("interrupted", 130) if stop == signal.SIGINT else ("terminated", 143)
    assert worker.returncode == code and f"hybrid: {how}" in out, out
    assert "Traceback" not in out, out
    study = optuna.load_study(study_name=name, storage=load)
    stopped = study.trials[running.number]
    seen = f"{out}\n{[(t.number, t.state.name, t.user_attrs) for t in study.trials]}"
    assert stopped.state == TrialState.FAIL, seen
    reason = "KeyboardInterrupt" if code == 130 else "Terminated"
    assert stopped.user_attrs["fail_reason"] == reason, seen
    waiting = [t for t in study.trials if t.user_attrs.get("retry_of") == stopped.number]
    assert len(waiting) == 1 and waiting[0].state == TrialState.WAITING, seen
    assert waiting[0].system_attrs["fixed_params"] == stopped.params  # set when it runs


def test_an_interrupted_trial_resumes_from_its_checkpoint(tmp_path):
    """The retry of a trial stopped mid-training resumes its training checkpoint (one per
    lineage, every `search.checkpoint_interval` seconds) to the result an uninterrupted run
    gets, and the checkpoint is deleted once the study holds that result."""
    from hybrid.search.space import load_space
    from hybrid.search.study import load_data
    from hybrid.train import train

    storage, name = f"journal:{tmp_path / 'study.log'}", "resumed"
    path = _space(tmp_path, name, steps=400, n_trials=1, search={"checkpoint_interval": 0.2},
                  ratios=[0.0])  # fmt: skip
    _run("search", str(path), "--storage", storage, "--init", cwd=tmp_path)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    load = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    worker = _hybrid("worker", str(path), "--storage", storage, "--quiet", cwd=tmp_path)
    stopped = _inside_a_trial(worker, name, load)
    token = optuna.load_study(study_name=name, storage=load).user_attrs["checkpoint_token"]
    checkpoint = tmp_path / f"{name}.checkpoints" / f"{name}-{token}-trial-{stopped.number}.pt"
    deadline = time.time() + 60
    while not checkpoint.is_file():  # saved 0.2 s of training in
        assert time.time() < deadline and worker.poll() is None
        time.sleep(0.1)
    os.killpg(worker.pid, signal.SIGINT)
    worker.communicate(timeout=60)
    saved_step = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < saved_step < 400

    _run("worker", str(path), "--storage", storage, "--quiet", cwd=tmp_path)
    study = optuna.load_study(study_name=name, storage=load)
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == stopped.number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["lineage"] == stopped.number
    runs = {int(r.data.tags["hybrid.study.trial"]): r for r in _children(tmp_path, study)}
    assert runs[retry.number].data.tags["resumed_from_checkpoint"] == "true"
    assert not checkpoint.exists()
    space = load_space(path)
    plan = space.plan(retry.params)
    whole = train(plan.model, load_data(space), plan.train, device="cpu", progress=False)
    assert retry.user_attrs["metrics"]["val_loss"] == pytest.approx(
        whole.metrics["val_loss"], rel=1e-6
    )


def test_a_restarted_search_says_it_waits_for_its_dead_trial(tmp_path, capsys):
    """A trial left running by a crashed process holds the last slot: the restarted search
    says it waits, then fails it after the grace period and finishes."""
    from hybrid.search.space import load_space
    from hybrid.search.study import open_storage, run_search

    space = load_space(_space(tmp_path, "restarted", steps=2, n_trials=1))
    storage = f"journal:{tmp_path / 'study.log'}"
    dead = optuna.create_study(
        storage=open_storage(storage), study_name="restarted", directions=space.directions
    )
    dead.ask()  # running, and nobody beats its heartbeat
    outcome = run_search(space, storage=storage, device="cpu", progress=False)
    assert "waiting for 1 trial(s) running in other workers" in capsys.readouterr().out
    states = [t.state for t in outcome.study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 1


def test_sqlite_is_refused_for_several_workers(tmp_path):
    path = _space(tmp_path, "lite", steps=5, n_trials=2)
    process = _hybrid(
        "search",
        str(path),
        "--workers",
        "2",
        "--storage",
        f"sqlite:///{tmp_path / 'optuna.db'}",
        cwd=tmp_path,
    )
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "SQLite allows one writer" in out and "postgresql://" in out
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_init_claims_no_latency_device_and_a_worker_needs_the_study_store(tmp_path):
    """`--init` (on a login node, say) measures nothing, so it does not fix the study's
    latency device: its first trial does. A worker pointed at another MLflow store than
    the study's is refused in one line."""
    from hybrid.search.space import load_space
    from hybrid.search.study import initialise_study, join_study

    latency = {"metric": "decode_latency_ms", "context": 16}
    path = _space(tmp_path, "login", 2, 1, [{"metric": "val_perplexity"}, latency])
    space, storage = load_space(path), f"journal:{tmp_path / 'study.log'}"
    study, _ = initialise_study(space, storage, None)
    assert "latency_device" not in study.user_attrs
    with pytest.raises(ValueError, match="pass the --tracking-uri it was created with"):
        join_study(space, storage, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    joined, _ = join_study(space, storage, None)
    assert joined.study_name == "login"


@pytest.mark.parametrize("latency", [False, True], ids=["no-latency", "latency"])
def test_a_trial_failed_under_a_live_worker_is_dropped_not_crashed(tmp_path, capsys, monkeypatch,
                                                                   latency):  # fmt: skip
    """A worker stalled past the grace period finds its trial failed (and queued again) by
    another when it finishes training (or measuring latencies): it says so, drops the
    result, keeps the checkpoint its retry resumes, and goes on."""
    from hybrid.search import objectives
    from hybrid.search.heartbeat import fail_stale_trials
    from hybrid.search.space import load_space
    from hybrid.search.study import run_search

    real, stalled = objectives.train, []

    def train(*args, **kwargs):
        out = real(*args, **kwargs)
        study = optuna.load_study(study_name="stalled", storage=storage_)
        if not stalled:  # meanwhile another worker saw no heartbeat for too long
            stalled.extend(fail_stale_trials(study, -1.0))
        return out

    monkeypatch.setattr(objectives, "train", train)
    storage = f"journal:{tmp_path / 'study.log'}"
    from hybrid.search.study import open_storage

    storage_ = open_storage(storage)
    extra = [{"metric": "decode_latency_ms", "context": 16}] if latency else [{"metric": "params"}]
    space = load_space(_space(tmp_path, "stalled", 2, 2, [{"metric": "val_perplexity"}, *extra],
                              search={"checkpoint_interval": 1e-3}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    outcome = run_search(space, storage=storage, device="cpu", progress=False)
    assert "finished here after another worker had failed it" in capsys.readouterr().out
    lost = outcome.study.trials[stalled[0]]
    assert lost.state == TrialState.FAIL and "worker lost" in lost.user_attrs["fail_reason"]
    assert "metrics" not in lost.user_attrs
    retry = [t for t in outcome.study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert len(outcome.study.get_trials(states=(TrialState.COMPLETE,))) == 2
    runs = {int(r.data.tags["hybrid.study.trial"]): r for r in _children(tmp_path, outcome.study)}
    assert runs[retry[0].number].data.tags["resumed_from_checkpoint"] == "true"
    assert not list((tmp_path / "stalled.checkpoints").glob("*.pt"))  # done: all deleted
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_a_lost_trial_whose_retry_has_finished_leaves_no_checkpoint(tmp_path, capsys, monkeypatch):
    """The stalled worker's trial goes on training (and saving its checkpoint) after its retry
    finished elsewhere and deleted the lineage's file: the file it saved last is deleted
    too, not left for nothing to resume."""
    from hybrid.search import objectives
    from hybrid.search.heartbeat import fail_stale_trials
    from hybrid.search.space import load_space
    from hybrid.search.study import open_storage, run_search

    real, stalled = objectives.train, []

    def train(*args, **kwargs):
        out = real(*args, **kwargs)  # saves its final checkpoint
        study = optuna.load_study(study_name="late", storage=storage_)
        if not stalled:
            stalled.extend(fail_stale_trials(study, -1.0))
            retry = study.ask()  # run and finished by another worker meanwhile
            assert retry.user_attrs["retry_of"] == stalled[0]
            space.suggest(retry)
            study.tell(retry, [3.0, 1000.0])
        return out

    monkeypatch.setattr(objectives, "train", train)
    storage = f"journal:{tmp_path / 'study.log'}"
    storage_ = open_storage(storage)
    space = load_space(_space(tmp_path, "late", 2, 2,
                              [{"metric": "val_perplexity"}, {"metric": "params"}],
                              search={"checkpoint_interval": 1e-3}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    outcome = run_search(space, storage=storage, device="cpu", progress=False)
    assert "dropped (its retry has run" in capsys.readouterr().out
    assert outcome.study.trials[stalled[0]].state == TrialState.FAIL
    assert len(outcome.study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert not list((tmp_path / "late.checkpoints").glob("*.pt"))


def test_a_lost_trial_counts_its_retry_as_coming_until_it_has_none_left(tmp_path):
    """`fail_stale_trials` fails a trial, then enqueues its retry: a lost trial that looks in
    between sees no retry yet and must not take the checkpoint its retry will resume."""
    from hybrid.search.heartbeat import MAX_RETRIES, lineage_pending, requeue

    study = optuna.create_study()
    first = study.ask()
    study.tell(first, state=TrialState.FAIL)
    assert lineage_pending(study, first)  # failed, its retry not queued yet
    assert requeue(study, first) and lineage_pending(study, first)  # queued
    retry = study.ask()
    assert retry.user_attrs["lineage"] == first.number and lineage_pending(study, first)
    study.tell(retry, 1.0)
    assert not lineage_pending(study, first)  # its retry has run
    last = study.ask()  # a lineage's last try, lost: nothing will resume its checkpoint
    last.set_user_attr("retries", MAX_RETRIES)
    study.tell(last, state=TrialState.FAIL)
    assert not lineage_pending(study, study.trials[last.number])


class _FailingTracker:
    """An MLflow tracker whose server went away: every write after `start_trial` raises
    (`start_trial` too when `at_start`)."""

    def __init__(self, at_start: bool):
        self.at_start, self.lost, self.writes = at_start, [], 0

    def start_trial(self, *args):
        if self.at_start:
            raise ConnectionError("tracking server unreachable")
        return "run"

    def log_curve_point(self, *args):
        self.writes += 1
        raise ConnectionError("tracking server unreachable")

    finish_trial = log_curve_point

    def fail_lost_trial(self, trial, grace):
        self.lost.append(trial.number)


def test_a_tracking_outage_costs_the_record_not_the_trial(tmp_path, capsys):
    from hybrid.search.objectives import TrialRunner
    from hybrid.search.space import load_space
    from hybrid.search.study import load_data

    space = load_space(_space(tmp_path, "outage", steps=3, n_trials=2))
    study = optuna.create_study(directions=space.directions)
    runner = TrialRunner(space, load_data(space), torch.device("cpu"), _FailingTracker(False))
    trial = study.ask()
    values = runner(trial)
    study.tell(trial, values)
    assert study.trials[0].state == TrialState.COMPLETE
    assert study.trials[0].user_attrs["mlflow_incomplete"] is True
    said = capsys.readouterr().out
    assert said.count("its MLflow record is incomplete") == 1  # once, not per curve point
    # after a failed write only the run's end is tried: each can block for minutes
    assert runner.tracker.writes == 2
    runner = TrialRunner(space, load_data(space), torch.device("cpu"), _FailingTracker(True))
    trial = study.ask()
    with pytest.raises(ConnectionError):
        runner(trial)
    assert trial.user_attrs["fail_reason"] == "ConnectionError: tracking server unreachable"


def test_a_worker_waiting_on_a_dead_twin_closes_its_mlflow_run(tmp_path):
    """A trial of the same architecture running elsewhere is waited for; if its worker died,
    the waiting worker fails it and closes its MLflow child too."""
    from hybrid.search.objectives import TrialRunner
    from hybrid.search.space import load_space
    from hybrid.search.study import load_data

    space = load_space(_space(tmp_path, "twin", steps=3, n_trials=2))
    study = optuna.create_study(directions=space.directions)
    dead = study.ask()
    for key, value in {"arch_key": "same", "feasible": True, "heartbeat_at": 0.0}.items():
        dead.set_user_attr(key, value)
    tracker = _FailingTracker(False)
    runner = TrialRunner(space, load_data(space), torch.device("cpu"), tracker)
    assert runner._same_architecture(study.ask(), "same") is None
    assert tracker.lost == [dead.number] and study.trials[0].state == TrialState.FAIL


def test_a_stale_checkpoint_of_another_run_is_replaced_not_fatal(tmp_path, capsys):
    """A file at a trial's checkpoint path from another run (a study recreated under the
    name, say) is not resumed: the trial says so and trains from the start."""
    from hybrid.search.objectives import TrialRunner
    from hybrid.search.space import load_space
    from hybrid.search.study import initialise_study, load_data
    from hybrid.train import TrainConfig, train

    space = load_space(_space(tmp_path, "stale", steps=3, n_trials=1, ratios=[0.0]))
    study, tracker = initialise_study(space, f"journal:{tmp_path / 'study.log'}", None)
    runner = TrialRunner(space, load_data(space), torch.device("cpu"), tracker)
    trial = study.ask()
    path = runner.checkpoint_path(trial)
    assert "stale" in path.name and study.user_attrs["checkpoint_token"] in path.name
    plan = space.plan(space.seed_params("M-M-M-"))
    train(plan.model, load_data(space), TrainConfig(steps=2, batch_size=2, seq_len=32,
          eval_tokens=64), device="cpu", checkpoint=path, progress=False)  # fmt: skip
    runner(trial)
    assert "belongs to a different run" in capsys.readouterr().out
    replaced = torch.load(path, weights_only=False)  # now this trial's finished run
    assert replaced["done"] and replaced["step"] == 3
