"""Training on CUDA (marker `gpu`; skipped without a CUDA device, and without `datasets`,
which the corpora load through: carry .whl): bf16 autocast learns, and the CUDA-graphed
step trains as the eager one does, resumes from its checkpoints and frees its graph."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from helpers import rel_err

from hybrid.config import ModelConfig
from hybrid.train import TrainConfig, train
from hybrid.train_step import WARMUP_STEPS

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")

MODELS = {
    "SISO + attention": ModelConfig.from_pattern(
        "M-*-", d_model=128, mamba3={"d_state": 32, "headdim": 32}, attention={"n_heads": 2}
    ),
    "MIMO R=2 + attention": ModelConfig.from_pattern(
        "M-*-M-",
        d_model=128,
        mamba3={"d_state": 32, "headdim": 32, "mimo_rank": 2},
        attention={"n_heads": 2},
    ),
}
# a warm-up over half the run: a graph that kept the capture step's rate would show
SHORT = TrainConfig(batch_size=8, seq_len=128, steps=16, warmup=0.5, log_every=1, eval_tokens=1024)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("datasets", reason="corpora load through `datasets` (carry .whl)")
    from hybrid.data import CorpusSpec
    from hybrid.token_cache import prepare_data

    folder = tmp_path_factory.mktemp("corpus")
    for i in range(8):
        (folder / f"{i}.txt").write_text(
            f"Scene {i}. " + "Now is the winter of our discontent. " * 80
        )
    return prepare_data(CorpusSpec(str(folder), val_fraction=0.2))


def test_training_on_cuda_with_bf16_autocast_learns(corpus):
    config = dataclasses.replace(SHORT, steps=60, log_every=10, warmup=0.05)
    result = train(MODELS["MIMO R=2 + attention"], corpus, config, device=CUDA, progress=False)
    losses = [e["loss"] for e in result.curve]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["val_loss"] < 2.0


def _flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(MODELS))
def test_graphed_steps_train_as_the_eager_steps_do(corpus, name):
    runs = {
        graphed: train(
            MODELS[name],
            corpus,
            dataclasses.replace(SHORT, cuda_graph=graphed),
            device=CUDA,
            progress=False,
        )
        for graphed in (False, True)
    }
    eager, graphed = ([e["loss"] for e in runs[g].curve] for g in (False, True))
    worst = max(abs(a - b) / a for a, b in zip(eager, graphed, strict=True))
    params = rel_err(_flat_parameters(runs[True].model), _flat_parameters(runs[False].model))
    print(f"{name}: worst loss difference {worst:.2e}, parameters {params:.2e}")
    # every batch differs and the rate moves each step: a replay that read stale inputs or
    # a frozen rate would leave the eager curve by far more than bf16 rounding does
    assert worst <= 5e-3, (eager, graphed)
    assert params <= 2e-2
    assert runs[True].metrics["graphed_steps"] == SHORT.steps - WARMUP_STEPS
    assert runs[False].metrics["graphed_steps"] == 0
    for result in runs.values():
        assert all(p.grad is None for p in result.model.parameters())  # graph memory freed


def test_graphed_run_resumes_from_its_checkpoint(corpus, tmp_path):
    # evaluations between replays too
    config = dataclasses.replace(SHORT, steps=20, checkpoint_every=5, eval_every=4, cuda_graph=True)
    model = MODELS["SISO + attention"]
    reference = train(model, corpus, config, device=CUDA, progress=False)

    def crash_at_13(event, values):
        if event == "train" and values["step"] == 13:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(model, corpus, config, device=CUDA, progress=False, checkpoint=checkpoint,
              callbacks=[crash_at_13])  # fmt: skip
    assert torch.load(checkpoint, weights_only=False)["step"] == 10
    copy = tmp_path / "copy.pt"
    shutil.copy(checkpoint, copy)
    resumed = train(model, corpus, config, device=CUDA, progress=False, checkpoint=checkpoint)
    assert resumed.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=1e-3)
    # the same checkpoint (its optimizer holds the graph's tensor rate) goes on eagerly
    eager = dataclasses.replace(config, cuda_graph=False)
    again = train(model, corpus, eager, device=CUDA, progress=False, checkpoint=copy)
    assert again.metrics["val_loss"] == pytest.approx(reference.metrics["val_loss"], rel=1e-3)


def test_a_step_that_cannot_be_captured_runs_eagerly_or_fails_clearly(corpus, monkeypatch):
    from hybrid.model import HybridLM

    forward = HybridLM.forward

    def forward_that_reads_a_logit(self, tokens, *args, **kwargs):
        logits = forward(self, tokens, *args, **kwargs)
        float(logits[0, 0, 0])  # a host synchronisation: no graph can hold it
        return logits

    monkeypatch.setattr(HybridLM, "forward", forward_that_reads_a_logit)
    model = MODELS["SISO + attention"]
    eager = train(model, corpus, dataclasses.replace(SHORT, cuda_graph=False), device=CUDA,
                  progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="synchronises with the host"):
        auto = train(model, corpus, SHORT, device=CUDA, progress=False)
    assert auto.metrics["graphed_steps"] == 0
    assert [e["loss"] for e in auto.curve] == pytest.approx(
        [e["loss"] for e in eager.curve], rel=5e-3
    )
    with pytest.raises(RuntimeError, match=r"train\.cuda_graph=true, but the training step"):
        train(model, corpus, dataclasses.replace(SHORT, cuda_graph=True), device=CUDA,
              progress=False)  # fmt: skip


RANDOM_BATCH_MODEL = ModelConfig.from_pattern(
    "M-*-", d_model=256, vocab_size=256, mamba3={"d_state": 32}, attention={"n_heads": 4}
)


def _random_batches() -> list[torch.Tensor]:
    """Eight fresh random batches (no corpus: the tests that use them run where `datasets` is
    absent too, so with .cute carried the attention is flash-attn-4's)."""
    return [torch.randint(0, 256, (4, 257), device=CUDA) for _ in range(8)]


def _train_on(batches: list[torch.Tensor], graphed: bool) -> tuple[list[float], torch.Tensor]:
    """Steps of `RANDOM_BATCH_MODEL`, seeded, on `batches`: the losses and final weights."""
    from hybrid.model import HybridLM
    from hybrid.train import param_groups
    from hybrid.train_step import TrainStep

    torch.manual_seed(0)
    model = HybridLM(RANDOM_BATCH_MODEL, device=CUDA)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, fused=True)
    step = TrainStep(model, optimizer, grad_clip=1.0, graphed=graphed, insist=True)
    losses = [step(b[:, :-1], b[:, 1:], 1e-3)[0].item() for b in batches]
    assert (step.replay is not None) == graphed
    step.close()
    return losses, _flat_parameters(model)


def test_graphed_step_captures_the_prefill_attention_backend():
    from hybrid.layers.attention import select_backend

    batches = _random_batches()
    losses = {graphed: _train_on(batches, graphed)[0] for graphed in (False, True)}
    backend = select_backend("auto", CUDA, torch.bfloat16)[0]
    print(f"attention {backend}: eager {losses[False]}\ngraphed {losses[True]}")
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_deterministic_graphed_steps_repeat_with_the_prefill_attention_backend():
    """Under `deterministic_algorithms` (train.deterministic) flash-attn-4's backward runs its
    deterministic form: two graphed runs give the same losses and weights bit for bit."""
    from hybrid.layers.attention import select_backend
    from hybrid.train_step import deterministic_algorithms

    batches = _random_batches()
    with deterministic_algorithms(True):
        losses_a, weights_a = _train_on(batches, True)
        losses_b, weights_b = _train_on(batches, True)
    print(f"attention {select_backend('auto', CUDA, torch.bfloat16)[0]}: {losses_a}")
    assert losses_a == losses_b and torch.equal(weights_a, weights_b)


def test_deterministic_runs_repeat_bit_for_bit(corpus):
    """train.deterministic: two eager runs and a graphed one of a MIMO hybrid with attention
    give the same losses and parameters bit for bit. Runs without it are printed, not
    checked: whether a given pair of them differs is up to the GPU's scheduling."""
    model = MODELS["MIMO R=2 + attention"]

    def run(graphed: bool, deterministic: bool):
        config = dataclasses.replace(SHORT, cuda_graph=graphed, deterministic=deterministic)
        return train(model, corpus, config, device=CUDA, progress=False)

    exact = [run(False, True), run(False, True), run(True, True)]
    reference = [e["loss"] for e in exact[0].curve]
    for result in exact[1:]:
        assert [e["loss"] for e in result.curve] == reference
        assert torch.equal(_flat_parameters(result.model), _flat_parameters(exact[0].model))
    assert not torch.are_deterministic_algorithms_enabled()
    free = [[e["loss"] for e in run(True, False).curve] for _ in range(2)]
    worst = max(abs(a - b) / a for a, b in zip(*free, strict=True))
    print(f"deterministic: {reference}\ndefault, two runs: worst loss difference {worst:.2e}")


def test_graphed_run_stops_on_divergence(corpus, monkeypatch):
    from hybrid.train import TrainingDiverged
    from hybrid.train_step import TrainStep

    replay_step = TrainStep.__call__
    calls = []

    def poisoned(self, inputs, targets, lr):  # NaN weights from the 6th step (a replay) on
        calls.append(lr)
        if len(calls) == 6:
            next(self.model.parameters()).data.fill_(float("nan"))
        return replay_step(self, inputs, targets, lr)

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    config = dataclasses.replace(SHORT, cuda_graph=True)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 5: loss=nan"):
        train(MODELS["SISO + attention"], corpus, config, device=CUDA, progress=False)
