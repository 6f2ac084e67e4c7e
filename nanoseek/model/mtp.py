"""Multi-token prediction modules (V3 report §2.2, eq. 21-25).

Module k combines the previous depth's representation of token i with the embedding of token
i+k: ``h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])``, runs one transformer block, and
predicts token i+k+1 through the shared output head after its own norm (``shared_head.norm`` in hub
checkpoints). The concatenation puts the EMBEDDING FIRST, as the released weights and the serving
engines expect (the paper's equation writes the hidden state first).

Depth 1 takes the main model's final normalised hidden state; depth k > 1 takes depth k−1's block
output, which is what serving engines feed back when they chain MTP drafts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, depth_index: int, block: nn.Module):
        super().__init__()
        self.depth_index = depth_index  # 0-based; predicts the token (depth_index + 2) ahead
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def combine(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """``eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)])`` — the block's input."""
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
