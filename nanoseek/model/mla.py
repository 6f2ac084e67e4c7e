"""Multi-head Latent Attention (DeepSeek-V2 paper arXiv 2405.04434 §2.1; V3 report §2.1.1, eq. 1-11).

Keys and values are rebuilt from a compressed latent ``c_kv`` (``kv_lora_rank`` values per token)
plus one rotary key ``k_pe`` shared by all heads, so an inference cache holds only
``kv_lora_rank + qk_rope_head_dim`` numbers per token per layer.

Two ways to compute the same attention:

* expanded (training, prefill without cache): ``kv_b_proj`` expands ``c_kv`` into per-head
  ``k_nope`` and ``v``; scaled-dot-product attention runs on ``[q_nope; q_pe]·[k_nope; k_pe]``.
* absorbed (decode over the latent cache): the key half of ``kv_b_proj`` is folded into the query
  (``q_lat = W_uk^T q_nope``) and the value half into the output (``o = W_uv · (p @ c_kv)``), so
  attention runs directly on the cached latents (V2 paper §2.1.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import LatentCacheLayer
from .layers import RMSNorm, computed_input, computed_weight
from .rope import apply_rope, softmax_scale


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.qk_nope = config.qk_nope_head_dim
        self.qk_rope = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleaved = config.rope_interleave
        self.scale = softmax_scale(config)
        q_out = self.n_heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope,
                                            bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.hidden_size, bias=config.attention_bias)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(*x.shape[:-1], self.n_heads, self.qk_nope + self.qk_rope)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheLayer | None = None) -> torch.Tensor:
        """x [B, T, H] → [B, T, H]; causal. With ``cache``, attends over cached + new latents."""
        b, t, _ = x.shape
        q = self._queries(x)
        q_nope, q_pe = q.split([self.qk_nope, self.qk_rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleaved)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleaved).squeeze(2)
        if cache is None:
            out = self._attend_expanded(q_nope, q_pe, c_kv, k_pe)
        else:
            # the cache holds c_kv as kv_b_proj consumes it, so both paths compute the same thing
            c_all, k_pe_all, mask = cache.update(self.layer_idx, computed_input(self.kv_b_proj, c_kv), k_pe)
            out = self.attend_absorbed(q_nope, q_pe, c_all, k_pe_all, mask)
        return self.o_proj(out.reshape(b, t, self.n_heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe) -> torch.Tensor:
        b, t = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv).view(b, t, self.n_heads, self.qk_nope + self.v_dim)
        k_nope, v = kv.split([self.qk_nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            # the fused (flash) kernels want one head size for q, k and v; without it PyTorch falls back
            # to the math path that materialises every [T, T] score (~2x slower on the CPU)
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale)
        return out.transpose(1, 2)[..., : self.v_dim]  # [B, T, heads, v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Split ``kv_b_proj``'s computed weight (FP8-quantised after ``convert_to_fp8``) into
        W_uk [heads, qk_nope, r] and W_uv [heads, v, r]."""
        w = computed_weight(self.kv_b_proj).view(self.n_heads, self.qk_nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope], w[:, self.qk_nope:]

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                        k_pe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention on latents: q [B,T,h,·], c_kv [B,S,r], k_pe [B,S,rope], mask [B,T,S] (True = visible)."""
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_lat, c_kv)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)).float() * self.scale
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
