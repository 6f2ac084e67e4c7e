"""The latent KV cache: its protocol, and a slot-based cache for continuous batching.

MLA caches, per token per layer, only ``c_kv`` and the shared rotary key ``k_pe``:
``kv_lora_rank + qk_rope_head_dim`` values (576 for DeepSeek-V3) instead of the ``2·heads·head_dim``
of multi-head attention (V2 paper arXiv 2405.04434 §2.1, Table 1). 61 × 576 × 2 bytes = 70,272 bytes
per token for DeepSeek-V3 in bf16, against 61 × 128 heads × (192 + 128) × 2 bytes ≈ 5.0 MB.

What the model needs from a cache is :class:`LatentCacheLayer`. Its unit is the **step**: the main
forward of some tokens, plus optionally the MTP draft block run at the same positions (speculative
decoding). Within a step ``positions`` and writes refer to the same token positions, ``advance``
commits them and may be called again (the main forward calls it; the draft block does not move
anything); every step gets a fresh cache object, so a draft never sees the next step's positions.

:class:`SlotLatentCache` is preallocated once, one tensor per layer: ``c_kv[layer]`` [slots, max_len,
kv_lora_rank] and ``k_pe[layer]`` [slots, max_len, qk_rope_head_dim], plus one length per slot (separate
tensors per layer: a compiled step that writes a few rows of one layer then mutates that layer's
tensor only, not a copy of the whole cache). A request owns a slot
from admission to completion; rows of one batch may hold different numbers of tokens.
:meth:`SlotLatentCache.view` is one step over a batch of slots (a :class:`LatentCacheLayer`):

* ``positions(T)`` → [B, T] = ``length[slot] + arange(T)`` (per row; RoPE takes them as they are),
* ``update(layer, c_kv, k_pe)`` scatters the T new tokens of every row at its own positions and
  returns the cached latents up to ``S = max(length + T)`` with a [B, T, S] mask
  ``key_pos <= query_pos`` (so a row never sees another row's stale entries past its end),
* ``advance()`` commits: ``length[slot] = start + T``.

A view refuses a second write to a layer it has already written (that would be a second step through
one view, silently overwriting the first). ``truncate`` drops rejected speculative tokens; stale
entries past a slot's length are never visible and are overwritten later.

:meth:`SlotLatentCache.fixed_step` is the same protocol with fixed shapes, for a decode step that
``torch.compile`` captures once: rows are the first ``n`` slots, each row's start position is a
device tensor, the keys are the first ``key_len`` positions (the caller rounds the longest row up,
so a compiled graph sees few distinct lengths; the mask hides positions past each row's query), and
the slot lengths stay with the caller, who commits them after the step.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..config import ModelConfig


@runtime_checkable
class LatentCacheLayer(Protocol):
    """One step over a latent cache, as the model uses it (see the module docstring)."""

    def positions(self, seq: int) -> torch.Tensor:
        """Positions [B or 1, seq] of this step's ``seq`` tokens."""

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store this step's latents of one layer; return all cached (c_kv, k_pe) and a bool mask [B, T, S]."""

    def advance(self) -> None:
        """Commit this step's tokens (idempotent within the step)."""


class SlotLatentCache:
    """``n_slots`` independent sequences of up to ``max_len`` tokens over ``n_layers`` layers.

    ``n_layers`` defaults to the main layers plus the MTP layers (cache layer
    ``num_hidden_layers + k`` belongs to MTP module k, whose attention has that layer index).
    """

    def __init__(self, config: ModelConfig, n_slots: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, n_layers: int | None = None):
        if n_slots <= 0 or max_len <= 0:
            raise ValueError(f"SlotLatentCache needs n_slots > 0 and max_len > 0, got {n_slots}, {max_len}")
        self.n_layers = n_layers if n_layers is not None else config.num_hidden_layers + config.num_nextn_predict_layers
        self.n_slots, self.max_len, self.dtype = n_slots, max_len, dtype
        self.device = torch.device(device)
        self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
        self.c_kv = [torch.zeros(n_slots, max_len, self.kv_lora_rank, device=device, dtype=dtype)
                     for _ in range(self.n_layers)]
        self.k_pe = [torch.zeros(n_slots, max_len, self.rope_dim, device=device, dtype=dtype)
                     for _ in range(self.n_layers)]
        self.lengths = [0] * n_slots
        self.in_use = [False] * n_slots

    # ------------------------------------------------------------------ slots
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes: layers × (kv_lora_rank + qk_rope_head_dim) × dtype size."""
        return self.n_layers * (self.kv_lora_rank + self.rope_dim) * self.dtype.itemsize

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.c_kv, *self.k_pe))

    @property
    def n_free(self) -> int:
        return self.in_use.count(False)

    def allocate(self) -> int:
        """Take the lowest free slot (keeps busy slots contiguous so batches can use slices)."""
        for slot, used in enumerate(self.in_use):
            if not used:
                self.in_use[slot] = True
                self.lengths[slot] = 0
                return slot
        raise RuntimeError(f"no free cache slot (all {self.n_slots} in use)")

    def free(self, slot: int) -> None:
        self._check(slot)
        self.in_use[slot] = False
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Forget the tokens of ``slot`` from position ``length`` on (rejected speculative tokens)."""
        self._check(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def length(self, slot: int) -> int:
        self._check(slot)
        return self.lengths[slot]

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"cache slot {slot} out of range [0, {self.n_slots})")

    def view(self, slot_ids) -> SlotCacheView:
        """The cache protocol for one batch: row i of the forward is slot ``slot_ids[i]``."""
        slot_ids = [int(s) for s in slot_ids]
        for s in slot_ids:
            self._check(s)
        if len(set(slot_ids)) != len(slot_ids):
            raise ValueError(f"slot ids repeat in one batch: {slot_ids}")
        return SlotCacheView(self, slot_ids)

    def fixed_step(self, start: torch.Tensor, key_len: int | None = None) -> FixedSlotStep:
        """One step over slots ``0 .. n-1`` whose tokens start at ``start`` [n], attending over the first
        ``key_len`` positions (default all; see the module docstring)."""
        return FixedSlotStep(self, start, self.max_len if key_len is None else key_len)


class SlotCacheView:
    """One batch's window onto a :class:`SlotLatentCache` (see the module docstring)."""

    def __init__(self, cache: SlotLatentCache, slot_ids: list[int]):
        self.cache = cache
        self.slots = slot_ids
        self.start = [cache.lengths[s] for s in slot_ids]
        device = cache.device
        self._rows = torch.tensor(slot_ids, device=device, dtype=torch.long)
        self._start = torch.tensor(self.start, device=device, dtype=torch.long)
        first = slot_ids[0] if slot_ids else 0
        contiguous = slot_ids == list(range(first, first + len(slot_ids)))
        self._block = slice(first, first + len(slot_ids)) if contiguous else None
        self._t: int | None = None
        self._pos = self._mask = None
        self._written: set[int] = set()

    def positions(self, seq: int) -> torch.Tensor:
        """Positions [B, seq] of the next ``seq`` tokens of each row."""
        return self._start[:, None] + torch.arange(seq, device=self._start.device)

    def _prepare(self, seq: int) -> None:
        end = max(self.start) + seq
        if end > self.cache.max_len:
            raise ValueError(f"latent cache full: {end} tokens > max_len {self.cache.max_len}")
        self._t, self._end = seq, end
        self._pos = self.positions(seq)  # [B, T]
        keys = torch.arange(end, device=self._pos.device)
        self._mask = keys[None, None, :] <= self._pos[:, :, None]  # [B, T, S]

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = c_kv.shape
        if b != len(self.slots):
            raise ValueError(f"batch of {b} rows through a cache view of {len(self.slots)} slots")
        if not 0 <= layer_idx < self.cache.n_layers:
            raise IndexError(f"cache layer {layer_idx} out of range: this cache holds {self.cache.n_layers} layers")
        if layer_idx in self._written:
            raise RuntimeError(f"cache layer {layer_idx} written twice through one view: a view is one step; "
                               "make a new view (SlotLatentCache.view) for the next forward")
        self._written.add(layer_idx)
        if self._t != t:
            self._prepare(t)
        cache = self.cache
        c_layer, k_layer = cache.c_kv[layer_idx], cache.k_pe[layer_idx]  # [slots, max_len, ·]
        rows = self._rows[:, None]
        c_layer[rows, self._pos] = c_kv.to(cache.dtype)
        k_layer[rows, self._pos] = k_pe.to(cache.dtype)
        if self._block is not None:  # a slice is a view: no copy of the cached latents
            c_all, k_all = c_layer[self._block, : self._end], k_layer[self._block, : self._end]
        else:
            c_all, k_all = c_layer[self._rows, : self._end], k_layer[self._rows, : self._end]
        return c_all, k_all, self._mask

    def advance(self) -> None:
        """Commit the tokens of the last forward: ``length[slot] = start + T``."""
        if self._t is None:
            return
        for slot, start in zip(self.slots, self.start):
            self.cache.lengths[slot] = start + self._t


class FixedSlotStep:
    """A step of fixed shapes over the first ``n`` slots (:meth:`SlotLatentCache.fixed_step`).

    Rows past the caller's live requests are padding: they write at their ``start`` (give 0) into
    free slots, whose entries nobody reads before a prompt overwrites them. Rows must keep
    ``start + T <= key_len <= max_len``; the caller checks before the step (a compiled graph cannot raise).
    """

    def __init__(self, cache: SlotLatentCache, start: torch.Tensor, key_len: int):
        self.cache = cache
        self.start = start
        self.key_len = key_len

    def positions(self, seq: int) -> torch.Tensor:
        return self.start[:, None] + torch.arange(seq, device=self.start.device)

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = c_kv.shape
        pos = self.positions(t)
        rows = torch.arange(n, device=pos.device)[:, None].expand(n, t)
        c_layer, k_layer = self.cache.c_kv[layer_idx], self.cache.k_pe[layer_idx]
        c_layer.index_put_((rows, pos), c_kv.to(c_layer.dtype))
        k_layer.index_put_((rows, pos), k_pe.to(k_layer.dtype))
        keys = torch.arange(self.key_len, device=pos.device)
        return c_layer[:n, :self.key_len], k_layer[:n, :self.key_len], keys[None, None, :] <= pos[:, :, None]

    def advance(self) -> None:
        """Nothing: the caller owns the lengths of a fixed step (it knows which tokens it keeps)."""
