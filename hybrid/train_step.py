"""One optimisation step of `hybrid.train` (forward, backward, clipping, AdamW), run eagerly
or replayed from a CUDA graph, and its loss on the way to the host.

A search trial's model is small, and on an H100 its step is host-bound: Python, autograd and
~300 kernel launches take longer to issue than the kernels take to run (BENCHMARKS.md,
training throughput). A CUDA graph of the whole step issues it as one launch. That needs
fixed shapes (every training batch has the same), no host synchronisation inside the step
(there is none: the loss travels to the host asynchronously) and every lazy first-call cost
(Triton compilation and autotuning, cached tables, the optimizer's state) paid before
capture: the first `WARMUP_STEPS` steps run eagerly on a side stream, the next is captured,
and that step and every later one is a replay. Under the default (auto) a step that
synchronises with the host (a layer that reads a value back), which no graph can hold, goes
on eagerly with a warning; `train.cuda_graph: true` makes that an error.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hybrid.errors import invalid
from hybrid.graphs import host_syncs_raise, record_graph

WARMUP_STEPS = 3
FILL_UNINITIALIZED_MEMORY = False  # under train.deterministic; see deterministic_algorithms


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite."""


def use_cuda_graph(setting: bool | None, device: torch.device) -> bool:
    """`train.cuda_graph`: None (auto) graphs the step on CUDA and runs it eagerly elsewhere;
    True insists on a graph."""
    if setting and device.type != "cuda":
        raise invalid(
            "train.cuda_graph", setting, f"false or null on device {device} (graphs need CUDA)"
        )
    return device.type == "cuda" if setting is None else setting


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`train.deterministic`: inside, PyTorch picks deterministic kernels or raises for an op
    that has none, so two runs of one command give the same losses bit for bit (CUDA training
    otherwise differs run to run: BENCHMARKS.md); flash-attention's backward follows the
    setting (`hybrid.layers.attention`) and this project's Triton kernels are deterministic
    either way. cuBLAS needs `CUBLAS_WORKSPACE_CONFIG` for it; it is set to `:4096:8` unless
    given. PyTorch's filling of every new tensor (`fill_uninitialized_memory`) is turned off:
    it guards against kernels that read memory they never wrote, which ours do not (the GPU
    tests poison every output), and it cost a graphed 20M hybrid 17% of its tokens/s
    (BENCHMARKS.md)."""
    if not enabled:
        yield
        return
    settings = torch.utils.deterministic
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        settings.fill_uninitialized_memory,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    settings.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        settings.fill_uninitialized_memory = previous[2]


def autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA, float32 elsewhere. A graph capture turns the cast cache off: a
    cached cast would outlive the capture that made it."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@dataclass
class StepStats:
    """A step's loss and gradient norm, copied to the host without waiting; `read` waits
    for that step alone, so the device runs on with the steps queued after it."""

    step: int
    lr: float
    values: Tensor
    copied: torch.cuda.Event | None

    @classmethod
    def queue(cls, step: int, lr: float, loss: Tensor, grad_norm: Tensor) -> StepStats:
        values = torch.stack([loss.float(), grad_norm.float()])
        if values.device.type != "cuda":
            return cls(step, lr, values, None)
        host = torch.empty(2, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(step, lr, host, copied)

    def read(self) -> tuple[float, float]:
        """(loss, gradient norm) as numbers; TrainingDiverged when either is not finite."""
        if self.copied is not None:
            self.copied.synchronize()
        loss, grad_norm = self.values.tolist()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"training diverged at step {self.step}: loss={loss}, grad norm={grad_norm} "
                f"(lr={self.lr:.3g}); lower train.lr or check the data"
            )
        return loss, grad_norm


class TrainStep:
    """`step(inputs, targets, lr)` trains on one batch and returns its loss and gradient
    norm (device tensors); eager, or from a CUDA graph after `WARMUP_STEPS` eager steps."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
        graphed: bool,
        insist: bool = False,
    ) -> None:
        """insist: a step that cannot be captured is an error (else: eager steps, a warning)."""
        self.model, self.optimizer, self.graphed, self.insist = model, optimizer, graphed, insist
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.max_norm = grad_clip or math.inf
        self.device = self.params[0].device
        self.eager_steps = 0
        self.replays = 0  # steps replayed from the graph
        self.replay = None
        self.side: torch.cuda.Stream | None = None

    def _forward_backward(self, inputs: Tensor, targets: Tensor, cache: bool = True):
        with autocast(self.device, cache):
            logits = self.model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), nn.utils.clip_grad_norm_(self.params, self.max_norm)

    def _eager(self, inputs: Tensor, targets: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = self._forward_backward(inputs, targets)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _warm_up(self, inputs: Tensor, targets: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """An eager step on a side stream, as capture requires of the runs before it; the
        last one under `host_syncs_raise`, which finds a step no graph can hold before any
        capture is tried."""
        self.eager_steps += 1
        last = self.eager_steps == WARMUP_STEPS
        current = torch.cuda.current_stream(self.device)
        # one side stream for every warm-up step: the allocator caches blocks per stream, so
        # a stream per step would keep each step's activations reserved
        side = self.side = self.side or torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with host_syncs_raise() if last else contextlib.nullcontext(), torch.cuda.stream(side):
                return self._eager(inputs, targets, lr)
        except RuntimeError as error:
            if not last:
                raise
            failure = error
        finally:
            current.wait_stream(side)
        self._give_up_graph(failure)
        # the error's traceback holds the failed step's autograd graph, made on the side
        # stream: alive, it would tie the next backward's gradients to that stream
        del failure
        return self._eager(inputs, targets, lr)

    def _give_up_graph(self, error: RuntimeError) -> None:
        """Back to eager steps after a step that synchronises with the host (an error when
        the graph was insisted on), the failed step's gradients dropped."""
        reason = str(error).splitlines()[0]
        if self.insist:
            raise RuntimeError(
                f"train.cuda_graph=true, but the training step synchronises with the host "
                f"({reason}), so no CUDA graph can hold it; set train.cuda_graph: false"
            ) from error
        warnings.warn(
            f"the training step synchronises with the host ({reason}), so no CUDA graph can "
            "hold it; training goes on with eager steps (train.cuda_graph: false skips the "
            "attempt)",
            stacklevel=3,
        )
        self.graphed = False
        self.optimizer.zero_grad(set_to_none=True)

    def _capture(self, inputs: Tensor, targets: Tensor, lr: float) -> None:
        """Static inputs, a device learning rate the graph reads, and one capture (which runs
        nothing). The gradients are None here, so the captured backward writes them afresh
        on every replay instead of adding into them."""
        self.inputs, self.targets = inputs.clone(), targets.clone()
        self.lr = torch.tensor(lr, dtype=torch.float32, device=self.device)
        self.last_lr = lr
        for group in self.optimizer.param_groups:
            group["lr"], group["capturable"] = self.lr, True
        # torch.cuda.graph's entry empties the allocator's cache: the eager steps' cached
        # activation blocks go back to the driver, and the graph's pool takes their place

        def step() -> tuple[Tensor, Tensor]:
            outputs = self._forward_backward(self.inputs, self.targets, cache=False)
            self.optimizer.step()
            return outputs

        try:
            graph, (self.loss, self.grad_norm) = record_graph(step, self.device)
        except RuntimeError as error:
            raise RuntimeError(
                "the training step could not be captured in a CUDA graph "
                f"({str(error).splitlines()[0]}); set train.cuda_graph: false"
            ) from error
        self.replay = graph.replay

    def __call__(self, inputs: Tensor, targets: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        if not self.graphed:
            return self._eager(inputs, targets, lr)
        if self.replay is None:
            if self.eager_steps < WARMUP_STEPS:
                return self._warm_up(inputs, targets, lr)
            self._capture(inputs, targets, lr)
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        self.lr.fill_(lr)
        self.last_lr = lr
        self.replay()
        self.replays += 1
        return self.loss, self.grad_norm

    def close(self) -> None:
        """Free the graph and its memory (the gradients live in its pool) and leave the
        optimizer as an eager one, with a float learning rate. Reads nothing from the device,
        so it also runs cleanly after a CUDA error."""
        if self.replay is not None:
            self.replay = self.loss = self.grad_norm = None
            self.optimizer.zero_grad(set_to_none=True)
            for group in self.optimizer.param_groups:
                group["lr"], group["capturable"] = self.last_lr, False


def plain_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Float learning rates and capturable off: how an eager step expects its groups (a
    checkpoint written by a graphed run stores the graph's tensor rate)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"] = group["lr"].item()
        group["capturable"] = False
