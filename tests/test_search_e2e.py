"""A whole search of a tiny space on a journal store with MLflow tracking: trials, children,
front tags, hypervolume, artifacts, resumption, a failing trial; then the UI in Chromium."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.image
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from hybrid import cli
from hybrid.config import ModelConfig
from hybrid.search.pareto import dominates, to_minimisation
from hybrid.search.space import load_space
from hybrid.search.study import FrontUpdater, compute_front, run_search

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _space_file(folder: Path) -> Path:
    corpus = folder / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(
            f"Act {i}. " + "To be, or not to be: that is the question. " * (30 + i)
        )
    spec = {
        "name": "tiny",
        "model": {
            "d_model": 32,
            "n_mixers": 2,
            "mamba3": {"d_state": 16, "headdim": 16, "chunk_size": 16},
            "attention": {"n_heads": 2},
            "mlp": {"hidden": 64},
            "layout": {
                "attention_ratio": {"choices": [0.0, 0.5, 1.0]},
                "placement": {"choices": ["front", "back"]},
            },
        },
        "data": {"corpus": str(corpus), "seq_len": 32, "val_fraction": 0.25},
        # lr=1e9 diverges: the seed design below trains with it (the first choice) and fails
        "train": {
            "steps": 12,
            "batch_size": 4,
            "warmup": 0.0,
            "grad_clip": 0.0,
            "lr": {"choices": [1.0e9, 3.0e-3]},
            "eval_tokens": 256,
        },
        "objectives": [
            {"metric": "val_perplexity"},
            {"metric": "decode_latency_ms", "context": 16},
        ],
        "search": {
            "sampler": "random",
            "n_trials": 5,
            "seed_designs": ["M-*-"],
            "storage": f"journal:{folder / 'study.log'}",
        },
        "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    path = _space_file(folder)
    space = load_space(path)
    outcome = run_search(space, device="cpu", progress=False)
    return space, outcome, path


def test_study_has_the_trials_and_the_failure(searched):
    _space, outcome, _ = searched
    trials = outcome.study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 5
    assert failed and failed[0].number == 0  # the enqueued seed design trains with lr=1e9
    for t in failed:
        assert t.params["train.lr"] == 1.0e9
        assert "TrainingDiverged" in t.user_attrs["fail_reason"]
    assert all(t.params["train.lr"] == 3.0e-3 for t in complete)


def test_one_child_per_trial_with_front_tags_that_match_brute_force(searched):
    space, outcome, _ = searched
    client = MlflowClient(space.spec.tracking.uri)
    children = client.search_runs(
        [outcome.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    by_trial = {int(r.data.tags["hybrid.study.trial"]): r for r in children}
    assert sorted(by_trial) == [t.number for t in outcome.study.trials]
    for t in outcome.study.trials:
        if t.state == TrialState.FAIL:
            assert by_trial[t.number].info.status == "FAILED"
            assert "TrainingDiverged" in by_trial[t.number].data.tags["fail_reason"]
    complete = [t for t in outcome.study.trials if t.state == TrialState.COMPLETE]
    points = {t.number: to_minimisation(t.values, space.directions) for t in complete}
    for number, point in points.items():
        on_front = not any(dominates(q, point) for q in points.values())
        tags = by_trial[number].data.tags
        original = "duplicate_of" not in tags  # a reused trial: its original is the front's
        assert tags["is_pareto"] == str(on_front and original).lower(), (number, tags)
        assert (tags["pareto_rank"] == "0") == on_front
        run = by_trial[number]
        assert run.data.params["pattern"] == tags["pattern"]
        assert run.data.metrics["val_perplexity"] == pytest.approx(
            dict(zip(space.metric_names, outcome.study.trials[number].values, strict=True))[
                "val_perplexity"
            ]
        )
        assert tags["device"].startswith("cpu")
        if "duplicate_of" in tags:  # same architecture and recipe: reused, not retrained
            original = outcome.study.trials[int(tags["duplicate_of"])]
            assert original.user_attrs["arch_key"] == tags["arch_key"]
            assert outcome.study.trials[number].values == original.values
        else:
            assert "train_loss" in run.data.metrics


def test_hypervolume_never_decreases_and_artifacts_parse(searched, tmp_path):
    space, outcome, _ = searched
    client = MlflowClient(space.spec.tracking.uri)
    history = client.get_metric_history(outcome.parent_run_id, "hypervolume")
    values = [m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    assert len(values) >= 5 and all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] > 0
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"pareto.png", "pareto.html", "pareto.csv", "search_space.yaml"} <= names
    png = client.download_artifacts(outcome.parent_run_id, "pareto.png", str(tmp_path))
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    table = Path(client.download_artifacts(outcome.parent_run_id, "pareto.csv", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    unique = [
        t
        for t in outcome.study.get_trials(states=(TrialState.COMPLETE,))
        if "duplicate_of" not in t.user_attrs
    ]
    assert len(rows) == len(outcome.front.rows) == len(unique) >= 2  # one row per architecture
    assert {r["trial"] for r in rows if r["pareto_rank"] == "0"} == {
        str(r["trial"]) for r in outcome.front.pareto
    }
    html = Path(client.download_artifacts(outcome.parent_run_id, "pareto.html", str(tmp_path)))
    assert "plotly" in html.read_text()[:200_000].lower()
    # the figures drawn when the worker stopped show the final front
    front = outcome.front
    assert f"{len(front.pareto)} on the front, {len(front.rows)} feasible trials" in (
        html.read_text()
    )
    # each point is named with the sampled values its pattern does not show
    hover = html.read_text().replace("\\u003cbr\\u003e", "<br>")  # as plotly escapes it
    assert all(r["point"] and f"{r['pattern']}<br>{r['point']}" in hover for r in front.rows)


class _Recorder:
    """Stands in for the MLflow tracker: what `log_front` was given."""

    def __init__(self):
        self.fronts: list[tuple[int | None, list[str]]] = []
        self.hypervolumes: list[float | None] = []

    def log_front(self, rows, hypervolume, step, figures):
        self.fronts.append((step, sorted(figures)))
        self.hypervolumes.append(hypervolume)

    def set_trial_tags(self, run_id, tags):
        pass


def test_front_figures_are_throttled_and_drawn_at_the_end(searched):
    """The table and hypervolume go out after every trial, the figures at most once per
    interval, and `finish` draws whatever front the last figures missed, once."""
    space, outcome, _ = searched
    recorder = _Recorder()
    updater = FrontUpdater(space, recorder, figure_interval_s=3600)
    trials = outcome.study.get_trials(states=(TrialState.COMPLETE,))[:3]
    for trial in trials:
        updater(outcome.study, trial)
    updater.finish(outcome.study)
    updater.finish(outcome.study)  # nothing new since: nothing drawn
    figures = ["pareto.html", "pareto.png"]
    done = len(outcome.study.get_trials(states=(TrialState.COMPLETE,)))  # the step
    assert recorder.fronts == [(done, figures), (done, []), (done, []), (None, figures)]
    assert recorder.hypervolumes[-1] is None  # the last figures log no second point
    eager = _Recorder()
    updater = FrontUpdater(space, eager, figure_interval_s=0)
    for trial in trials:
        updater(outcome.study, trial)
    updater.finish(outcome.study)
    assert eager.fronts == [(done, figures)] * 3


def test_hypervolume_steps_grow_when_trials_finish_out_of_order(searched):
    """Workers finish trials out of order: the hypervolume's step is the count of completed
    trials, so the curve's steps and values only grow (by trial number they did not); a
    failed trial between them logs no second point at an unchanged step."""
    space, outcome, _ = searched
    finished = outcome.study.get_trials(states=(TrialState.COMPLETE,))
    finished = [t for t in finished if "duplicate_of" not in t.user_attrs][:4]
    assert len(finished) >= 2
    study = optuna.create_study(directions=space.directions)
    study.set_user_attr("hv_reference", outcome.study.user_attrs["hv_reference"])
    asked = [study.ask() for _ in finished]
    recorder = _Recorder()
    updater = FrontUpdater(space, recorder, figure_interval_s=3600)
    for i in reversed(range(len(finished))):  # the last asked finishes first
        for key, value in finished[i].user_attrs.items():
            asked[i].set_user_attr(key, value)
        study.tell(asked[i], finished[i].values)
        updater(study, study.trials[asked[i].number])
        failed = study.ask()  # a failed trial changes no front: nothing is logged for it
        study.tell(failed, state=TrialState.FAIL)
        updater(study, study.trials[failed.number])
    assert [step for step, _ in recorder.fronts] == list(range(1, len(finished) + 1))
    assert recorder.hypervolumes == sorted(recorder.hypervolumes)


def test_rerun_resumes_without_repeating(searched):
    space, outcome, _ = searched
    again = run_search(space, device="cpu", progress=False)
    assert again.trials_run == 0 and again.parent_run_id == outcome.parent_run_id
    before = {t.number: t.values for t in outcome.study.trials}
    more = run_search(space, n_trials=7, device="cpu", progress=False)
    assert more.trials_run >= 2  # two more completed, plus any diverging lr=1e9 draws
    assert {t.number: t.values for t in more.study.trials if t.number in before} == before
    numbers = [t.number for t in more.study.trials]
    assert numbers == list(range(len(numbers)))
    assert len(more.study.get_trials(states=(TrialState.COMPLETE,))) == 7
    assert len(optuna.load_study(study_name="tiny", storage=more.study._storage).trials) == len(
        numbers
    )


def test_a_study_refuses_an_edited_recipe(searched, tmp_path):
    _, outcome, path = searched
    spec = yaml.safe_load(path.read_text())
    spec["train"]["steps"] = 24
    spec["search"]["n_trials"] = 9  # more trials alone would resume
    edited = tmp_path / "space.yaml"
    edited.write_text(yaml.safe_dump(spec, sort_keys=False))
    count = len(outcome.study.trials)
    with pytest.raises(ValueError, match=r"train\.steps: 12 in the study, 24 in the file"):
        run_search(load_space(edited), device="cpu", progress=False)
    assert len(optuna.load_study(study_name="tiny", storage=outcome.study._storage).trials) == count
    spec["train"]["steps"], spec["search"]["n_trials"] = 12, 7
    spec["train"]["cuda_graph"] = False  # how the steps run, not what is trained: resumes
    edited.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert run_search(load_space(edited), device="cpu", progress=False).trials_run == 0


def test_export_writes_the_front_as_configs_whose_command_retrains_the_trial(
    searched, tmp_path, capsys
):
    space, outcome, path = searched
    out = tmp_path / "export"
    assert cli.main(["export", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=outcome.study._storage)
    front = {r["trial"] for r in compute_front(study, space).pareto}
    assert {int(d.name.split("-")[1]) for d in out.glob("trial-*")} == front
    with (out / "front.csv").open() as f:
        listed = [int(r["trial"]) for r in csv.DictReader(f)]
    assert set(listed) == front
    first = json.loads((out / f"trial-{listed[0]:03d}" / "trial.json").read_text())
    assert first["train_command"] in printed  # the command for the front's first row
    number = min(front)
    trial = study.trials[number]
    folder = out / f"trial-{number:03d}"
    exported = ModelConfig.from_dict(json.loads((folder / "model_config.json").read_text()))
    assert exported == ModelConfig.from_dict(trial.user_attrs["model"])
    record = json.loads((folder / "trial.json").read_text())
    assert list(record["objectives"].values()) == trial.values
    # the command trains the same model on the same batches: the trial's perplexity again
    metrics = tmp_path / "metrics.json"
    words = shlex.split(record["train_command"])[1:]
    assert cli.main([*words, "--device", "cpu", "--metrics-json", str(metrics)]) == 0
    again = json.loads(metrics.read_text())["metrics"]["val_perplexity"]
    assert again == pytest.approx(record["objectives"]["val_perplexity"], rel=1e-5)
    assert cli.main(["export", str(path), "--trials", "999", "--out", str(out)]) == 2
    assert "--trials [999] are not completed feasible trials" in capsys.readouterr().err
    (out / "trial-998").mkdir()  # left by an earlier export: named, never deleted
    assert cli.main(["export", str(path), "--out", str(out)]) == 0
    assert "not in this one: trial-998" in capsys.readouterr().out
    assert (out / "trial-998").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"),
    reason="needs Debian's chromium (CI installs it, and there this test never skips)",
)
def test_ui_serves_the_parent_run_in_a_browser(searched):
    _space, outcome, path = searched
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hybrid.cli", "ui", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first_line = server.stdout.readline()
        assert f"/runs/{outcome.parent_run_id}" in first_line
        url = first_line.split(": ", 1)[1].strip()
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                _get(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "MLflow UI did not come up"
                time.sleep(0.5)
        png = _get(f"{base}/get-artifact?path=pareto.png&run_uuid={outcome.parent_run_id}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        body = json.dumps(
            {
                "experiment_ids": [outcome.experiment_id],
                "max_results": 100,
                "filter": f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'",
            }
        )
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            body.encode(),
            {"Content-Type": "application/json"},
        )
        runs = json.loads(_get(request))["runs"]
        assert len(runs) == len(outcome.study.trials)

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "mlflow_ui_parent_run.png"
        shot.unlink(missing_ok=True)
        browser = [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={path.parent / 'cr'}",
            "--window-size=1400,1000",
            "--virtual-time-budget=20000",
        ]
        subprocess.run(
            [*browser, f"--screenshot={shot}", url], check=True, timeout=120, capture_output=True
        )
        assert shot.stat().st_size > 20_000
        dom = subprocess.run(
            [*browser, "--dump-dom", url], check=True, timeout=120, capture_output=True, text=True
        ).stdout
        assert "study tiny" in dom and "Child runs" in dom  # the parent page, children listed
        assert f"trial-{len(outcome.study.trials) - 1:03d}" in dom
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
