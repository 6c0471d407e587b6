"""Training for a fixed budget and evaluation (perplexity, bits per byte).

AdamW with decay on matrix weights only, warm-up then cosine / WSD / constant learning rate,
gradient clipping, bf16 autocast on CUDA (fp32 on CPU), a budget in tokens, steps and/or
seconds (whichever ends first), fixed seeds for init and data order, a tqdm bar, callbacks
for the loss curve, and a hard stop with `TrainingDiverged` on a non-finite loss or gradient.
On CUDA the step is replayed from a CUDA graph (`train_step`).
With a checkpoint path the run saves itself every `checkpoint_every` steps and a re-run
resumes where it stopped, seeing the same batches (they are a function of seed and step).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hybrid.config import ModelConfig
from hybrid.devices import on_device, resolve_device
from hybrid.errors import invalid
from hybrid.model import HybridLM
from hybrid.token_cache import TokenData, train_batch, validation_windows
from hybrid.train_step import (
    StepStats,
    TrainStep,
    autocast,
    deterministic_algorithms,
    plain_param_groups,
    use_cuda_graph,
)
from hybrid.train_step import TrainingDiverged as TrainingDiverged  # train() raises it

SCHEDULES = ("cosine", "wsd", "constant")
# how a run reports, scores and saves itself, not what it trains: a checkpoint resumes under
# other values of these (a stopped run may be resumed saving more often)
REPORTING_SETTINGS = ("eval_tokens", "eval_every", "log_every", "checkpoint_every")
Callback = Callable[[str, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Budget: any of tokens / steps / seconds; the first one reached ends the run.
    warmup and decay_fraction are fractions of the budget; lr decays to lr·min_lr_ratio."""

    batch_size: int = 32
    seq_len: int = 512
    tokens: int | None = None
    steps: int | None = None
    seconds: float | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 0
    eval_tokens: int = 1 << 18
    eval_every: int | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    cuda_graph: bool | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "eval_tokens", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise invalid(f"train.{name}", value, "a positive integer")
        budget = {k: getattr(self, k) for k in ("tokens", "steps", "seconds")}
        if all(v is None for v in budget.values()):
            raise invalid("train.tokens/steps/seconds", None, "at least one budget")
        for name, value in budget.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise invalid(f"train.{name}", value, "a positive finite number")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise invalid("train.lr", self.lr, "a positive finite number")
        if self.schedule not in SCHEDULES:
            raise invalid("train.schedule", self.schedule, str(SCHEDULES))
        for name in ("min_lr_ratio", "warmup", "decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise invalid(f"train.{name}", getattr(self, name), "a fraction in [0, 1]")
        if self.eval_every is not None and self.eval_every < 1:
            raise invalid("train.eval_every", self.eval_every, "a positive integer or null")
        for name in ("beta1", "beta2"):  # AdamW's moment decays
            if not 0 <= getattr(self, name) < 1:
                raise invalid(f"train.{name}", getattr(self, name), "a number in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise invalid("train.weight_decay", self.weight_decay, "a finite number >= 0")
        if self.grad_clip is not None and not self.grad_clip >= 0:  # < 0 flips the gradients
            raise invalid("train.grad_clip", self.grad_clip, "a number >= 0 (0: no clipping)")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            if not integral or not 0 <= value < 2**63:
                raise invalid(f"train.{name}", value, "an integer in [0, 2**63)")
            object.__setattr__(self, name, int(value))  # a numpy integer as JSON can hold it
        if self.cuda_graph not in (None, True, False):
            raise invalid("train.cuda_graph", self.cuda_graph, "true, false or null (auto)")
        if not isinstance(self.deterministic, bool):
            raise invalid("train.deterministic", self.deterministic, "true or false")

    def recipe(self) -> dict[str, Any]:
        """The settings that decide what is trained: all but how the steps run (graphed or
        not, deterministic kernels or not)."""
        settings = dataclasses.asdict(self)
        del settings["cuda_graph"], settings["deterministic"]
        return settings

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int | None:
        """Steps the token/step budget allows (None when only `seconds` bounds the run)."""
        limits = [self.steps] if self.steps else []
        if self.tokens:
            limits.append(math.ceil(self.tokens / self.tokens_per_step))
        return min(limits) if limits else None

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the budget spent: the larger of the step and the time fraction."""
        fractions = [step / self.total_steps] if self.total_steps else []
        if self.seconds:
            fractions.append(elapsed_s / self.seconds)
        return max(fractions)

    def lr_at(self, progress: float) -> float:
        if progress < self.warmup:
            return self.lr * progress / self.warmup
        floor = self.min_lr_ratio
        if self.schedule == "cosine":
            span = (progress - self.warmup) / max(1e-12, 1 - self.warmup)
            return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(span, 1))))
        if self.schedule == "wsd" and progress > 1 - self.decay_fraction:
            span = (progress - (1 - self.decay_fraction)) / max(1e-12, self.decay_fraction)
            return self.lr * (1 - (1 - floor) * min(span, 1))
        return self.lr


@dataclass
class TrainResult:
    model: HybridLM
    metrics: dict[str, float]
    curve: list[dict[str, float]] = field(default_factory=list)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the weights of linear maps (the tied embedding/head too); nothing else."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    params = list(model.parameters())  # each tied tensor once
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


@torch.inference_mode()
def evaluate(
    model: HybridLM, data: TokenData, seq_len: int, max_tokens: int, batch_size: int
) -> dict[str, float]:
    """val_loss (nats/token), val_perplexity = exp(val_loss) and val_bpb over the fixed
    validation windows (the first `max_tokens` targets of the validation split)."""
    device = next(model.parameters()).device
    windows = validation_windows(data.val, seq_len, max_tokens, data.corpus.name)
    token_bytes = torch.from_numpy(data.tokenizer.token_bytes)
    was_training = model.training
    model.eval()
    nll, count, n_bytes = 0.0, 0, 0
    for batch in windows.split(batch_size):
        inputs, targets = batch[:, :-1].to(device), batch[:, 1:]
        with autocast(device):
            logits = model(inputs)
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum"
        ).item()
        count += targets.numel()
        n_bytes += int(token_bytes[targets].sum())
    model.train(was_training)
    loss = nll / count
    return {
        "val_loss": loss,
        "val_perplexity": math.exp(loss),
        "val_bpb": nll / math.log(2) / n_bytes,
        "val_tokens": float(count),
    }


class CheckpointMismatch(ValueError):
    """A checkpoint file of another run (model, training config or data differ)."""


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        try:
            torch.save(state, f)
            f.close()
            os.replace(f.name, path)  # atomic: a crash leaves the previous checkpoint intact
        except BaseException:  # a full disk, Ctrl-C mid-write: no stray temporary file
            Path(f.name).unlink(missing_ok=True)
            raise


def _run_identity(model_config: ModelConfig, config: TrainConfig, data: TokenData) -> dict:
    """What a checkpoint must match to be resumed: the model, the data and what is trained;
    not how often the run logs, evaluates or saves, nor how much it evaluates (a run stopped
    may be resumed saving more often)."""
    return {"model": model_config.to_dict(), "train": _trained(config.recipe()), "data": data.key}


def _trained(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in REPORTING_SETTINGS}


def _differences(saved: dict[str, Any], identity: dict[str, Any]) -> str:
    """`section.key: saved -> now` for the first settings that differ."""
    changed = []
    for section in identity:
        old, new = saved.get(section), identity[section]
        if isinstance(old, dict) and isinstance(new, dict):
            keys = sorted(old.keys() | new.keys())
            changed += [
                f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in keys
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            changed.append(f"{section}: {old!r} -> {new!r}")
    return "; ".join(changed[:4]) + (f" (and {len(changed) - 4} more)" if len(changed) > 4 else "")


def train(
    model_config: ModelConfig,
    data: TokenData,
    config: TrainConfig,
    *,
    device: torch.device | str | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint: Path | None = None,
    checkpoint_interval_s: float | None = None,
    progress: bool = True,
) -> TrainResult:
    """Build the model (seeded), train it on `data` for the budget, evaluate it; with
    `config.deterministic`, under PyTorch's deterministic algorithms (the previous setting
    comes back after). With `checkpoint_interval_s` the checkpoint is saved every that many
    seconds of training instead of every `config.checkpoint_every` steps (a search's trials:
    how long a step takes is not known before; not part of the run's identity)."""
    device = resolve_device(device)
    with on_device(device), deterministic_algorithms(config.deterministic):
        return _train(model_config, data, config, device, callbacks, checkpoint,
                      checkpoint_interval_s, progress)  # fmt: skip


def _train(
    model_config: ModelConfig,
    data: TokenData,
    config: TrainConfig,
    device: torch.device,
    callbacks: Sequence[Callback],
    checkpoint: Path | None,
    checkpoint_interval_s: float | None,
    progress: bool,
) -> TrainResult:
    graphed = use_cuda_graph(config.cuda_graph, device)
    if model_config.vocab_size < data.tokenizer.vocab_size:
        raise invalid(
            "vocab_size",
            model_config.vocab_size,
            f">= the tokenizer's {data.tokenizer.vocab_size} ({data.tokenizer.name})",
        )
    validation_windows(data.val, config.seq_len, config.eval_tokens, data.corpus.name)
    train_batch(data.train, 1, config.seq_len, config.data_seed, 0)  # fail before training

    torch.manual_seed(config.seed)
    model = HybridLM(model_config, device=device)
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=device.type == "cuda",
    )
    identity = _run_identity(model_config, config, data)
    step, elapsed_before, curve, done = 0, 0.0, [], False
    if checkpoint is not None and checkpoint.is_dir():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is a folder; allowed: a file path")
    if checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=False)
            # a checkpoint of an earlier version also carried the reporting settings
            saved = {**state["identity"], "train": _trained(state["identity"]["train"])}
        except (OSError, torch.OutOfMemoryError):  # the file may be sound: the trial fails, a
            raise  # retry resumes it (a search replaces a CheckpointMismatch's file)
        except Exception as error:  # not a checkpoint of this project (or truncated)
            raise CheckpointMismatch(
                f"checkpoint {str(checkpoint)!r} cannot be read ({type(error).__name__}: "
                f"{error}); move it away"
            ) from None
        if saved != identity:
            raise CheckpointMismatch(
                f"checkpoint {str(checkpoint)!r} belongs to a different run "
                f"({_differences(saved, identity)}); move it away"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        plain_param_groups(optimizer)
        step, elapsed_before, curve, done = (
            state["step"],
            state["elapsed_s"],
            state["curve"],
            state["done"],
        )
        if progress:
            finished = ": finished, not trained again" if done else ""
            tqdm.write(f"resuming {checkpoint} at step {step}{finished}")

    def save(finished: bool) -> None:
        if checkpoint is not None:
            _save(
                checkpoint,
                {
                    "identity": identity,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "elapsed_s": elapsed,
                    "curve": curve,
                    "done": finished,
                },
            )

    def score() -> dict[str, float]:
        return evaluate(model, data, config.seq_len, config.eval_tokens, config.batch_size)

    def emit(event: str, values: dict[str, float]) -> None:
        for callback in callbacks:
            callback(event, values)

    model.train()
    run_step = TrainStep(model, optimizer, config.grad_clip, graphed, config.cuda_graph is True)
    # A step's loss and gradient norm are read one step late, after the next step is queued,
    # so the device never idles waiting for the host between steps.
    unread: StepStats | None = None
    loss_value = grad_value = math.nan
    started, first_step = time.perf_counter(), step
    elapsed = saved_at = elapsed_before
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        unit="step",
        disable=not progress,
        desc="training",
        dynamic_ncols=True,
    )
    try:  # the graph and its memory go with the run, however it ends
        while not done and config.progress(step, elapsed) < 1:
            lr = config.lr_at(config.progress(step, elapsed))
            inputs, targets = (
                t.to(device, non_blocking=True)
                for t in train_batch(
                    data.train, config.batch_size, config.seq_len, config.data_seed, step
                )
            )
            queued = StepStats.queue(step, lr, *run_step(inputs, targets, lr))
            if unread is not None:  # the previous step's, done by now or nearly
                loss_value, grad_value = unread.read()
            unread = queued
            step += 1
            now = time.perf_counter()
            elapsed = elapsed_before + now - started
            reporting = step % config.log_every == 0 or config.progress(step, elapsed) >= 1
            if checkpoint_interval_s is None:
                saving = step % config.checkpoint_every == 0
            else:
                saving = checkpoint is not None and elapsed - saved_at >= checkpoint_interval_s
            evaluating = (  # not at the last step, which the final evaluation scores
                bool(config.eval_every)
                and step % config.eval_every == 0
                and config.progress(step, elapsed) < 1
            )
            if reporting or saving or evaluating:  # nothing is logged or saved unchecked
                loss_value, grad_value = unread.read()
                unread = None
                now = time.perf_counter()  # after the sync: rates count finished work
                elapsed = elapsed_before + now - started
            rate = (step - first_step) * config.tokens_per_step / max(now - started, 1e-9)
            bar.update(1)
            known = {} if math.isnan(loss_value) else {"loss": f"{loss_value:.4f}"}  # 1st step
            bar.set_postfix(**known, tok_s=f"{rate:,.0f}", refresh=False)
            if reporting:
                entry = {
                    "step": step,
                    "tokens": step * config.tokens_per_step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_value,
                    "tokens_per_s": rate,
                    "elapsed_s": elapsed,
                }
                curve.append(entry)
                emit("train", entry)
            if evaluating:
                emit("eval", {"step": step, **score()})
            if saving:
                save(finished=False)
                saved_at = elapsed
        if unread is not None:
            unread.read()
    finally:
        run_step.close()
        bar.close()
    save(finished=True)
    metrics = score()
    metrics.update(
        steps=float(step),
        tokens=float(step * config.tokens_per_step),
        train_seconds=elapsed,
        tokens_per_s=curve[-1]["tokens_per_s"] if curve else 0.0,
        graphed_steps=float(run_step.replays),
    )
    emit("eval", {"step": step, **metrics})
    return TrainResult(model, metrics, curve)
