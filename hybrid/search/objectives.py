"""One trial: the point's plan, its constraints, then either the result of an earlier trial
of the same architecture, or build -> train -> evaluate -> measure; memory is freed after.

Infeasible points are not trained: their constraint values tell the sampler why, their
static metrics (params, state bytes, FLOPs) are exact and their trained or measured metrics
are +inf, and they never enter the front. A trial that raises (out of memory, divergence,
anything) is recorded as failed, with its reason, on the trial and on its MLflow run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from hybrid.model import HybridLM
from hybrid.search.heartbeat import fail_stale_trials, lineage_of, lineage_pending
from hybrid.search.latency import LatencyRequest, StudyLatencyCache, device_name, measure
from hybrid.search.space import SearchSpace, TrialPlan
from hybrid.search.tracking import StudyTracker
from hybrid.token_cache import TokenData
from hybrid.train import CheckpointMismatch, train

CHECKPOINT_TOKEN = "checkpoint_token"  # study attribute naming its trials' checkpoint files
WAIT_SECONDS = 2.0  # poll period while another worker trains the same architecture
# peak memory is measured during a decode run at the objective's batch and context
LATENCY_KINDS = {
    "prefill_latency_ms": "prefill",
    "decode_latency_ms": "decode",
    "peak_memory_bytes": "decode",
}


def static_metrics(space: SearchSpace, plan: TrialPlan) -> dict[str, float]:
    """Exact figures of the architecture, with no weights allocated."""
    model = HybridLM(plan.model, device="meta")
    c = space.spec.constraints
    out = {
        "params": model.num_params(),
        "flops_per_token": model.flops_per_token(space.spec.data.seq_len),
        "state_bytes_at_constraint": model.state_bytes(c.state_context),
    }
    for objective in space.spec.objectives:
        if objective.metric == "state_bytes":
            out["state_bytes"] = model.state_bytes(objective.context)
    return {k: float(v) for k, v in out.items()}


def constraint_values(space: SearchSpace, static: dict[str, float]) -> dict[str, float]:
    """Optuna's convention: feasible when every value is <= 0."""
    c = space.spec.constraints
    values = {}
    if c.max_params is not None:
        values["max_params"] = static["params"] - c.max_params
    if c.min_params is not None:
        values["min_params"] = c.min_params - static["params"]
    if c.max_state_bytes is not None:
        values["max_state_bytes"] = static["state_bytes_at_constraint"] - c.max_state_bytes
    return values


def failure_reason(error: BaseException) -> str:
    """A trial's fail_reason: the exception's type and message."""
    return f"{type(error).__name__}: {error}".removesuffix(": ")[:5000]


def still_running(trial: optuna.Trial) -> bool:
    """False when another worker has failed this trial for want of heartbeats (it runs
    again as a retry; this worker must not close it a second time)."""
    return trial.study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


class TrialLost(Exception):
    """This worker's trial was failed by another worker (no heartbeat) while it ran."""


class TrialRunner:
    """The Optuna objective of a study."""

    def __init__(
        self,
        space: SearchSpace,
        data: TokenData,
        device: torch.device,
        tracker: StudyTracker | None = None,
    ) -> None:
        self.space, self.data, self.device, self.tracker = space, data, device, tracker
        self._incomplete: set[int] = set()  # trials whose MLflow writes failed (said once)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        plan = self.space.suggest(trial)
        static = static_metrics(self.space, plan)
        constraints = constraint_values(self.space, static)
        for key, value in constraints.items():
            trial.set_constraint(key, value)
        feasible = all(v <= 0 for v in constraints.values())
        facts = {
            "pattern": plan.pattern,
            "arch_key": plan.key,
            "feasible": feasible,
            "device": device_name(self.device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all"),
            "model": plan.model.to_dict(),
        }
        for key, value in facts.items():
            trial.set_user_attr(key, value)
        run_id = None
        try:
            if self.tracker is not None:
                tags = {"feasible": feasible, "device": facts["device"]}
                if "retry_of" in trial.user_attrs:  # re-run of a trial whose worker died
                    tags["retry_of"] = trial.user_attrs["retry_of"]
                run_id = self.tracker.start_trial(trial.number, plan, tags)
                trial.set_user_attr("mlflow_run_id", run_id)
            metrics, tags = self._metrics(trial, plan, static, feasible, run_id)
            trial.set_user_attr("metrics", metrics)
        except BaseException as error:
            if not isinstance(error, KeyboardInterrupt) and not still_running(trial):
                # its retry may be resuming the checkpoint (keep it) or be done with it: then
                # the file this trial went on saving would stay behind
                pending = lineage_pending(trial.study, trial)
                if not pending:
                    self.drop_checkpoint(trial)
                raise TrialLost(
                    f"trial {trial.number} finished here after another worker had failed it "
                    "for want of heartbeats (was this worker stalled, or the storage "
                    "unreachable, for longer than search.grace_period?): its result is "
                    + (
                        "dropped and its retry runs it"
                        if pending
                        else "dropped (its retry has run, or it has none left)"
                    )
                ) from None
            reason = failure_reason(error)
            with contextlib.suppress(UpdateFinishedTrialError):  # closed under us meanwhile
                trial.set_user_attr("fail_reason", reason)
            if not isinstance(error, KeyboardInterrupt):  # failed for good: not run again
                self.drop_checkpoint(trial)
            if run_id is not None:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                self._record(trial, lambda: self.tracker.finish_trial(
                    run_id, {}, status, {"fail_reason": reason}), last=True)  # fmt: skip
            raise
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if run_id is not None:
            finish = partial(self.tracker.finish_trial, run_id, metrics, "FINISHED", tags)
            self._record(trial, finish, last=True)
        return [metrics[m] for m in self.space.metric_names]

    def trial_lost(self, trial: FrozenTrial, requeued: bool) -> None:
        """Another worker's trial failed for want of heartbeats (`fail_stale_trials`): close
        its MLflow run; its checkpoint goes unless its retry will resume it."""
        if self.tracker is not None:
            self.tracker.fail_lost_trial(trial, self.space.spec.search.grace_period)
        if not requeued:
            self.drop_checkpoint(trial)

    def drop_checkpoint(self, trial: optuna.Trial | FrozenTrial) -> None:
        """Delete the trial's lineage checkpoint (the study holds its result, or nothing will
        resume it)."""
        path = self.checkpoint_path(trial)
        if path is not None:
            path.unlink(missing_ok=True)

    def _record(
        self, trial: optuna.Trial, action: Callable[[], object], last: bool = False
    ) -> None:
        """An MLflow write of this trial: a failing tracking server costs the record, said
        once per trial, never the trial (the study holds its result). After one failure
        only the `last` write (the run's end) is tried: each can block for minutes while
        MLflow retries, and a trial with a time budget would train less."""
        if trial.number in self._incomplete and not last:
            return
        try:
            action()
        except Exception as error:
            if trial.number not in self._incomplete:
                self._incomplete.add(trial.number)
                with contextlib.suppress(UpdateFinishedTrialError):
                    trial.set_user_attr("mlflow_incomplete", True)
                tqdm.write(f"trial {trial.number}: its MLflow record is incomplete: "
                           f"{type(error).__name__}: {str(error)[:300]}")  # fmt: skip

    def _metrics(
        self,
        trial: optuna.Trial,
        plan: TrialPlan,
        static: dict[str, float],
        feasible: bool,
        run_id: str | None,
    ) -> tuple[dict[str, float], dict[str, str]]:
        earlier = self._same_architecture(trial, plan.key)
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            return dict(earlier.user_attrs["metrics"]), {"duplicate_of": str(earlier.number)}
        if not feasible:
            measured = {m: math.inf for m in self.space.metric_names if m not in static}
            return {**static, **measured}, {"skipped": "infeasible: not trained"}
        checkpoint = self.checkpoint_path(trial)
        resumed = checkpoint is not None and checkpoint.is_file()
        logged: set[int] = set()  # curve steps logged while training

        def log_point(event: str, values: dict[str, float]) -> None:
            if event == "train" and run_id is not None:
                logged.add(int(values["step"]))
                self._record(trial, lambda: self.tracker.log_curve_point(run_id, values))

        run = partial(train, plan.model, self.data, plan.train, device=self.device,
                      callbacks=[log_point], checkpoint=checkpoint, progress=False,
                      checkpoint_interval_s=self.space.spec.search.checkpoint_interval)  # fmt: skip
        try:
            result = run()
        except CheckpointMismatch as stale:  # not this lineage's run: start afresh
            tqdm.write(f"trial {trial.number}: {stale}; training from the start")
            checkpoint.unlink(missing_ok=True)
            resumed = False
            result = run()
        for point in result.curve:  # a resumed run's curve before its checkpoint
            if int(point["step"]) not in logged:
                log_point("train", point)
        metrics = {**static, **result.metrics}
        del result
        metrics.update(self._latencies(trial, plan))
        return metrics, {"resumed_from_checkpoint": "true"} if resumed else {}

    def checkpoint_path(self, trial: optuna.Trial) -> Path | None:
        """Where a trial's training saves itself every `search.checkpoint_interval` seconds:
        one file per lineage (a retry resumes its lost original's run), under
        `search.checkpoint_dir`."""
        search = self.space.spec.search
        if search.checkpoint_interval is None:
            return None
        study = trial.study
        folder = Path(search.checkpoint_dir or f"{study.study_name}.checkpoints")
        # the study's token: a study recreated under the name, or another in a shared
        # directory, never meets these files
        token = study.user_attrs.get(CHECKPOINT_TOKEN, "")
        lineage = lineage_of(trial)
        return folder / f"{study.study_name}-{token}-trial-{lineage}.pt"

    def _latencies(self, trial: optuna.Trial, plan: TrialPlan) -> dict[str, float]:
        """The latency and memory objectives, through the study's latency cache."""
        out: dict[str, float] = {}
        cache = StudyLatencyCache(trial.study)
        for o in self.space.spec.objectives:
            if o.metric not in LATENCY_KINDS:
                continue
            kind = LATENCY_KINDS[o.metric]
            length = o.prompt_len if kind == "prefill" else o.context
            m = measure(
                plan.model,
                LatencyRequest(kind, o.batch, length, o.dtype),
                self.device,
                cache=cache,
                max_spread=o.max_spread,
            )
            if o.metric == "peak_memory_bytes":
                out[o.metric] = float(m.peak_memory_bytes or 0)
            else:
                out[o.metric], out[f"{o.metric}_iqr"] = m.median_ms, m.iqr_ms
                out[f"{o.metric}_spread"] = m.spread
                if m.spread > o.max_spread:  # kept (the rounds ran out), but said
                    tqdm.write(
                        f"trial {trial.number}: {o.metric} spread {m.spread:.1%} stayed above "
                        f"max_spread {o.max_spread:.1%} over {m.rounds} rounds (is the device "
                        f"busy?); recorded as measured, with {o.metric}_spread"
                    )
            trial.set_user_attr(f"{o.metric}_record", asdict(m))
        return out

    def _same_architecture(self, trial: optuna.Trial, key: str) -> FrozenTrial | None:
        """A finished, trained trial of the same architecture and recipe, if any. One still
        running in another worker is waited for, so no architecture is trained twice at once
        (its worker's heartbeat ends the wait if that worker dies)."""
        grace = self.space.spec.search.grace_period
        while True:
            running = False
            for other in trial.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)
            ):
                attrs = other.user_attrs
                if (
                    other.number == trial.number
                    or attrs.get("arch_key") != key
                    or ("duplicate_of" in attrs or not attrs.get("feasible", True))
                ):
                    continue
                if other.state == TrialState.COMPLETE and "metrics" in attrs:
                    return other
                running |= other.state == TrialState.RUNNING and other.number < trial.number
            if not running:
                return None
            time.sleep(WAIT_SECONDS)
            fail_stale_trials(trial.study, grace, on_failed=self.trial_lost)
