"""Liveness of running trials, for any Optuna storage (journal files included, which Optuna's
own heartbeat does not cover).

A worker's `Heartbeat` stamps its running trial every `interval` seconds. Any worker, before
it starts a trial, runs `fail_stale_trials`: a RUNNING trial whose stamp is older than
`grace` seconds belonged to a worker that died; it is marked FAIL (by exactly one worker:
the storage refuses the second transition) and re-enqueued once with the same parameters,
the new trial recording `retry_of`. Clocks of the hosts are assumed to agree to well within
`grace` (NTP).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

BEAT = "heartbeat_at"
MAX_RETRIES = 1


class Heartbeat:
    """Stamp `trial_id` in `storage` every `interval` seconds while the block runs."""

    def __init__(
        self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float
    ) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="trial-heartbeat")

    def _beat(self) -> None:
        self.storage.set_trial_user_attr(self.trial_id, BEAT, time.time())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # the trial finished under us, or the store blinked: next beat
                continue

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def lost_reason(grace: float) -> str:
    """The fail_reason of a trial whose worker stopped beating."""
    return f"worker lost: no heartbeat for over {grace:g} s"


def retries_of(trial: FrozenTrial | optuna.Trial) -> int:
    return int(trial.user_attrs.get("retries", 0))


def lineage_of(trial: FrozenTrial | optuna.Trial) -> int:
    """The number of the first trial of this trial's retries (it names their checkpoint)."""
    return int(trial.user_attrs.get("lineage", trial.number))


def lineage_pending(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether a later trial of this (lost) trial's lineage may still resume the lineage's
    checkpoint: one queued or running, or its retry about to be queued (`fail_stale_trials`
    fails a trial, then enqueues its retry) while it has retries left."""
    lineage = lineage_of(trial)
    others = [
        t
        for t in study.get_trials(deepcopy=False)
        if lineage_of(t) == lineage and t.number != trial.number
    ]
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in others):
        return True
    return retries_of(trial) < MAX_RETRIES and not any(t.number > trial.number for t in others)


def requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> bool:
    """Enqueue a failed trial's parameters again, at most MAX_RETRIES times a lineage (the
    first trial's number: a retry resumes its training checkpoint); False when the lineage
    has used its retries (nothing will resume its checkpoint)."""
    if retries_of(trial) >= MAX_RETRIES:
        return False
    attrs = {
        "retry_of": trial.number,
        "retries": retries_of(trial) + 1,
        "lineage": lineage_of(trial),
    }
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)
    return True


def fail_stale_trials(
    study: optuna.Study,
    grace: float,
    on_failed: Callable[[FrozenTrial, bool], None] | None = None,
) -> list[int]:
    """Fail (and re-enqueue once) every RUNNING trial silent for more than `grace` seconds,
    calling `on_failed(trial, requeued)` for each; returns the numbers of the trials this
    call failed."""
    now, failed = time.time(), []
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        stamp = trial.user_attrs.get(BEAT)
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        if now - (stamp if stamp is not None else started) <= grace:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", lost_reason(grace))
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except Exception:  # another worker failed it first
            continue
        failed.append(trial.number)
        again = requeue(study, trial)
        if on_failed is not None:
            on_failed(trial, again)
    return failed
