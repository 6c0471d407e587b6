"""The Optuna side of a search: storage, sampler, seed designs, the trial loop, and the front
recomputed (ranks, hypervolume; figures at most every `FIGURE_INTERVAL_S`) after every trial.

Re-running the same command resumes the study: `n_trials` counts completed trials, seed
designs are enqueued once, and the MLflow parent run is found again through the study.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from hybrid.data import CorpusSpec
from hybrid.devices import resolve_device
from hybrid.search.figures import pareto_html, pareto_png
from hybrid.search.latency import device_name
from hybrid.search.objectives import CHECKPOINT_TOKEN
from hybrid.search.pareto import hypervolume, pareto_ranks, to_minimisation
from hybrid.search.space import SearchSpace, vocab_for
from hybrid.search.stores import check_storage, check_tracking_uri, local_file
from hybrid.search.tracking import StudyTracker
from hybrid.token_cache import prepare_data

LATENCY_METRICS = ("prefill_latency_ms", "decode_latency_ms", "peak_memory_bytes")
FIGURE_INTERVAL_S = 10.0  # the Pareto figures are redrawn at most this often per worker
# what a trial's results depend on: a study resumes only with these sections unchanged, but
# for the train keys that say how the steps run, not what is trained (`TrainConfig.recipe`)
RECIPE_SECTIONS = ("model", "data", "train", "objectives", "constraints")
RESUMABLE_TRAIN_KEYS = ("cuda_graph", "deterministic")


def default_storage(space: SearchSpace) -> str:
    return space.spec.search.storage or f"journal:./{space.name}.optuna.log"


def storage_url(url: str) -> str:
    """The SQLAlchemy URL of an RDB storage (`sqlite:///`, `postgresql://`, ...)."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")  # psycopg 3
    return url


def open_storage(url: str) -> Any:
    """`journal:PATH` (file journal, default), or an RDB URL; a database that cannot be
    reached (or refuses the login) is one line, not SQLAlchemy's traceback."""
    try:
        check_storage(url)
    except ValueError as error:
        raise ValueError(f"search.storage: {error}") from None
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(local_file(url))))
    from sqlalchemy.exc import OperationalError

    try:
        return optuna.storages.RDBStorage(storage_url(url))
    except OperationalError as error:
        detail = str(error.orig or error).strip().splitlines()[0]
        raise ValueError(f"search.storage={url!r} cannot be opened: {detail}") from None


def check_tracking(uri: str) -> None:
    """`check_tracking_uri` for the file's tracking.uri or a --tracking-uri."""
    try:
        check_tracking_uri(uri)
    except ValueError as error:
        raise ValueError(f"tracking.uri (or --tracking-uri): {error}") from None


def check_shared_storage(storage: str, users: str) -> None:
    """Refuse SQLite where several processes will write the study (`users` says who)."""
    if storage.startswith("sqlite"):
        raise ValueError(
            f"search.storage={storage!r}: SQLite allows one writer at a time, so {users} "
            "would fail on locked writes; allowed: journal:PATH (one host, or a shared file "
            "system) or postgresql://... (any number of hosts)"
        )


def make_sampler(space: SearchSpace, worker: str = "") -> optuna.samplers.BaseSampler:
    """The YAML's sampler, seeded with `seed`; each worker of a shared study mixes its own
    identity into the seed, or every worker would propose the same points."""
    seed = space.spec.seed + (zlib.crc32(worker.encode()) if worker else 0)
    kind = space.spec.search.sampler
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
    """Feasible completed trials with their ranks; rank 0 is the Pareto set. `completed`
    counts every completed trial (duplicates and infeasible ones too)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    hypervolume: float = 0.0
    completed: int = 0

    @property
    def pareto(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["pareto_rank"] == 0]


def compute_front(study: optuna.Study, space: SearchSpace) -> Front:
    metrics, directions = space.metric_names, space.directions
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    trials = [
        t
        for t in completed
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
    return Front(rows, volume, len(completed))


class FrontUpdater:
    """After each completed trial: re-rank, re-tag the children whose rank changed, log
    `pareto.csv` and the hypervolume on the parent, and redraw the figures at most every
    `figure_interval_s` (drawing them took ~0.2 s, and a worker does it under the study-wide
    front lock, so a search of short trials spent a large share of its time there); `finish`
    draws the last front."""

    def __init__(
        self,
        space: SearchSpace,
        tracker: StudyTracker | None,
        on_trial: Callable[[optuna.trial.FrozenTrial, Front], None] | None = None,
        figure_interval_s: float = FIGURE_INTERVAL_S,
    ):
        self.space, self.tracker, self.on_trial = space, tracker, on_trial
        self.figure_interval_s = figure_interval_s
        self.tagged: dict[str, str] = {}
        self.drawn_at = -math.inf
        self.undrawn = False  # a trial came in whose front the figures do not show

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        front = compute_front(study, self.space)
        # a failed trial leaves the front as it was: logging it again would add a second
        # hypervolume point at the same step
        if self.tracker is not None and trial.state == TrialState.COMPLETE:
            self._tag(study, front)
            due = time.monotonic() - self.drawn_at >= self.figure_interval_s
            # the hypervolume's step counts completed trials: under the front lock it only
            # grows, where trial numbers arrive out of order from several workers
            self._log(front, front.completed, draw=due)
        if self.on_trial is not None:
            self.on_trial(trial, front)

    def finish(self, study: optuna.Study) -> None:
        """Draw the study's front as it stands if a trial came in since the last figures."""
        if self.tracker is not None and self.undrawn:
            self._log(compute_front(study, self.space), None, draw=True)

    def _log(self, front: Front, step: int | None, draw: bool) -> None:
        """The front's CSV (and figures if `draw`), and its hypervolume at `step` unless
        None (already logged there)."""
        if not front.rows:
            return
        figures = {}
        if draw:
            title = (
                f"{self.space.name}: {len(front.pareto)} on the front, "
                f"{len(front.rows)} feasible trials"
            )
            args = (front.rows, self.space.metric_names, self.space.directions, title)
            figures = {"pareto.png": pareto_png(*args), "pareto.html": pareto_html(*args)}
            self.drawn_at = time.monotonic()
        self.undrawn = not draw
        self.tracker.log_front(front.rows, front.hypervolume if step is not None else None,
                               step, figures)  # fmt: skip

    def _tag(self, study: optuna.Study, front: Front) -> None:
        ranks = {r["trial"]: r["pareto_rank"] for r in front.rows}
        for t in study.get_trials(deepcopy=False):
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id is None or t.state != TrialState.COMPLETE:
                continue
            # a reused trial carries its original's rank; only the original is the front's
            duplicate = "duplicate_of" in t.user_attrs
            rank = ranks.get(t.user_attrs.get("duplicate_of", t.number))
            label = str(rank) if rank is not None else "infeasible"
            if self.tagged.get(run_id) != label:
                on_front = rank == 0 and not duplicate
                self.tracker.set_trial_tags(
                    run_id, {"pareto_rank": label, "is_pareto": str(on_front).lower()}
                )
                self.tagged[run_id] = label


def _leaf_values(value: Any, path: str = "") -> dict[str, Any]:
    """{dotted path: value} of every leaf of nested dicts and lists."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {path: value}
    out: dict[str, Any] = {}
    for key, child in items:
        out |= _leaf_values(child, f"{path}.{key}" if path else str(key))
    return out


def _recipe(space: SearchSpace) -> dict[str, Any]:
    """The file's RECIPE_SECTIONS as JSON values (a study's user attribute)."""
    sections = {name: getattr(space.spec, name) for name in RECIPE_SECTIONS}
    recipe = {
        name: [o.model_dump(mode="json") for o in value]
        if isinstance(value, list)
        else value.model_dump(mode="json")
        for name, value in sections.items()
    }
    for key in RESUMABLE_TRAIN_KEYS:
        del recipe["train"][key]
    return recipe


def _check_resume(study: optuna.Study, space: SearchSpace) -> None:
    """Refuse to continue a study with other objectives, another model space, data, training
    recipe or constraints (its trials would share a front with the old ones)."""
    saved = study.user_attrs.get("metrics")
    if saved is not None and saved != space.metric_names:
        raise ValueError(
            f"study {study.study_name!r} optimises {saved}, the file asks for "
            f"{space.metric_names}: use another search.study_name"
        )
    if saved is None:
        study.set_user_attr("metrics", space.metric_names)
    recipe, recorded = _recipe(space), study.user_attrs.get("recipe")
    if recorded is not None and recorded != recipe:
        old, new = _leaf_values(recorded), _leaf_values(recipe)
        changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        shown = "; ".join(f"{k}: {old.get(k)!r} in the study, {new.get(k)!r} in the file"
                          for k in changed[:4])  # fmt: skip
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ValueError(
            f"study {study.study_name!r} was run with another recipe: {shown}{more}. Its "
            "trials would share a front with these: restore those values or use another "
            "search.study_name"
        )
    if recorded is None:
        study.set_user_attr("recipe", recipe)


def claim_latency_device(study: optuna.Study, space: SearchSpace, device: torch.device) -> None:
    """The latencies of a study come from one kind of device: the first process that runs a
    trial records its own (a CPU's with its thread count), and any other refuses to run
    one. `--init` and a resume with nothing left to run measure nothing, so they do not
    claim (a study set up on a login node would otherwise refuse its GPU workers)."""
    if not any(m in LATENCY_METRICS for m in space.metric_names):
        return
    here, recorded = device_name(device), study.user_attrs.get("latency_device")
    if recorded is None:
        study.set_user_attr("latency_device", here)
    elif recorded != here:
        hint = " (OMP_NUM_THREADS sets a CPU's)" if recorded.startswith("cpu") else ""
        raise ValueError(
            f"study {study.study_name!r} holds latencies measured on {recorded!r}; this "
            f"worker is on {here!r}: latencies of two devices never share a front. Run it "
            f"on the study's device{hint}, or use another search.study_name"
        )


@dataclass
class SearchOutcome:
    study: optuna.Study
    front: Front
    parent_run_id: str
    experiment_id: str
    trials_run: int


def load_data(space: SearchSpace) -> Any:
    """The corpus' token arrays (prepared before any trial, so a bad corpus, or a seq_len
    longer than one of its splits, fails first)."""
    spec = space.spec.data
    data = prepare_data(CorpusSpec.from_settings(spec), spec.tokenizer)
    for split, tokens in (("training", data.train), ("validation", data.val)):
        if len(tokens) <= spec.seq_len:
            raise ValueError(
                f"data.seq_len={spec.seq_len} is longer than the {split} split of "
                f"{spec.corpus!r} ({len(tokens)} tokens); allowed: data.seq_len < {len(tokens)}"
            )
    return data


def study_name_of(space: SearchSpace) -> str:
    return space.spec.search.study_name or space.name


def initialise_study(
    space: SearchSpace, storage: str, tracking_uri: str | None
) -> tuple[optuna.Study, StudyTracker]:
    """Create (or resume) the study, its MLflow parent run and its seed designs, once,
    before any worker starts: concurrent first-time set-up of one database is a known crash."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_tracking(tracking_uri or space.spec.tracking.uri)  # before the study is created
    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=study_name_of(space),
        directions=space.directions,
        sampler=make_sampler(space),
        load_if_exists=True,
    )
    _check_resume(study, space)
    tracker = StudyTracker.open(
        space,
        study.study_name,
        tracking_uri or space.spec.tracking.uri,
        study.user_attrs.get("mlflow_parent_run_id"),
    )
    study.set_user_attr("mlflow_parent_run_id", tracker.parent_id)
    if CHECKPOINT_TOKEN not in study.user_attrs:
        study.set_user_attr(CHECKPOINT_TOKEN, uuid.uuid4().hex[:12])
    if not study.user_attrs.get("seeded"):
        for design in space.spec.search.seed_designs:
            study.enqueue_trial(space.seed_params(design), skip_if_exists=True)
        study.set_user_attr("seeded", True)
    return study, tracker


def load_existing_study(
    space: SearchSpace,
    storage: str,
    remedy: str,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """The study of `space` in `storage`, or ValueError saying there is none and `remedy`
    (a local journal or SQLite file that does not exist is not created)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    missing = ValueError(f"study {study_name_of(space)!r} does not exist in {storage}: {remedy}")
    path = local_file(storage)
    if path is not None and not path.exists():
        raise missing
    try:
        return optuna.load_study(
            study_name=study_name_of(space), storage=open_storage(storage), sampler=sampler
        )
    except KeyError:
        raise missing from None


def join_study(
    space: SearchSpace, storage: str, tracking_uri: str | None
) -> tuple[optuna.Study, StudyTracker]:
    """Open a study that `initialise_study` created (a worker never creates one)."""
    check_tracking(tracking_uri or space.spec.tracking.uri)
    study = load_existing_study(
        space,
        storage,
        f"create it first with `hybrid search SPACE.yaml --storage {storage} --init`",
        sampler=make_sampler(space, f"{socket.gethostname()}:{os.getpid()}"),
    )
    _check_resume(study, space)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent is None:
        raise ValueError(
            f"study {study.study_name!r} has no MLflow parent run: run "
            "`hybrid search SPACE.yaml --init` against its storage first"
        )
    tracker = StudyTracker.open(
        space, study.study_name, tracking_uri or space.spec.tracking.uri, parent
    )
    return study, tracker


def run_search(
    space: SearchSpace,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SearchOutcome:
    """Run (or resume) the study in this process until it has `n_trials` completed trials
    or times out."""
    from hybrid.search.worker import TooManyFailures, work

    device = resolve_device(device)
    space.check_device(device)
    data = load_data(space)
    storage = storage or default_storage(space)
    study, tracker = initialise_study(space, storage, tracking_uri)
    before = len(study.trials)
    status = "KILLED"
    try:
        work(
            space,
            study,
            tracker,
            data,
            device,
            storage=storage,
            target=n_trials or space.spec.search.n_trials,
            progress=progress,
        )
        status = "FINISHED"
    except TooManyFailures:
        status = "FAILED"
        raise
    finally:
        tracker.finish_study(status)
    return SearchOutcome(
        study,
        compute_front(study, space),
        tracker.parent_id,
        tracker.experiment_id,
        len(study.trials) - before,
    )
