"""What one step's attention needs to know: where the new K/V go and what each query reads.

The flat batch holds decode tokens first (one per request), then prefill chunks (a run of
tokens per request, possibly continuing earlier context). Each layer's cache is a pair of
tensors shaped [num_kv_heads, num_slots, head_dim]: head-major, so the context gathered
for one (request, head) is a contiguous [context, head_dim] matrix that batched matmuls
read without copies. A token at position p of a request lives in slot
``block_ids[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from livelm.layers.attention.backend import AttentionBackend
    from livelm.layers.attention.sinks import SinksSegment


@dataclass
class PrefillSegment:
    """One request's chunk of ``query_len`` tokens, rows ``query_start..`` of the batch.

    ``context_slots`` lists the slots of all its keys (earlier context and this chunk),
    or is None when the chunk starts at position 0 and attends only to itself.
    """

    query_start: int
    query_len: int
    context_slots: torch.Tensor | None
    causal_mask: torch.Tensor | None  # [query_len, context] bool, True = may attend
    # The torch path's mask for sliding layers (causal, and only each query's last
    # ``window`` keys): [query_len, context] bool; None where it equals the causal one
    # (no query of the chunk reaches past its window).
    window_mask: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Where to write this step's K/V and what each query attends to.

    The runner fills the fields every backend reads; ``backend.prepare`` adds, once per
    step, what only its own forward reads (the torch path's gather slots, bias and masks).
    """

    slot_mapping: torch.Tensor  # [T] slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] int64
    decode_lens: torch.Tensor | None  # [D] int64 context length (the new token included)
    block_size: int
    prefills: list[PrefillSegment]
    backend: AttentionBackend  # the layers call backend.forward
    # The window of the model's sliding layers (ModelConfig.sliding_window), None when no
    # layer slides; each layer passes its own (this one or None) to backend.forward.
    window: int | None = None
    # The torch decode path's (the C++ kernel reads the block tables in place):
    decode_slots: torch.Tensor | None = None  # [D, Lmax] context slots of each decoding request
    decode_bias: torch.Tensor | None = None  # [1, D, 1, Lmax] float: 0 for real keys, -inf for padding
    decode_window_bias: torch.Tensor | None = None  # the same, -inf also before each row's window
    # Chunks of kv_policy "sinks" requests (layers/attention/sinks.py), after the decodes.
    sinks: list[SinksSegment] = field(default_factory=list)
