"""The layout of a (possibly variable-length) batch on one flat token axis, cut into the scan's
chunks: sequence-aligned token blocks, so no chunk crosses a sequence boundary. The Triton
prefill kernels take it to walk sequences chunk by chunk (the scan) and to sum within and
across chunks (`chunked_cumsum`: the angles, the log-decay gradient)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from hybrid.kernels.tensor_cache import tensor_cache


@dataclass(frozen=True)
class ChunkTable:
    """Where each chunk starts (token), how many tokens it has, and each sequence's chunks."""

    chunk_tokens: int
    tok0: Tensor  # (n_chunks,) int32
    ntok: Tensor  # (n_chunks,) int32
    chunk_seq: Tensor  # (n_chunks,) int32, the sequence a chunk belongs to
    seq_chunk0: Tensor  # (n_seq + 1,) int32
    seq_ends: Tensor  # (n_seq,) int64, last token of each sequence
    seq_starts: Tensor  # (n_seq + 1,) int32 token offsets (cu_seqlens)
    last_token: Tensor  # (T,) bool, True at each sequence's last token
    longest: int  # chunks in the longest sequence

    @property
    def n_chunks(self) -> int:
        return self.tok0.numel()

    @property
    def n_seq(self) -> int:
        return self.seq_ends.numel()

    @classmethod
    def build(cls, seq_starts: list[int], chunk_tokens: int, device) -> ChunkTable:
        """From token offsets [0, end_1, ..., total] (cu_seqlens as host integers)."""
        tok0, ntok, chunk_seq, seq_chunk0 = [], [], [], [0]
        for seq, (start, end) in enumerate(itertools.pairwise(seq_starts)):
            if end <= start:
                raise ValueError(f"cu_seqlens must be strictly increasing, got {seq_starts}")
            for t in range(start, end, chunk_tokens):
                tok0.append(t)
                ntok.append(min(chunk_tokens, end - t))
                chunk_seq.append(seq)
            seq_chunk0.append(len(tok0))

        def as_tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=device)

        ends = as_tensor([e - 1 for e in seq_starts[1:]], torch.int64)
        last = torch.zeros(seq_starts[-1], dtype=torch.bool, device=device).index_fill_(
            0, ends, True
        )
        longest = max(b - a for a, b in itertools.pairwise(seq_chunk0))
        return cls(chunk_tokens, as_tensor(tok0), as_tensor(ntok), as_tensor(chunk_seq),
                   as_tensor(seq_chunk0), ends, as_tensor(seq_starts), last, longest)  # fmt: skip


@tensor_cache(maxsize=64)
def chunk_table(seq_starts: tuple[int, ...], chunk_tokens: int, device) -> ChunkTable:
    """Cached per layout, so repeated calls (training steps, CUDA-graph capture) copy nothing
    from the host."""
    return ChunkTable.build(list(seq_starts), chunk_tokens, device)
