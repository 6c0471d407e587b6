"""Random Mamba-3 op inputs and error measures shared by the tests."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from hybrid.config import ModelConfig
from hybrid.kernels.mamba3_common import Mamba3Inputs, Mamba3State, Mamba3Weights
from hybrid.kernels.projection_grads import ProjectionGrads, split_projection


def run_interpreted(script: str) -> str:
    """Run tests/interpret/<script> under TRITON_INTERPRET=1 in a fresh process (the
    interpreter is picked when kernels are defined); fail with its output, else return it."""
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "interpret" / script)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def interpreted_verdict(worst: float, tolerance: float) -> int:
    """The last line of a tests/interpret script and its exit status (0: within tolerance),
    which `run_interpreted` asserts on."""
    print(f"worst {worst:.2e} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


def named_leaves(inputs: Mamba3Inputs, weights: Mamba3Weights, state: Mamba3State) -> dict:
    """Every tensor of an op call by name ("in.x", "w.d", "state.ssm"): the leaves a
    gradient check differentiates against."""
    named = {f"in.{k}": v for k, v in inputs._asdict().items()}
    named |= {f"w.{k}": v for k, v in weights._asdict().items() if v is not None}
    names = ("angle", "ssm", "k", "x", "gamma")
    named |= {f"state.{k}": v for k, v in zip(names, state.tensors(), strict=True)}
    return named


def from_leaves(named: dict) -> tuple[Mamba3Inputs, Mamba3Weights, Mamba3State]:
    """The op's arguments back from `named_leaves` (absent weights are None)."""
    return (
        Mamba3Inputs(**{f: named[f"in.{f}"] for f in Mamba3Inputs._fields}),
        Mamba3Weights(**{f: named.get(f"w.{f}") for f in Mamba3Weights._fields}),
        Mamba3State(**{k[len("state.") :]: v for k, v in named.items() if k.startswith("state.")}),
    )


def projection_slices(inputs: Mamba3Inputs) -> tuple[Mamba3Inputs, ProjectionGrads]:
    """The same values as views into one (Bt, L, width) tensor, like the layer's split
    in_proj output, and the split's gradient buffer (which the Triton backward writes into);
    differentiable back to the given tensors."""
    flat = {name: t.flatten(2) for name, t in zip(Mamba3Inputs._fields, inputs, strict=True)}
    pieces, grads = split_projection(
        torch.cat(list(flat.values()), dim=-1), {n: f.shape[-1] for n, f in flat.items()}
    )
    views = (pieces[n].unflatten(-1, t.shape[2:]) for n, t in zip(flat, inputs, strict=True))
    return Mamba3Inputs(*views), grads


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor) -> Tensor:
    """Softmax attention of q (Bt, 1, H, D) over each sequence's first seqlens[b] keys of a
    cache k, v (Bt, H_kv, capacity, D), in float64 on q's device: the decode kernels' oracle."""
    group = q.shape[2] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b, length in enumerate(seqlens.tolist()):
        keys = k[b, :, :length].double().repeat_interleave(group, 0)
        values = v[b, :, :length].double().repeat_interleave(group, 0)
        scores = torch.einsum("hd,hld->hl", q[b, 0].double(), keys) / q.shape[-1] ** 0.5
        out[b, 0] = torch.einsum("hl,hld->hd", scores.softmax(-1), values)
    return out


def poisoned(shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A new tensor of NaN: an output buffer in which an unwritten element shows."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the whole tensor; infinite where that is not a
    number (a NaN in `actual`: an unwritten, poisoned element), so that `max` over errors
    keeps it (max(1e-6, nan) is 1e-6)."""
    err = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    return err if math.isfinite(err) else math.inf


def angle_err(actual: Tensor, expected: Tensor) -> float:
    """Largest circular distance between two angle tensors (radians)."""
    diff = torch.remainder(actual.double() - expected.double() + torch.pi, 2 * torch.pi)
    return (diff - torch.pi).abs().max().item()


def random_inputs(
    batch=2,
    length=29,
    heads=4,
    headdim=8,
    d_state=16,
    rank=1,
    groups=2,
    angles=4,
    dtype=torch.float64,
    requires_grad=False,
) -> Mamba3Inputs:
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    return Mamba3Inputs(
        x=r(batch, length, heads, headdim),
        z=r(batch, length, heads, headdim),
        b=r(batch, length, rank, groups, d_state),
        c=r(batch, length, rank, groups, d_state),
        dt=r(batch, length, heads),
        a=r(batch, length, heads),
        trap=r(batch, length, heads),
        angle=r(batch, length, angles),
    )


def random_weights(
    heads=4,
    headdim=8,
    d_state=16,
    rank=1,
    mimo=False,
    out_norm=False,
    dtype=torch.float64,
    requires_grad=False,
) -> Mamba3Weights:
    def r(*shape, shift=0.0, scale=1.0):
        t = torch.randn(*shape, dtype=dtype) * scale + shift
        return t.requires_grad_(requires_grad)

    return Mamba3Weights(
        dt_bias=r(heads, shift=-2.0),
        b_norm=r(d_state, shift=1.0, scale=0.2),
        c_norm=r(d_state, shift=1.0, scale=0.2),
        b_bias=r(heads, rank, d_state),
        c_bias=r(heads, rank, d_state),
        d=r(heads),
        mimo_x=r(heads, rank, headdim) if mimo else None,
        mimo_z=r(heads, rank, headdim) if mimo else None,
        mimo_o=r(heads, rank, headdim) if mimo else None,
        out_norm=r(heads, headdim, shift=1.0, scale=0.2) if out_norm else None,
    )


def random_state(
    batch=2, heads=4, headdim=8, d_state=16, rank=1, angles=4, dtype=torch.float64
) -> Mamba3State:
    return Mamba3State(
        angle=torch.rand(batch, heads, angles, dtype=dtype) * 6.0,
        ssm=torch.randn(batch, heads, headdim, d_state, dtype=dtype),
        k=torch.randn(batch, rank, heads, d_state, dtype=dtype),
        x=torch.randn(batch, heads, headdim, dtype=dtype),
        gamma=torch.rand(batch, heads, dtype=dtype) * 0.2,
    )


# `hybrid` CLI options of a tiny hybrid, for the command-line tests
TINY_MODEL_ARGS = [
    "--pattern",
    "M-*-",
    "--d-model",
    "32",
    "--set",
    "mamba3.d_state=16",
    "--set",
    "mamba3.headdim=16",
    "--set",
    "attention.n_heads=2",
]


def greedy_by_forwards(model, prompt, n):
    """The generation oracle: every next token is the argmax of a fresh forward over the
    whole sequence."""
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def small_hybrid_config(pattern: str = "M-*-M-", decode_backend: str = "auto") -> ModelConfig:
    """The GPU tests' hybrid: MIMO R=2 Mamba-3 and GQA attention at d_model 256, vocab 512."""
    return ModelConfig.from_pattern(
        pattern,
        d_model=256,
        vocab_size=512,
        mamba3={"d_state": 64, "headdim": 64, "mimo_rank": 2, "decode_backend": decode_backend},
        attention={"n_heads": 4, "n_kv_heads": 2, "head_dim": 64},
    )


def ptx_load_params(ptx: str) -> list[set[int]]:
    """For each ld.global in `ptx` (in order), the kernel parameters (by index) its address
    derives from: every definition of a register is followed back to `ld.param`
    (conservatively, all of a register's definitions in the text count). Reads the PTX of
    the CuTe DSL and of Triton (predicated instructions, braced vector operands)."""
    sources: dict[str, set[str]] = {}
    params: dict[str, int] = {}
    loads = []
    for line in ptx.splitlines():
        line = re.sub(r"^@!?%p\d+\s+", "", line.split("//")[0].strip()).rstrip(";").strip()
        if not line or line.endswith(":") or len(line.split(None, 1)) < 2:
            continue
        op, rest = line.split(None, 1)
        operands = re.findall(r"%[a-z]+\d+", rest)
        if op.startswith("ld.param") and (found := re.search(r"_param_(\d+)", rest)):
            params[operands[0]] = int(found.group(1))
        elif op.startswith("ld.global"):
            loads.append(re.search(r"\[\s*(%[a-z]+\d+)", rest).group(1))
        elif operands and not op.startswith(("st.", "bra", "setp")):
            sources.setdefault(operands[0], set()).update(operands[1:])

    def reach(reg: str, seen: set[str]) -> set[int]:
        if reg in params:
            return {params[reg]}
        if reg in seen:
            return set()
        seen.add(reg)
        return set().union(*(reach(src, seen) for src in sources.get(reg, ())))

    return [reach(address, set()) for address in loads]
