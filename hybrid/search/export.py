"""`hybrid export`: a study's chosen architectures as files to train further.

For each exported trial, `trial-NNN/model_config.json` (the `ModelConfig` it trained, which
`hybrid train --model-config` and `ModelConfig.from_dict` read) and `trial-NNN/trial.json`
(objectives, Pareto rank, sampled values, the training recipe, the data settings and the
`hybrid train` command that reproduces the trial), plus `front.csv` over all of them. The
study is only read (but for the hypervolume reference that the search records with its first
front, were it missing).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid.search.space import DataSection, SearchSpace
from hybrid.search.study import compute_front, load_existing_study
from hybrid.train import TrainConfig


@dataclass(frozen=True)
class ExportedTrial:
    row: dict[str, Any]  # the trial's `compute_front` row: number, pattern, rank, objectives
    directory: Path
    train_command: str


def _flag(name: str, value: Any) -> list[str]:
    """`--name value` as `hybrid train` parses it (bools as words)."""
    return [
        f"--{name.replace('_', '-')}",
        str(value).lower() if isinstance(value, bool) else str(value),
    ]


def train_command(model_config: Path, data: DataSection, train: TrainConfig) -> str:
    """The `hybrid train` invocation that trains `model_config` as the search did: the data
    settings and every training setting that differs from the CLI's default."""
    words = ["hybrid", "train", "--model-config", str(model_config), *_flag("corpus", data.corpus)]
    defaults = DataSection(corpus=data.corpus)
    for name in type(data).model_fields:
        value = getattr(data, name)
        # seq_len is a training setting too (below); streaming is a bare switch
        if name in ("corpus", "seq_len") or value == getattr(defaults, name):
            continue
        words += ["--streaming"] if name == "streaming" else _flag(name, value)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(train, field.name)
        if value != field.default:
            words += _flag(field.name, value)
    return shlex.join(words)


def _chosen_rows(front_rows: list[dict[str, Any]], trials: Sequence[int] | None) -> list[dict]:
    if trials is None:
        return [r for r in front_rows if r["pareto_rank"] == 0]
    by_number = {r["trial"]: r for r in front_rows}
    unknown = [t for t in trials if t not in by_number]
    if unknown:
        raise ValueError(
            f"--trials {unknown} are not completed feasible trials of this study (duplicates "
            f"count under the trial that trained first); allowed: {sorted(by_number)}"
        )
    return [by_number[t] for t in trials]


def export_trials(
    space: SearchSpace, storage: str, out: Path, trials: Sequence[int] | None = None
) -> list[ExportedTrial]:
    """Write the Pareto set of the study (or the given trial numbers) under `out`."""
    study = load_existing_study(
        space,
        storage,
        "run `hybrid search SPACE.yaml` first, or pass the storage it used (--storage)",
    )
    front = compute_front(study, space)
    rows = _chosen_rows(front.rows, trials)
    if not rows:
        raise ValueError(f"study {study.study_name!r} has no completed feasible trial yet")
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    exported = []
    for row in rows:
        trial = by_number[row["trial"]]
        plan = space.plan(trial.params)
        if plan.key != trial.user_attrs.get("arch_key"):
            raise ValueError(
                f"{space.name}: the file now maps trial {trial.number}'s sampled values to "
                f"another model or recipe than it trained ({plan.pattern} against "
                f"{row['pattern']}): export with the search file the study ran"
            )
        directory = out / f"trial-{trial.number:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        config_path = directory / "model_config.json"
        config_path.write_text(json.dumps(plan.model.to_dict(), indent=2) + "\n")
        command = train_command(config_path, space.spec.data, plan.train)
        record = {
            "study": study.study_name,
            "trial": trial.number,
            "pattern": row["pattern"],
            "pareto_rank": row["pareto_rank"],
            "objectives": {m: row[m] for m in space.metric_names},
            "metrics": trial.user_attrs.get("metrics", {}),
            "sampled": dict(trial.params),
            "train": plan.train.recipe(),
            "data": space.spec.data.model_dump(),
            "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            "train_command": command,
        }
        (directory / "trial.json").write_text(json.dumps(record, indent=2) + "\n")
        exported.append(ExportedTrial(row, directory, command))
    _write_front(out / "front.csv", [e.row for e in exported], space.metric_names)
    return exported


def _write_front(path: Path, rows: list[dict[str, Any]], metrics: list[str]) -> None:
    columns = list(dict.fromkeys(["trial", "pattern", "pareto_rank", *metrics, "params", "point"]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
