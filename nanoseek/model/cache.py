"""A preallocated latent KV cache: per layer, only ``c_kv`` and the shared rotary key ``k_pe``.

Per token per layer it holds ``kv_lora_rank + qk_rope_head_dim`` values (576 for DeepSeek-V3)
instead of the ``2·heads·head_dim`` of multi-head attention (V2 paper §2.1, Table 1).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class StaticLatentCache:
    """Cache for ``batch`` rows of up to ``max_len`` tokens over ``n_layers`` attention layers.

    Every row advances by the same number of tokens per forward, so one ``length`` counts the
    tokens each row holds. A query at position p sees the cached keys at positions ≤ p.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, n_layers: int | None = None):
        n_layers = n_layers if n_layers is not None else config.num_hidden_layers + config.num_nextn_predict_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(n_layers, batch, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(n_layers, batch, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.length = 0
        self._pending = 0  # tokens of the forward in flight (positions length .. length+pending)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype, n_layers: int | None = None) -> int:
        n_layers = n_layers if n_layers is not None else config.num_hidden_layers
        return n_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize

    def positions(self, seq: int) -> torch.Tensor:
        """Positions [1, seq] of the next ``seq`` tokens (the same for every row)."""
        return torch.arange(self.length, self.length + seq, device=self.c_kv.device)[None]

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = c_kv.shape
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"latent cache full: {end} tokens > max_len {self.max_len}")
        self.c_kv[layer_idx, :b, self.length:end] = c_kv
        self.k_pe[layer_idx, :b, self.length:end] = k_pe
        self._pending = t
        pos = self.positions(t)[0]
        mask = torch.arange(end, device=pos.device)[None, :] <= pos[:, None]  # [T, end]
        return self.c_kv[layer_idx, :b, :end], self.k_pe[layer_idx, :b, :end], mask.expand(b, t, end)

    def advance(self) -> None:
        """Commit the tokens written by the last forward (called once per model forward)."""
        self.length += self._pending
        self._pending = 0
