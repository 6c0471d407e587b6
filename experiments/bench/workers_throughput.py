"""Search throughput with one worker per GPU: the quickstart space run on one GPU and with
`--gpus all`, each on a fresh journal study; completed trials per hour, and the ratio between
them (the peer is the same search on one GPU, in the same run). On one GPU the search runs
twice, its trials' training steps replayed from CUDA graphs (`train.cuda_graph`, the
default) and issued eagerly.

    python experiments/bench/workers_throughput.py [--trials-per-gpu 8] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "experiments" / "quickstart.yaml"


def _trial_seconds(trial: optuna.trial.FrozenTrial) -> float:
    """A trial's own time, start to completion (train, evaluate, measure)."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def run(gpus: str, trials: int, workers: int, cuda_graph: bool = True) -> dict:
    """One `hybrid search` of `trials` on `gpus` (one worker each): its wall time, what its
    trials did, the median trained trial's own time (start to completion: train, evaluate,
    measure) and its training's, and the share of the workers' wall time spent inside
    trials (the rest is start-up, study and tracking machinery, and waiting at the end)."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "study.log"
        spec = yaml.safe_load(SPACE.read_text())
        spec["train"]["cuda_graph"] = cuda_graph
        space = Path(tmp) / SPACE.name
        space.write_text(yaml.safe_dump(spec, sort_keys=False))
        command = [
            sys.executable,
            "-m",
            "hybrid.cli",
            "search",
            str(space),
            "--gpus",
            gpus,
            "--trials",
            str(trials),
            "--storage",
            f"journal:{journal}",
            "--tracking-uri",
            f"sqlite:///{Path(tmp) / 'mlflow.db'}",
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=tmp, capture_output=True)
        seconds = time.perf_counter() - start
        study = optuna.load_study(
            study_name="quickstart", storage=JournalStorage(JournalFileBackend(str(journal)))
        )
        complete = study.get_trials(states=(TrialState.COMPLETE,))
        trained = [t for t in complete if "duplicate_of" not in t.user_attrs]
        busy = sum(_trial_seconds(t) for t in complete)
        per_gpu: dict[str, int] = {}
        for t in complete:  # which pinned GPU ran each trial
            gpu = f"{t.user_attrs.get('device', '?')} #{t.user_attrs.get('cuda_visible_devices')}"
            per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    return {
        "gpus": gpus,
        "step": "graph" if cuda_graph else "eager",
        "trials": len(complete),
        "trained": len(trained),
        "seconds": seconds,
        "trials_per_hour": 3600 * len(complete) / seconds,
        "trials_per_gpu": per_gpu,
        "median_trial_s": statistics.median(_trial_seconds(t) for t in trained),
        "median_train_s": statistics.median(
            t.user_attrs["metrics"]["train_seconds"] for t in trained
        ),
        "busy_share": busy / (seconds * workers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-gpu", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    n = torch.cuda.device_count()
    if n == 0:
        print("no CUDA device: nothing to measure")
        return
    # untimed, as many trials as the largest timed search: Triton compiles the kernels of the
    # models the sampler proposes into its cache, so the timed searches find it warm
    run("0", args.trials_per_gpu * n, 1)
    one = run("0", args.trials_per_gpu, 1)
    rows = [one, run("0", args.trials_per_gpu, 1, cuda_graph=False)]
    if n > 1:
        rows.append(run("all", args.trials_per_gpu * n, n))
    print(
        f"{'GPUs':<6}{'step':<7}{'trials':>8}{'trained':>9}{'seconds':>10}{'trials/h':>10}"
        f"{'vs row 1':>10}{'trial s':>9}{'train s':>9}{'busy':>6}"
    )
    for r in rows:
        print(
            f"{r['gpus']:<6}{r['step']:<7}{r['trials']:>8}{r['trained']:>9}{r['seconds']:>10.1f}"
            f"{r['trials_per_hour']:>10.0f}{r['trials_per_hour'] / one['trials_per_hour']:>9.2f}x"
            f"{r['median_trial_s']:>9.2f}{r['median_train_s']:>9.2f}{r['busy_share']:>6.0%}"
            f"  {r['trials_per_gpu']}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
