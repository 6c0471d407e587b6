"""Training: learns real text, is reproducible, resumable, stops on divergence."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL_ARGS

from hybrid.cli import main
from hybrid.config import ModelConfig
from hybrid.data import CorpusSpec
from hybrid.model import HybridLM
from hybrid.token_cache import prepare_data, train_batch
from hybrid.train import TrainConfig, TrainingDiverged, param_groups, train
from hybrid.train_step import plain_param_groups

TINY = ModelConfig.from_pattern(
    "M-*-",
    d_model=64,
    mamba3={"d_state": 16, "headdim": 16, "chunk_size": 32},
    attention={"n_heads": 4},
)


@pytest.fixture(scope="module")
def shakespeare():
    return prepare_data(CorpusSpec("shakespeare"))


def _config(**overrides) -> TrainConfig:
    base = {
        "batch_size": 16,
        "seq_len": 64,
        "steps": 250,
        "lr": 4e-3,
        "eval_tokens": 8192,
        "log_every": 25,
    }
    return TrainConfig(**{**base, **overrides})


def test_tiny_hybrid_beats_the_unigram_entropy_and_is_reproducible(shakespeare):
    counts = np.bincount(np.asarray(shakespeare.train), minlength=256).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_nats = float(-(p * np.log(p)).sum())  # the best loss without context (≈3.3)
    torch.set_num_threads(2)
    first = train(TINY, shakespeare, _config(), progress=False)
    assert first.metrics["val_loss"] < unigram_nats - 0.8, (first.metrics, unigram_nats)
    assert first.metrics["val_perplexity"] == pytest.approx(math.exp(first.metrics["val_loss"]))
    assert first.metrics["val_bpb"] == pytest.approx(first.metrics["val_loss"] / math.log(2))
    assert first.curve[0]["loss"] > first.curve[-1]["loss"]
    assert first.metrics["graphed_steps"] == 0  # auto: no graph off CUDA
    second = train(TINY, shakespeare, _config(), progress=False)
    assert [e["loss"] for e in second.curve] == [e["loss"] for e in first.curve]
    assert second.metrics["val_loss"] == first.metrics["val_loss"]


def test_poisoned_learning_rate_stops_with_a_clear_error(shakespeare):
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: loss="):
        train(
            TINY, shakespeare, _config(lr=1e12, warmup=0.0, grad_clip=0.0, steps=50), progress=False
        )


def test_interrupted_run_resumes_to_the_same_result(shakespeare, tmp_path):
    config = _config(steps=40, checkpoint_every=10, log_every=5)
    reference = train(TINY, shakespeare, config, progress=False)

    def crash_at_25(event, values):
        if event == "train" and values["step"] == 25:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(TINY, shakespeare, config, progress=False, checkpoint=ckpt, callbacks=[crash_at_25])
    assert torch.load(ckpt, weights_only=False)["step"] == 20
    # the resumed run may issue its steps differently (cuda_graph) and report and save on
    # another cadence: neither is part of the identity
    eager = dataclasses.replace(config, cuda_graph=False, checkpoint_every=3, eval_every=7)
    resumed = train(TINY, shakespeare, eager, progress=False, checkpoint=ckpt)
    assert resumed.metrics["val_loss"] == reference.metrics["val_loss"]
    assert [e["loss"] for e in resumed.curve] == [e["loss"] for e in reference.curve]
    finished = train(TINY, shakespeare, config, progress=False, checkpoint=ckpt)
    assert finished.metrics["val_loss"] == reference.metrics["val_loss"]  # no retraining
    with pytest.raises(ValueError, match=r"belongs to a different run \(train.steps: 40 -> 41\)"):
        train(TINY, shakespeare, _config(steps=41), progress=False, checkpoint=ckpt)
    ckpt.write_text("garbage\n")  # not a checkpoint: named, not a parser's message alone
    with pytest.raises(ValueError, match=r"checkpoint '.*run.pt' cannot be read \("):
        train(TINY, shakespeare, config, progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="is a folder"):
        train(TINY, shakespeare, config, progress=False, checkpoint=tmp_path)


def test_the_last_step_is_evaluated_once(shakespeare):
    """With eval_every dividing the steps, the final evaluation scores the last step: no
    periodic one before it (it cost a second full evaluation)."""
    events = []
    train(TINY, shakespeare, _config(steps=12, eval_every=4, log_every=4), progress=False,
          callbacks=[lambda event, values: events.append((event, values["step"]))])  # fmt: skip
    assert [step for event, step in events if event == "eval"] == [4, 8, 12]


def test_a_checkpoint_interval_in_seconds_replaces_the_step_cadence(shakespeare, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    """A search's trials save by training time (`checkpoint_interval_s`), not every
    `checkpoint_every` steps: none before the interval has passed, then one per interval,
    and the last one when the run ends."""
    import hybrid.train as train_module

    saved, real_save = [], train_module._save
    monkeypatch.setattr(train_module, "_save", lambda path, state: (
        saved.append(state["step"]), real_save(path, state)))  # fmt: skip
    config = _config(steps=30, checkpoint_every=5, log_every=5)
    train(TINY, shakespeare, config, progress=False, checkpoint=tmp_path / "a.pt",
          checkpoint_interval_s=1e9)  # fmt: skip
    assert saved == [30]  # only the finished run's
    saved.clear()
    train(TINY, shakespeare, config, progress=False, checkpoint=tmp_path / "b.pt",
          checkpoint_interval_s=1e-9)  # fmt: skip
    assert saved == [*range(1, 31), 30]  # every step, whatever checkpoint_every says


def test_learning_rate_schedules():
    cosine = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert cosine.lr_at(0.05) == pytest.approx(0.5)
    assert cosine.lr_at(0.1) == pytest.approx(1.0)
    assert cosine.lr_at(0.55) == pytest.approx(0.55)
    assert cosine.lr_at(1.0) == pytest.approx(0.1)
    wsd = TrainConfig(
        steps=100, lr=1.0, warmup=0.1, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0
    )
    assert wsd.lr_at(0.5) == 1.0 and wsd.lr_at(0.8) == 1.0
    assert wsd.lr_at(0.9) == pytest.approx(0.5) and wsd.lr_at(1.0) == pytest.approx(0.0)


def test_budgets():
    assert TrainConfig(tokens=10_000, batch_size=4, seq_len=100).total_steps == 25
    assert TrainConfig(tokens=10_000, steps=5, batch_size=4, seq_len=100).total_steps == 5
    timed = TrainConfig(seconds=10.0)
    assert timed.total_steps is None and timed.progress(1000, 5.0) == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "train.tokens/steps/seconds"),
        ({"steps": 5, "schedule": "linear"}, "train.schedule='linear'"),
        ({"steps": 5, "lr": float("nan")}, "train.lr=nan"),
        ({"steps": 0}, "train.steps=0"),
        ({"seconds": float("inf")}, "train.seconds=inf"),
        ({"steps": 5, "beta2": 1.0}, "train.beta2=1.0"),
        ({"steps": 5, "grad_clip": -1.0}, "train.grad_clip=-1.0"),
        ({"steps": 5, "seed": -3}, "train.seed=-3"),
        ({"steps": 5, "batch_size": 0}, "train.batch_size=0"),
        ({"steps": 5, "warmup": 2.0}, "train.warmup=2.0"),
    ],
)
def test_bad_train_config(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(**overrides)


def test_weight_decay_only_on_linear_weights():
    model = HybridLM(TINY)
    decayed, plain = param_groups(model, 0.1)
    decayed_ids = {id(p) for p in decayed["params"]}
    assert id(model.blocks[0].layer.in_proj.weight) in decayed_ids
    assert id(model.embedding.weight) in decayed_ids  # tied with the head
    for p in (model.blocks[0].layer.dt_bias, model.blocks[0].layer.B_bias, model.norm.weight):
        assert id(p) in {id(q) for q in plain["params"]}
    total = len(decayed["params"]) + len(plain["params"])
    assert total == len(list(model.parameters())) and plain["weight_decay"] == 0.0


def test_sequence_longer_than_validation_split_is_refused_before_training(tmp_path):
    for i in range(20):  # 20 documents of 100 bytes: validation gets one of them
        (tmp_path / f"{i}.txt").write_text(f"{i:02d}" + "x" * 98)
    data = prepare_data(CorpusSpec(str(tmp_path), val_fraction=0.01))
    assert len(data.val) == 100 and len(data.train) > 1000
    with pytest.raises(ValueError, match=r"seq_len=200 is longer than the validation split"):
        train(TINY, data, _config(seq_len=200), progress=False)
    with pytest.raises(ValueError, match=r"seq_len=5000 is longer than the training split"):
        train_batch(data.train, 1, 5000, seed=0, step=0)


def test_cli_train_prints_the_curve_and_writes_metrics(tmp_path, capsys):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"Document {i}. " + "All the world's a stage. " * 60)
    out = tmp_path / "new" / "m.json"  # its folder is made before training
    code = main(
        [
            "train",
            *TINY_MODEL_ARGS,
            "--corpus",
            str(corpus),
            "--steps",
            "20",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--log-every",
            "10",
            "--eval-tokens",
            "256",
            "--eval-every",
            "10",
            "--val-fraction",
            "0.2",
            "--metrics-json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "step     10" in printed and "final: val_loss" in printed
    saved = json.loads(out.read_text())
    assert saved["metrics"]["steps"] == 20 and len(saved["curve"]) == 2
    assert [e["step"] for e in saved["evals"]] == [10, 20]  # the periodic one and the final
    assert (
        main(
            [
                "train",
                "--pattern",
                "M-",
                "--d-model",
                "32",
                "--corpus",
                str(tmp_path / "nope"),
                "--steps",
                "2",
            ]
        )
        == 2
    )
    assert "no such file or folder" in capsys.readouterr().err


def test_cuda_graph_setting_is_checked(shakespeare):
    with pytest.raises(ValueError, match=r"train.cuda_graph='yes' is invalid; allowed: true"):
        TrainConfig(steps=1, cuda_graph="yes")
    with pytest.raises(ValueError, match=r"train.cuda_graph=True is invalid; allowed: false or"):
        train(TINY, shakespeare, _config(steps=2, cuda_graph=True), device="cpu", progress=False)


def test_deterministic_runs_repeat_and_leave_the_global_setting_as_it_was(shakespeare):
    """train.deterministic turns PyTorch's deterministic algorithms on for the run alone; two
    runs give the same losses (on CPU they do anyway: the test checks the mode trains)."""
    with pytest.raises(ValueError, match=r"train.deterministic='yes' is invalid; allowed: true"):
        TrainConfig(steps=1, deterministic="yes")
    config = _config(steps=4, log_every=1, deterministic=True)
    seen = []

    def callback(_event, _values):
        fill = torch.utils.deterministic.fill_uninitialized_memory
        seen.append(torch.are_deterministic_algorithms_enabled() and not fill)

    runs = [
        train(TINY, shakespeare, config, device="cpu", progress=False, callbacks=[callback])
        for _ in range(2)
    ]
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # PyTorch's default, back
    assert [p["loss"] for p in runs[0].curve] == [p["loss"] for p in runs[1].curve]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:  # a caller's own setting survives a run, and a failing run
        with pytest.raises(ValueError, match="vocab_size"):
            train(dataclasses.replace(TINY, vocab_size=2), shakespeare, config, progress=False)
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_graphed_runs_checkpointed_optimizer_loads_as_an_eager_one():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    graphed = torch.optim.AdamW([weight], lr=torch.tensor(2e-3), capturable=True)
    plain_param_groups(graphed)
    group = graphed.param_groups[0]
    assert group["lr"] == pytest.approx(2e-3) and isinstance(group["lr"], float)
    assert group["capturable"] is False
