"""The Optuna side of a search: storage, sampler, seed designs, the trial loop, and the front
recomputed (ranks, figures, hypervolume) after every trial.

Re-running the same command resumes the study: `n_trials` counts completed trials, seed
designs are enqueued once, and the MLflow parent run is found again through the study.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from hybrid.data import CorpusSpec
from hybrid.search.figures import pareto_html, pareto_png
from hybrid.search.latency import device_name
from hybrid.search.objectives import TrialRunner
from hybrid.search.pareto import hypervolume, pareto_ranks, to_minimisation
from hybrid.search.space import SearchSpace, vocab_for
from hybrid.search.tracking import StudyTracker
from hybrid.token_cache import prepare_data

STORAGE_SCHEMES = ("journal:PATH", "sqlite:///PATH", "postgresql://...")
LATENCY_METRICS = ("prefill_latency_ms", "decode_latency_ms", "peak_memory_bytes")


def default_storage(space: SearchSpace) -> str:
    return space.spec.search.storage or f"journal:./{space.name}.optuna.log"


def open_storage(url: str) -> Any:
    """`journal:PATH` (file journal, default), or an RDB URL (`sqlite:///`, `postgresql://`)."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if url.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql")):
        return url
    raise ValueError(f"search.storage={url!r} is invalid; allowed: {', '.join(STORAGE_SCHEMES)}")


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    seed, kind = space.spec.seed, space.spec.search.sampler
    if kind == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=min(10, max(4, _target(space) // 3))
        )
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=min(50, max(4, _target(space) // 4))
        )
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _target(space: SearchSpace) -> int:
    return space.spec.search.n_trials or 10**9


def point_label(params: dict[str, Any]) -> str:
    """The sampled values that the pattern does not already show, compactly."""
    parts = []
    for path, value in params.items():
        if path.startswith("model.layout."):
            continue
        name = path.rsplit(".", 1)[-1]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def reference_point(space: SearchSpace, first: list[float]) -> list[float]:
    """A fixed hypervolume reference, in each objective's units: the uniform predictor for
    validation metrics, 1.1x the space's largest static metric, 10x the first measured
    latency; 0 for maximised objectives (every metric here is positive)."""
    vocab = vocab_for(space.spec.data.tokenizer)
    uniform = {"val_perplexity": vocab, "val_loss": math.log(vocab), "val_bpb": math.log2(vocab)}
    out = []
    for metric, direction, value in zip(space.metric_names, space.directions, first, strict=True):
        if direction == "maximize":
            out.append(0.0)
        elif metric in uniform:
            out.append(float(uniform[metric]))
        elif metric in space.static_bounds:
            out.append(1.1 * space.static_bounds[metric])
        else:
            out.append(10.0 * value)
    return out


@dataclass
class Front:
    """Feasible completed trials with their ranks; rank 0 is the Pareto set."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    hypervolume: float = 0.0

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["pareto_rank"] == 0]


def compute_front(study: optuna.Study, space: SearchSpace) -> Front:
    metrics, directions = space.metric_names, space.directions
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("feasible", True)
        and "duplicate_of" not in t.user_attrs  # each architecture once
        and all(math.isfinite(v) for v in t.values)
    ]
    points = [to_minimisation(t.values, directions) for t in trials]
    ranks = pareto_ranks(points)
    rows = []
    for t, rank in zip(trials, ranks, strict=True):
        row = {
            "trial": t.number,
            "pattern": t.user_attrs.get("pattern", ""),
            "pareto_rank": rank,
            "params": int(t.user_attrs.get("metrics", {}).get("params", 0)),
        }
        row["point"] = point_label(t.params)
        row.update(dict(zip(metrics, t.values, strict=True)))
        row.update({k: v for k, v in t.params.items()})
        rows.append(row)
    rows.sort(key=lambda r: (r["pareto_rank"], r[metrics[0]]))
    reference = study.user_attrs.get("hv_reference")
    if reference is None and points:
        given = space.spec.search.hv_reference or reference_point(space, trials[0].values)
        reference = list(to_minimisation(given, directions))
        study.set_user_attr("hv_reference", reference)  # fixed: the hypervolume only grows
    volume = hypervolume(points, reference) if points else 0.0
    return Front(rows, volume)


class FrontUpdater:
    """After each trial: re-rank, re-tag the children whose rank changed, log the figures,
    `pareto.csv` and the hypervolume on the parent."""

    def __init__(
        self,
        space: SearchSpace,
        tracker: StudyTracker | None,
        on_trial: Callable[[optuna.trial.FrozenTrial, Front], None] | None = None,
    ):
        self.space, self.tracker, self.on_trial = space, tracker, on_trial
        self.tagged: dict[str, str] = {}

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        front = compute_front(study, self.space)
        if self.tracker is not None:
            self._tag(study, front)
            if front.rows:
                title = (
                    f"{self.space.name}: {len(front.pareto)} on the front, "
                    f"{len(front.rows)} feasible trials"
                )
                args = (front.rows, self.space.metric_names, self.space.directions, title)
                self.tracker.log_front(
                    front.rows,
                    front.hypervolume,
                    trial.number,
                    {"pareto.png": pareto_png(*args), "pareto.html": pareto_html(*args)},
                )
        if self.on_trial is not None:
            self.on_trial(trial, front)

    def _tag(self, study: optuna.Study, front: Front) -> None:
        ranks = {r["trial"]: r["pareto_rank"] for r in front.rows}
        for t in study.get_trials(deepcopy=False):
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id is None or t.state != TrialState.COMPLETE:
                continue
            rank = ranks.get(t.user_attrs.get("duplicate_of", t.number))
            label = str(rank) if rank is not None else "infeasible"
            if self.tagged.get(run_id) != label:
                self.tracker.set_trial_tags(
                    run_id, {"pareto_rank": label, "is_pareto": str(rank == 0).lower()}
                )
                self.tagged[run_id] = label


def _check_resume(study: optuna.Study, space: SearchSpace, device: torch.device) -> None:
    """Refuse to continue a study with other objectives, or latencies from another device."""
    saved = study.user_attrs.get("metrics")
    if saved is not None and saved != space.metric_names:
        raise ValueError(
            f"study {study.study_name!r} optimises {saved}, the file asks for "
            f"{space.metric_names}: use another search.study_name"
        )
    if saved is None:
        study.set_user_attr("metrics", space.metric_names)
    if any(m in LATENCY_METRICS for m in space.metric_names):
        here, recorded = device_name(device), study.user_attrs.get("latency_device")
        if recorded is not None and recorded != here:
            raise ValueError(
                f"study {study.study_name!r} holds latencies measured on "
                f"{recorded!r}; this worker is on {here!r}: latencies of two "
                "devices never share a front (use another search.study_name)"
            )
        study.set_user_attr("latency_device", here)


@dataclass
class SearchOutcome:
    study: optuna.Study
    front: Front
    parent_run_id: str
    experiment_id: str
    trials_run: int


def run_search(
    space: SearchSpace,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Run (or resume) the study until it has `n_trials` completed trials or times out."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = space.spec
    data = prepare_data(
        CorpusSpec(
            spec.data.corpus,
            text_field=spec.data.text_field,
            hub_config=spec.data.hub_config,
            hub_split=spec.data.hub_split,
            streaming=spec.data.streaming,
            max_documents=spec.data.max_documents,
            val_fraction=spec.data.val_fraction,
        ),
        spec.data.tokenizer,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = spec.search.study_name or space.name
    study = optuna.create_study(
        storage=open_storage(storage or default_storage(space)),
        study_name=study_name,
        directions=space.directions,
        sampler=make_sampler(space),
        load_if_exists=True,
    )
    _check_resume(study, space, device)
    tracker = StudyTracker.open(
        space,
        study_name,
        tracking_uri or spec.tracking.uri,
        study.user_attrs.get("mlflow_parent_run_id"),
    )
    study.set_user_attr("mlflow_parent_run_id", tracker.parent_id)
    if not study.user_attrs.get("seeded"):
        for design in spec.search.seed_designs:
            study.enqueue_trial(space.seed_params(design), skip_if_exists=True)
        study.set_user_attr("seeded", True)

    target = n_trials or spec.search.n_trials
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(0, target - completed) if target else None
    bar = tqdm(
        total=remaining,
        desc=f"search {study_name}",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )
    failures = {"n": 0}

    def report(trial: optuna.trial.FrozenTrial, front: Front) -> None:
        if trial.state == TrialState.COMPLETE:
            bar.update(1)
        else:
            failures["n"] += 1
            tqdm.write(f"trial {trial.number} failed: {trial.user_attrs.get('fail_reason')}")
        bar.set_postfix(front=len(front.pareto), hv=f"{front.hypervolume:.4g}", refresh=False)

    def stop_when_done(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if (target and done >= target) or failures["n"] >= max(5, 2 * (remaining or 10)):
            study.stop()  # the failure cap keeps a broken set-up from looping forever

    runner = TrialRunner(space, data, device, tracker)
    updater = FrontUpdater(space, tracker, report)
    before = len(study.trials)
    status = "KILLED"
    try:
        if remaining != 0:
            study.optimize(
                runner,
                timeout=spec.search.timeout,
                catch=(Exception,),
                callbacks=[updater, stop_when_done],
            )
        status = "FINISHED"
    finally:
        bar.close()
        tracker.finish_study(status)
    return SearchOutcome(
        study,
        compute_front(study, space),
        tracker.parent_id,
        tracker.experiment_id,
        len(study.trials) - before,
    )
