"""HybridLM: decoding with the cache reproduces the forward pass; bookkeeping is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import greedy_by_forwards, rel_err

from hybrid.config import ModelConfig
from hybrid.model import HybridLM

MAMBA_SISO = {"d_state": 16, "headdim": 8, "chunk_size": 4}
MAMBA_MIMO = {**MAMBA_SISO, "mimo_rank": 2, "ngroups": 2, "pregate_norm": True}


def _model(pattern, mamba3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig.from_pattern(
        pattern,
        d_model=32,
        vocab_size=97,
        mamba3=mamba3,
        attention={"n_heads": 4, "n_kv_heads": 2},
    )
    model = HybridLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("mamba3", [MAMBA_SISO, MAMBA_MIMO], ids=["siso", "mimo"])
@pytest.mark.parametrize("prefix", [1, 6])
def test_prefill_then_steps_equals_forward(mamba3, prefix):
    model = _model("M-M-*-M-", mamba3)
    tokens = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model.prefill(tokens[:, :prefix])
        steps = [logits] + [
            model.step(tokens[:, t], cache)[:, None] for t in range(prefix, tokens.shape[1])
        ]
    assert cache.seqlen == tokens.shape[1]
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-4


def test_bf16_decode_state_tracks_the_float32_state():
    """state_dtype=bfloat16 stores the SSM state rounded (2^-9 relative per step) and computes
    in float32: decoded logits stay within 1e-2 of the forward over 16 steps."""
    model = _model("M-M-*-M-", {**MAMBA_SISO, "state_dtype": "bfloat16"})
    tokens = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model.prefill(tokens[:, :1])
        steps = [logits] + [model.step(tokens[:, t], cache)[:, None] for t in range(1, 17)]
    assert cache.layers[0].ssm.dtype == torch.bfloat16
    assert cache.layers[0].angle.dtype == torch.float32
    error = rel_err(torch.cat(steps, dim=1), full)
    assert 0 < error <= 1e-2
    fp32 = _model("M-M-*-M-", MAMBA_SISO)
    saved = 8 * 8 * 16 * (4 - 2)  # 8 heads (d_inner 64 / headdim 8) of 8 x 16, 4 -> 2 bytes
    assert fp32.state_bytes(17) - model.state_bytes(17) == 3 * saved  # three M layers


def test_generate_greedy_is_deterministic_and_consistent():
    model = _model("M-*-", MAMBA_SISO)
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 6, temperature=0))
    with torch.no_grad():  # the greedy choice is the forward's argmax at every position
        assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])
    sampled = model.generate(prompt, 6, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 11)


@pytest.mark.parametrize("mamba3", [MAMBA_SISO, MAMBA_MIMO], ids=["siso", "mimo"])
def test_generate_equals_greedy_decoding_through_full_forwards(mamba3):
    model = _model("M-*-M-*-", mamba3)
    prompt = torch.randint(0, 97, (3, 6))
    expected = greedy_by_forwards(model, prompt, 12)
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    # on the CPU a graphed generation runs eagerly, with the same result
    assert torch.equal(model.generate(prompt, 12, temperature=0, cuda_graph=True), expected)


def test_decoding_records_no_autograd_history_and_checks_its_arguments():
    """prefill and step outside inference mode: the cache's in-place updates would chain
    every token's graph to the next (memory grew without bound)."""
    model = _model("M-*-", MAMBA_MIMO)
    logits, cache = model.prefill(torch.randint(0, 97, (2, 5)))
    logits = model.step(logits[:, -1].argmax(-1), cache)
    assert not logits.requires_grad
    layers = [layer for layer in cache.layers if layer is not None]  # MLPs keep none
    states = [getattr(layer, f.name) for layer in layers for f in dataclasses.fields(layer)]
    assert all(t.grad_fn is None for t in states if isinstance(t, torch.Tensor))
    prompt = torch.randint(0, 97, (1, 3))
    with pytest.raises(ValueError, match="max_new_tokens=-1 is invalid"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="top_k=0 is invalid"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="graphed_step needs a model on CUDA"):
        model.graphed_step(cache, 2)


def test_reset_empties_the_cache_in_place():
    model = _model("M-*-", MAMBA_SISO)
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        expected = model(tokens)
        cache = model.allocate_cache(2, 8)
        model(torch.randint(0, 97, (2, 7)), cache)
        ssm = cache.layers[0].ssm
        cache.reset()
        assert cache.seqlen == 0 and cache.layers[2].seqlens.tolist() == [0, 0]
        assert cache.layers[0].ssm is ssm and not ssm.any()
        assert rel_err(model(tokens, cache), expected) <= 1e-5


def test_a_mamba3_state_is_read_unless_known_empty():
    """A fresh or reset cache marks its Mamba-3 states empty, and a prefill then does not
    read them; whatever writes a state (a prefill, a step, replayed steps) clears the mark,
    and a state without it is read."""
    model = _model("M-*-", MAMBA_MIMO)
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        expected = model(tokens)
        cache = model.allocate_cache(2, 16)
        state = cache.layers[0]
        assert state.empty and not type(state)(*state.tensors()).empty
        for t in state.tensors():
            t.normal_()  # contents a prefill into an empty cache must not read
        assert rel_err(model(tokens, cache), expected) <= 1e-5
        assert not state.empty
        cache.reset()
        assert state.empty
        model.step(tokens[:, 0], cache)
        assert not state.empty
        cache.reset()
        cache.advance(1)
        assert not state.empty
        for t in state.tensors():
            t.normal_()
        cache.rewind(0)
        assert rel_err(model(tokens, cache), expected) > 1e-2  # not marked: read


def test_last_only_logits_are_the_last_row():
    model = _model("M-*-", MAMBA_SISO)
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert rel_err(model(tokens, last_only=True), model(tokens)[:, -1:]) <= 1e-6


def test_prefill_in_pieces_equals_one_forward():
    model = _model("M-*-M-", MAMBA_MIMO)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        whole, one = model.prefill(tokens[:, :19])
        pieces = model.allocate_cache(2, 32)
        last = model.forward_in_pieces(tokens[:, :19], pieces, piece_tokens=12)  # 6 at a time
        assert pieces.seqlen == one.seqlen == 19
        assert rel_err(last, whole[:, -1:]) <= 1e-5
        nxt = tokens[:, 19]
        assert rel_err(model.step(nxt, pieces), model.step(nxt, one)) <= 1e-5


def test_step_past_max_seqlen_is_refused():
    model = _model("M-*-", MAMBA_SISO)
    _, cache = model.prefill(torch.randint(0, 97, (1, 4)), max_seqlen=5)
    model.step(torch.tensor([1]), cache)
    with pytest.raises(ValueError, match="max_seqlen=5"):
        model.step(torch.tensor([1]), cache)


def test_param_counts_state_bytes_and_flops_add_up():
    model = _model("M-M-*-M-", MAMBA_MIMO)
    layer_params = sum(b.layer.num_params() for b in model.blocks)
    norms = (len(model.blocks) + 1) * 32
    assert model.num_params() == layer_params + norms
    assert model.num_params(non_embedding=False) == layer_params + norms + 97 * 32
    assert model.lm_head.weight is model.embedding.weight
    cache = model.allocate_cache(2, 64, dtype=torch.bfloat16)
    assert cache.nbytes == 2 * model.state_bytes(64, torch.bfloat16)
    assert model.flops_per_token(64) == 2 * 32 * 97 + sum(
        b.layer.flops_per_token(64) for b in model.blocks
    )


def test_untied_head_counts_separately():
    config = ModelConfig.from_pattern(
        "*-", d_model=32, tie_embeddings=False, attention={"n_heads": 4}
    )
    model = HybridLM(config)
    assert model.lm_head.weight is not model.embedding.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total - 2 * 256 * 32


def test_residual_projections_are_scaled_down():
    torch.manual_seed(0)
    deep = HybridLM(ModelConfig.from_pattern("M-" * 8, d_model=32, mamba3=MAMBA_SISO))
    shallow = HybridLM(ModelConfig.from_pattern("M-", d_model=32, mamba3=MAMBA_SISO))
    ratio = (
        shallow.blocks[0].layer.out_proj.weight.std() / deep.blocks[0].layer.out_proj.weight.std()
    ).item()
    assert ratio == pytest.approx((16 / 2) ** 0.5, rel=0.15)  # 1/sqrt(sublayers)


def test_meta_device_builds_for_counting_without_memory():
    config = ModelConfig.from_pattern("M-" * 24, d_model=2048, vocab_size=50_000)
    model = HybridLM(config, device="meta")
    assert model.num_params() > 5e8


def test_rewind_forgets_kv_positions_only():
    model = _model("M-*-", MAMBA_SISO)
    with torch.no_grad():
        _, cache = model.prefill(torch.randint(0, 97, (1, 6)), max_seqlen=8)
        model.step(torch.tensor([3]), cache)
        cache.rewind(6)
        assert cache.seqlen == 6 and cache.layers[2].length == 6
        assert cache.layers[2].seqlens.tolist() == [6]
        with pytest.raises(ValueError, match="seqlen=9"):
            cache.rewind(9)
