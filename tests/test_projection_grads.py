"""The split projection's gradient buffer gives torch.split's gradient, whoever consumes the
pieces: kernels that write into the buffer, plain autograd ops, a piece used twice, none."""

import pytest
import torch
from helpers import poisoned

from hybrid.kernels import projection_grads
from hybrid.kernels.projection_grads import gradient_output, split_projection

WIDTHS = {"z": 6, "x": 6, "b": 4, "dt": 3, "padding": 5}


class _WritesIntoBuffer(torch.autograd.Function):
    """y = 3·piece whose backward writes its gradient where a Triton kernel would: into the
    piece's columns of the buffer (through a (tokens, 2, width/2) view, as the kernels see
    heads), or into a new tensor without one."""

    @staticmethod
    def forward(ctx, piece, grads, name):
        ctx.grads, ctx.name = grads, name
        return 3 * piece

    @staticmethod
    def backward(ctx, grad):
        tokens = grad.shape[0] * grad.shape[1]
        shape = (tokens, 2, grad.shape[-1] // 2)
        out = gradient_output(ctx.grads, ctx.name, shape, grad)
        out.copy_((3 * grad).reshape(shape))
        return out.view(grad.shape), None, None


@pytest.fixture(autouse=True)
def poisoned_buffer(monkeypatch):
    """NaN until written, so an element nothing wrote shows."""
    monkeypatch.setattr(projection_grads, "_allocate", poisoned)


def _loss(pieces, probes, grads, into):
    """z and b through the buffer-writing consumer (when `into`), x twice (gradients summed
    by autograd), dt through a plain op, the padding unused."""
    z, x, b, dt = pieces["z"], pieces["x"], pieces["b"], pieces["dt"]
    if into:
        z, b = (_WritesIntoBuffer.apply(pieces[n], grads, n) for n in ("z", "b"))
    else:
        z, b = 3 * z, 3 * b
    return (
        (z * probes[0]).sum()
        + (x * probes[1]).sum()
        + (x.sin() * probes[2]).sum()
        + (b * probes[3]).sum()
        + (dt.exp() * probes[4]).sum()
    )


def test_split_gradient_is_torch_splits_whoever_consumes_the_pieces():
    projected = torch.randn(2, 5, sum(WIDTHS.values()), dtype=torch.float64, requires_grad=True)
    probes = [torch.randn(2, 5, w, dtype=torch.float64) for w in (6, 6, 6, 4, 3)]
    plain = dict(zip(WIDTHS, projected.split(list(WIDTHS.values()), -1), strict=True))
    (expected,) = torch.autograd.grad(_loss(plain, probes, None, False), projected)
    assert expected[..., -5:].abs().sum() == 0 and expected[..., :-5].abs().min() > 0

    pieces, grads = split_projection(projected, WIDTHS)
    loss = _loss(pieces, probes, grads, True)
    for _ in range(2):  # a second backward of the same graph gets a buffer of its own
        (got,) = torch.autograd.grad(loss, projected, retain_graph=True)
        assert torch.equal(got, expected)


def test_a_consumer_writes_into_the_buffer_itself(monkeypatch):
    """What a consumer wrote is the buffer's own memory: the split's backward copies only
    the gradients that arrived elsewhere (here x's, from a plain op)."""
    verdicts = []
    is_view_of = projection_grads._is_view_of
    monkeypatch.setattr(
        projection_grads, "_is_view_of", lambda g, p: verdicts.append(is_view_of(g, p)) or False
    )
    projected = torch.randn(3, 4, sum(WIDTHS.values()), requires_grad=True)
    pieces, grads = split_projection(projected, WIDTHS)
    (_WritesIntoBuffer.apply(pieces["z"], grads, "z").sum() + pieces["x"].sum()).backward()
    assert verdicts == [True, False]  # z, x; the others got no gradient and were zeroed
    assert torch.equal(projected.grad[..., :6], torch.full((3, 4, 6), 3.0))
    assert torch.equal(projected.grad[..., 6:12], torch.ones(3, 4, 6))
    assert projected.grad[..., 12:].abs().sum() == 0


def test_no_buffer_without_a_gradient():
    projected = torch.randn(2, 3, sum(WIDTHS.values()))
    pieces, grads = split_projection(projected, WIDTHS)
    assert grads is None and [p.shape[-1] for p in pieces.values()] == list(WIDTHS.values())
    with torch.no_grad():
        _, grads = split_projection(projected.requires_grad_(), WIDTHS)
    assert grads is None
