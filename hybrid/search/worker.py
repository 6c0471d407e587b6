"""The trial loop every worker runs, and `hybrid search --workers N` launching one worker
process per GPU on this host.

Each worker, before every trial, fails the trials of dead workers (heartbeats), then claims a
trial only while completed + running trials are short of the budget; the storage numbers
trials atomically, so when two workers race for the last slot the later number gives its
trial back. A study therefore ends with exactly `n_trials` completed trials however many
workers share it, and a crashed worker only delays it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from hybrid.devices import visible_devices_for
from hybrid.search.heartbeat import Heartbeat, fail_stale_trials, requeue
from hybrid.search.objectives import TrialLost, TrialRunner, failure_reason, still_running
from hybrid.search.space import SearchSpace
from hybrid.search.stores import local_file
from hybrid.search.study import (
    Front,
    FrontUpdater,
    check_shared_storage,
    claim_latency_device,
    initialise_study,
    storage_url,
)
from hybrid.search.tracking import StudyTracker

POLL_SECONDS = 2.0


@contextlib.contextmanager
def front_lock(storage: str, study_name: str) -> Iterator[None]:
    """One writer at a time for the parent run's figures: a file lock beside a journal, an
    advisory lock in PostgreSQL (keyed by the study's name, which every worker spells alike
    where the database URL may differ by host alias or driver); SQLite has one process
    anyway."""
    if storage.startswith("journal:"):
        path = Path(f"{local_file(storage)}.front.lock")
        with path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif storage.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(study_name.encode()) & 0x7FFFFFFF
        engine = sqlalchemy.create_engine(storage_url(storage), poolclass=sqlalchemy.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        yield


def trial_counts(study: optuna.Study) -> tuple[int, int]:
    """(completed, running) trials of the study, from one read."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    return done, len(trials) - done


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """True when trials numbered before this one already fill the budget (a lost race)."""
    earlier = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if t.number < trial.number
    ]
    return len(earlier) >= target


def _give_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """Return a surplus trial: re-enqueue what was enqueued (a seed or a retry), then close
    it as PRUNED so no count includes it."""
    storage = study._storage
    fixed = storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed, user_attrs=dict(storage.get_trial(trial._trial_id).user_attrs))
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.PRUNED)


class TooManyFailures(RuntimeError):
    """A worker stopped because its trials kept failing (a bad recipe, not bad luck)."""


def work(
    space: SearchSpace,
    study: optuna.Study,
    tracker: StudyTracker,
    data: Any,
    device: torch.device,
    *,
    storage: str,
    target: int | None,
    progress: bool = True,
) -> int:
    """Run trials until the study holds `target` completed ones (or the timeout passes);
    returns how many trials this worker ran. Raises TooManyFailures (after updating the
    front) when max(5, 2·target) of its trials failed."""
    search = space.spec.search
    done, _ = trial_counts(study)
    bar = tqdm(
        total=max(0, target - done) if target else None,
        desc=f"search {study.study_name}",
        unit="trial",
        disable=not progress or (target is not None and done >= target),
        dynamic_ncols=True,
    )
    failures, ran, started, last_reason, said_waiting = 0, 0, time.time(), "", False
    max_failures = max(5, 2 * (target or 10))

    def report(trial: FrozenTrial, front: Front) -> None:
        nonlocal failures, last_reason
        if trial.state == TrialState.COMPLETE:
            bar.update(1)
        else:
            failures += 1
            last_reason = trial.user_attrs.get("fail_reason")
            tqdm.write(f"trial {trial.number} failed: {last_reason}")
        bar.set_postfix(front=len(front.pareto), hv=f"{front.hypervolume:.4g}", refresh=False)

    claimed = False
    runner = TrialRunner(space, data, device, tracker)
    updater = FrontUpdater(space, tracker, report)
    # the runner collects garbage after each trial, to free its model before emptying the
    # CUDA cache; frozen, the process's long-lived objects (torch, optuna, mlflow: ~300k+)
    # are not walked each time, which took 0.2-0.4 s a trial
    gc.collect()
    gc.freeze()
    try:
        while True:
            fail_stale_trials(study, search.grace_period, on_failed=runner.trial_lost)
            done, running = trial_counts(study)
            if (target and done >= target) or failures >= max_failures:
                break
            if search.timeout and time.time() - started > search.timeout:
                break
            if target and done + running >= target:
                if not said_waiting:
                    tqdm.write(
                        f"waiting for {running} trial(s) running in other workers to finish "
                        f"(one silent for {search.grace_period:g} s, search.grace_period, is "
                        "failed and run again)"
                    )
                    said_waiting = True
                time.sleep(POLL_SECONDS)  # the others may still fail: wait, then look again
                continue
            said_waiting = False
            if not claimed:  # the first trial this worker runs: its device's latencies
                with front_lock(storage, study.study_name):  # one claim when workers race
                    claim_latency_device(study, space, device)
                claimed = True
            trial = study.ask()
            if target and _surplus(study, trial, target):
                _give_back(study, trial)
                continue
            ran += 1
            try:
                with Heartbeat(study._storage, trial._trial_id, search.heartbeat_interval):
                    values = runner(trial)
            except TrialLost as taken:
                tqdm.write(str(taken))
                continue
            except Exception as error:
                if still_running(trial):
                    if "fail_reason" not in trial.user_attrs:  # raised before the runner's try
                        trial.set_user_attr("fail_reason", failure_reason(error))
                    study.tell(trial, state=TrialState.FAIL)
            except BaseException:  # Ctrl-C / SIGTERM: close the trial, then stop
                stored = study._storage.get_trial(trial._trial_id)
                if stored.state == TrialState.RUNNING and "metrics" in stored.user_attrs:
                    # stopped after its result was stored: keep it
                    study.tell(trial, [stored.user_attrs["metrics"][m] for m in space.metric_names])
                    runner.drop_checkpoint(trial)
                elif stored.state == TrialState.RUNNING:
                    study.tell(trial, state=TrialState.FAIL)
                    if not requeue(study, trial):  # a resumed search runs it again, as
                        runner.drop_checkpoint(trial)  # after a crash, from its checkpoint
                raise
            else:
                study.tell(trial, values)
                runner.drop_checkpoint(trial)  # the study holds the result now
            with front_lock(storage, study.study_name):
                updater(study, study._storage.get_trial(trial._trial_id))
        with front_lock(storage, study.study_name):
            updater.finish(study)
    finally:
        gc.unfreeze()  # frozen objects outliving the interpreter's teardown upset nanobind
        bar.close()
    if failures >= max_failures:
        raise TooManyFailures(
            f"stopped after {failures} failed trials in this worker (the last: {last_reason}); "
            "every trial's fail_reason is in the study and in its MLflow run"
        )
    return ran


def _terminate(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    deadline = time.time() + 60
    for p in processes:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def launch_workers(
    space_file: str,
    space: SearchSpace,
    *,
    workers: int,
    gpus: list[int] | None,
    storage: str,
    tracking_uri: str | None,
    target: int | None,
    device: str | None,
) -> tuple[optuna.Study, str]:
    """Initialise the study here, then run `workers` `hybrid worker` processes (one per GPU
    when `gpus` is given, pinned with CUDA_VISIBLE_DEVICES) behind one progress bar.
    Ctrl-C stops them all; their logs go to ./hybrid-workers/STUDY/. `device` is the
    --device the workers get (default: theirs)."""
    check_shared_storage(storage, f"{workers} workers")
    pins = [visible_devices_for(g) for g in gpus] if gpus is not None else None
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    if gpus is None:  # CPU workers share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    study, tracker = initialise_study(space, storage, tracking_uri)
    logs = Path("hybrid-workers") / study.study_name
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for i in range(workers):
        worker_env = dict(env)
        if pins is not None:
            worker_env["CUDA_VISIBLE_DEVICES"] = pins[i]
        command = [
            sys.executable,
            "-m",
            "hybrid.cli",
            "worker",
            space_file,
            "--storage",
            storage,
            "--tracking-uri",
            tracking_uri or space.spec.tracking.uri,
            "--quiet",
        ]
        if target:
            command += ["--trials", str(target)]
        if device:
            command += ["--device", device]
        log = (logs / f"worker-{i}.log").open("w")
        processes.append(
            subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env,
                start_new_session=True,
            )
        )
    done, _ = trial_counts(study)
    bar = tqdm(
        total=target,
        initial=done,
        desc=f"search {study.study_name} ({workers} workers)",
        unit="trial",
        dynamic_ncols=True,
    )
    status = "KILLED"
    try:
        while running_processes := [p for p in processes if p.poll() is None]:
            with contextlib.suppress(subprocess.TimeoutExpired):  # ends as the last one does
                running_processes[0].wait(timeout=POLL_SECONDS)
            done, running = trial_counts(study)
            bar.n = done
            bar.set_postfix(running=running, refresh=True)
        status = "FINISHED"
    finally:
        _terminate(processes)
        bar.close()
        tracker.finish_study(status)
    failed = [i for i, p in enumerate(processes) if p.returncode != 0]
    if failed:
        print(f"workers {failed} exited with an error: see {logs}/worker-N.log", file=sys.stderr)
    return study
