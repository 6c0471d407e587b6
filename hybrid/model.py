"""HybridLM: embedding -> pre-norm residual blocks (one per pattern character) -> final
RMSNorm -> head tied to the embedding. Whole-sequence forward for training, and
prefill/step/generate over an `InferenceCache` for decoding."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from hybrid.cache import InferenceCache
from hybrid.config import ModelConfig
from hybrid.devices import autocast_dtype, on_device
from hybrid.graphs import capture_cuda_graph
from hybrid.kernels.norms import add_rms_norm
from hybrid.kernels.small_batch_linear import add_rms_norm_linear, embed_rms_norm_linear
from hybrid.layers import build
from hybrid.layers.linear import Linear
from hybrid.layers.norms import RMSNorm
from hybrid.layers.registry import Layer

DECODE_ROOM = 1024  # tokens `prefill` leaves for decoding when max_seqlen is not given


class Block(nn.Module):
    """A pre-norm residual block, x + layer(RMSNorm(x)). `HybridLM` runs its blocks with each
    add fused into the next block's norm (`HybridLM._run_blocks`)."""

    def __init__(self, layer: Layer, d_model: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(d_model, eps, device=device, dtype=dtype)
        self.layer = layer


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        # on the meta device (sizes only: a search space's checks) the embedding skips its
        # own init, which `reset_parameters` replaces anyway: torch's first `normal_` on
        # meta costs ~0.9 s of lazy set-up per process
        meta = device is not None and torch.device(device).type == "meta"
        shape = (config.vocab_size, config.d_model)
        self.embedding = nn.Embedding(
            *shape, _weight=torch.empty(shape, **factory) if meta else None, **factory
        )
        self.blocks = nn.ModuleList(
            Block(
                build(spec, config.d_model, **factory), config.d_model, config.norm_eps, **factory
            )
            for spec in config.layers
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, **factory)
        self.lm_head = Linear(config.d_model, config.vocab_size, **factory)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embedding N(0, 0.02); every projection that writes into the residual stream is
        re-drawn with PyTorch's default (Kaiming-uniform) and divided by √n_layers, as
        mamba_ssm does for out_proj; everything else keeps its layer's own init."""
        if self.embedding.weight.device.type == "meta":
            return
        nn.init.normal_(self.embedding.weight, std=0.02)
        scale = 1.0 / math.sqrt(len(self.blocks))
        for module in self.modules():
            if getattr(module, "is_residual_out", False):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                module.weight.mul_(scale)

    def forward(
        self, tokens: Tensor, cache: InferenceCache | None = None, *, last_only: bool = False
    ) -> Tensor:
        """tokens (Bt, L) -> logits (Bt, L, vocab); with a cache, continue from it. last_only
        gives the last position's logits (Bt, 1, vocab), all a generation needs: at batch 128
        × 2048 tokens the full logits would take gigabytes."""
        if cache is not None:
            self._check_room(cache, tokens.shape[1])
        caches = [None] * len(self.blocks) if cache is None else cache.layers
        x, out = self._run_blocks(tokens, caches)
        if cache is not None:
            cache.seqlen += tokens.shape[1]
        if last_only:
            x, out = x[:, -1:], out[:, -1:]
        return self._head(x, out)

    def _run_blocks(
        self, tokens: Tensor, caches: list, decode: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The blocks over the embedded tokens: each layer's forward, or its decode `step`.
        Each residual add is fused into the next norm (`add_rms_norm`; in a decode step an add
        kernel a block is ~1.4 µs of a ~300 µs step at batch 1 on an H100). In a decode step
        a layer with a `step_projection` gets its input projected with the norm in that
        projection's kernel where it can (`add_rms_norm_linear`: one norm kernel a block
        fewer), and the first block's kernel gathers the embedding rows itself
        (`embed_rms_norm_linear`: no embedding kernel). Returns the residual stream up to the
        last block and that block's output, which the head's norm adds. Under autocast the
        norms write the autocast dtype: every layer's first operation on its input is a
        projection that autocast casts to it anyway, and written so by the norm kernel the
        cast costs no kernel of its own either way (graphed training +6.8% at 21M on an H100:
        BENCHMARKS.md); else the stream's dtype (None)."""
        x = out = None
        normed_dtype = autocast_dtype(self.embedding.weight)
        for block, layer_cache in zip(self.blocks, caches, strict=True):
            layer, norm = block.layer, block.norm
            projection = layer.step_projection() if decode else None
            if projection is not None:
                if x is None:
                    x, projected = embed_rms_norm_linear(
                        self.embedding.weight, tokens, norm.weight, norm.eps, projection.weight
                    )
                else:
                    x, projected = add_rms_norm_linear(
                        x, out, norm.weight, norm.eps, projection.weight
                    )
                out = layer.step_projected(projected, layer_cache)
                continue
            if x is None:
                x = self.embedding(tokens)
            x, normed = add_rms_norm(x, out, norm.weight, norm.eps, normed_dtype)
            out = layer.step(normed, layer_cache) if decode else layer(normed, layer_cache)
        return x, out

    def _head(self, x: Tensor, out: Tensor) -> Tensor:
        """Logits from the residual stream x plus the last block's output: its norm and the
        head's projection (one kernel where `add_rms_norm_linear` can)."""
        return add_rms_norm_linear(x, out, self.norm.weight, self.norm.eps, self.lm_head.weight)[1]

    def forward_in_pieces(self, tokens: Tensor, cache: InferenceCache, piece_tokens: int) -> Tensor:
        """`forward(tokens, cache, last_only=True)` over at most piece_tokens (batch × length)
        tokens at a time: the same logits and cache, with activation memory bounded (a MIMO
        prefill of 128 × 2048 tokens in one forward needs more than an 80 GB card)."""
        piece = max(1, piece_tokens // tokens.shape[0])
        for start in range(0, tokens.shape[1], piece):
            logits = self.forward(tokens[:, start : start + piece], cache, last_only=True)
        return logits

    def allocate_cache(
        self, batch: int, max_seqlen: int, *, dtype: torch.dtype | None = None
    ) -> InferenceCache:
        device = self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        return InferenceCache(
            [
                b.layer.allocate_cache(batch, max_seqlen, device=device, dtype=dtype)
                for b in self.blocks
            ],
            max_seqlen=max_seqlen,
        )

    @torch.no_grad()
    def prefill(
        self, tokens: Tensor, max_seqlen: int | None = None
    ) -> tuple[Tensor, InferenceCache]:
        """Run the prompt, returning (logits (Bt, L, vocab), a cache ready for `step`).

        max_seqlen bounds prompt plus generated tokens (default: prompt + DECODE_ROOM); only
        attention's KV cache grows with it. prefill and step record no autograd history: the
        cache's in-place updates would otherwise chain every token's graph to the next (a
        2-layer model's 1,500 steps grew by 9 GB).
        """
        cache = self.allocate_cache(tokens.shape[0], max_seqlen or tokens.shape[1] + DECODE_ROOM)
        return self.forward(tokens, cache), cache

    @torch.no_grad()
    def step(self, token: Tensor, cache: InferenceCache) -> Tensor:
        """One token per sequence (Bt,) -> next-token logits (Bt, vocab)."""
        self._check_room(cache, 1)
        x, out = self._run_blocks(token, cache.layers, decode=True)
        cache.seqlen += 1
        return self._head(x, out)

    def graphed_step(self, cache: InferenceCache, batch: int) -> Callable[[Tensor], Tensor]:
        """`step` on `cache` captured once as a CUDA graph and replayed for every token:
        token (Bt,) -> logits (Bt, vocab) at any position (positions live on the device).
        Capturing runs one real step, so the cache is reset afterwards: capture before the
        prefill. The returned logits are the graph's own tensor, overwritten by the next call."""
        device = self.embedding.weight.device
        if device.type != "cuda":
            raise ValueError(f"graphed_step needs a model on CUDA (this one is on {device}): "
                             "use step")  # fmt: skip
        token = torch.zeros(batch, dtype=torch.long, device=device)
        out: dict[str, Tensor] = {}

        def step() -> None:
            out["logits"] = self.step(token, cache)

        with on_device(device):  # the capture's streams are the current device's
            replay = capture_cuda_graph(step, warmup=1)
        cache.reset()

        def run(next_token: Tensor) -> Tensor:
            self._check_room(cache, 1)
            token.copy_(next_token)
            replay()
            cache.advance(1)
            return out["logits"]

        return run

    @torch.inference_mode()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool = False,
    ) -> Tensor:
        """Sample continuations (Bt, L) -> (Bt, L + max_new_tokens); temperature 0 is greedy.
        cuda_graph replays one captured step per token on CUDA (eager elsewhere)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; allowed: >= 0")
        batch, length = prompt.shape
        cache = self.allocate_cache(batch, length + max_new_tokens)
        graphed = cuda_graph and prompt.is_cuda and max_new_tokens > 1
        step = self.graphed_step(cache, batch) if graphed else lambda t: self.step(t, cache)
        next_logits = self(prompt, cache, last_only=True)[:, -1]
        tokens = [prompt]
        for i in range(max_new_tokens):
            token = sample(next_logits, temperature, top_k, generator)
            tokens.append(token[:, None])
            if i + 1 < max_new_tokens:
                next_logits = step(token)
        return torch.cat(tokens, dim=1)

    def _check_room(self, cache: InferenceCache, n_new: int) -> None:
        if cache.seqlen + n_new > cache.max_seqlen:
            raise ValueError(
                f"cache holds max_seqlen={cache.max_seqlen} tokens, {cache.seqlen} used; "
                f"{n_new} more do not fit"
            )

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied weights once); non_embedding drops the embedding/head matrix."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def state_bytes(self, context: int, dtype: torch.dtype = torch.bfloat16) -> int:
        """Inference-cache bytes per sequence at `context` tokens."""
        return sum(b.layer.state_bytes(context, dtype) for b in self.blocks)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token when prefilling `seq_len` tokens, head included."""
        head = 2 * self.config.d_model * self.config.vocab_size
        return head + sum(b.layer.flops_per_token(seq_len) for b in self.blocks)


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token (Bt,) from logits (Bt, vocab)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is invalid; allowed: >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid; allowed: a positive integer, or None (all)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
