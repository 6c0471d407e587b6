"""MLflow records of a study: one parent run per study (the YAML, the settings, the Pareto
figures, `pareto.csv`, the `hypervolume` curve) and one child run per trial (sampled
parameters, pattern, parameter count, loss curve, objectives, device, versions).

Everything goes through an explicit `MlflowClient` and explicit run ids (never the
process-global active run), so several workers or an inherited `MLFLOW_RUN_ID` cannot cross
records. Children point at the parent through the `mlflow.parentRunId` tag, which is what the
UI nests them by.
"""

from __future__ import annotations

import csv
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial

from hybrid.search.heartbeat import lost_reason
from hybrid.search.latency import package_versions
from hybrid.search.space import SearchSpace, TrialPlan
from hybrid.search.stores import local_file

PARENT_TAG = "hybrid.study"
MAX_BATCH = 900  # MLflow accepts up to 1000 entries per log_batch


def local_artifact_root(tracking_uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store (MLflow's default is the working dir)."""
    if tracking_uri.startswith("sqlite:///"):
        db = local_file(tracking_uri).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _versions() -> dict[str, str]:
    """Package versions and the git commit, as run tags."""
    packages = ("hybrid-arch", "torch", "triton", "optuna", "mlflow")
    out = {f"version.{k}": v for k, v in package_versions(packages, absent="absent").items()}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    out["git_commit"] = commit
    return out


def find_parent_run(tracking_uri: str, study_name: str) -> tuple[str, str] | None:
    """(experiment id, run id) of the newest parent run of `study_name`, if any."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{PARENT_TAG}` = '{study_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return (runs[0].info.experiment_id, runs[0].info.run_id) if runs else None


class StudyTracker:
    """The MLflow side of one study; create with `open`, which finds or makes the parent."""

    def __init__(
        self, client: MlflowClient, experiment_id: str, parent_id: str, versions: dict[str, str]
    ) -> None:
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.versions = versions

    @classmethod
    def open(
        cls,
        space: SearchSpace,
        study_name: str,
        tracking_uri: str,
        existing_parent: str | None = None,
    ) -> StudyTracker:
        client = MlflowClient(tracking_uri=tracking_uri)
        name = space.spec.tracking.experiment or space.name
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(name, artifact_location=local_artifact_root(tracking_uri))
        )
        versions = _versions()  # one git call per process
        if existing_parent is None:
            run = client.create_run(
                experiment_id,
                run_name=f"study {study_name}",
                tags={PARENT_TAG: study_name, **versions},
            )
            tracker = cls(client, experiment_id, run.info.run_id, versions)
            tracker._log_study(space, study_name)
            return tracker
        try:
            client.get_run(existing_parent)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise  # the store is down, or failing: not a wrong URI
            raise ValueError(
                f"study {study_name!r} has its MLflow parent run {existing_parent} in another "
                f"store than {tracking_uri}: pass the --tracking-uri it was created with"
            ) from None
        client.update_run(existing_parent, status="RUNNING")  # resumed
        return cls(client, experiment_id, existing_parent, versions)

    def _log_study(self, space: SearchSpace, study_name: str) -> None:
        spec = space.spec
        params = {
            "study_name": study_name,
            "sampler": spec.search.sampler,
            "n_trials": spec.search.n_trials,
            "seed": spec.seed,
            "corpus": spec.data.corpus,
            "tokenizer": spec.data.tokenizer,
            "seq_len": spec.data.seq_len,
            "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives),
            "dimensions": ", ".join(space.dimensions) or "none",
            "constraints": spec.constraints.model_dump_json(exclude_none=True),
        }
        self.client.log_batch(
            self.parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )
        self.client.log_text(self.parent_id, space.text, "search_space.yaml")

    def start_trial(self, number: int, plan: TrialPlan, facts: dict[str, Any]) -> str:
        tags = {
            "mlflow.parentRunId": self.parent_id,
            PARENT_TAG + ".trial": str(number),
            "pattern": plan.pattern,
            "arch_key": plan.key,
            **self.versions,
            **{k: str(v) for k, v in facts.items()},
        }
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{number:03d} {plan.pattern}", tags=tags
        )
        params = {
            **{k: v for k, v in plan.params.items()},
            "pattern": plan.pattern,
            "d_model": plan.model.d_model,
            "n_layers": len(plan.model.layers),
            "attention_ratio": round(plan.model.attention_ratio, 4),
        }
        self.client.log_batch(
            run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()]
        )
        self.client.log_dict(run.info.run_id, plan.model.to_dict(), "model_config.json")
        return run.info.run_id

    def fail_lost_trial(self, trial: FrozenTrial, grace: float) -> None:
        """Close the child run of a trial whose worker stopped beating."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is not None:
            self.finish_trial(run_id, {}, "FAILED", {"fail_reason": lost_reason(grace)})

    def log_curve_point(self, run_id: str, values: dict[str, float]) -> None:
        step, now = int(values["step"]), int(time.time() * 1000)
        metrics = [
            Metric(f"train_{k}", float(values[k]), now, step)
            for k in ("loss", "lr", "tokens_per_s")
            if k in values
        ]
        self.client.log_batch(run_id, metrics=metrics)

    def finish_trial(
        self,
        run_id: str,
        metrics: dict[str, float],
        status: str,
        tags: dict[str, str] | None = None,
    ) -> None:
        now = int(time.time() * 1000)
        finite = [
            Metric(k, float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and float(v) not in (float("inf"), float("-inf"))
        ]
        for start in range(0, len(finite), MAX_BATCH):
            self.client.log_batch(run_id, metrics=finite[start : start + MAX_BATCH])
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    def set_trial_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_front(
        self,
        rows: list[dict[str, Any]],
        hypervolume: float | None,
        step: int | None,
        figures: dict[str, bytes],
    ) -> None:
        """The study's current front on the parent: CSV, figures, and the hypervolume at
        `step` (none when None)."""
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "pareto.csv"
            with table.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
                writer.writeheader()
                writer.writerows(rows)
            self.client.log_artifact(self.parent_id, str(table))
            for name, blob in figures.items():
                path = Path(tmp) / name
                path.write_bytes(blob)
                self.client.log_artifact(self.parent_id, str(path))
        if hypervolume is not None:
            self.client.log_metric(self.parent_id, "hypervolume", hypervolume, step=step)

    def finish_study(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status)
