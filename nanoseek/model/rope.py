"""Rotary position embedding with YaRN context extension, as DeepSeek-V3 uses it.

RoPE (Su et al., arXiv 2104.09864) rotates pairs of channels by position-dependent angles. YaRN
(Peng et al., arXiv 2309.00071) blends interpolated and original frequencies across a correction
range and changes the attention temperature; DeepSeek-V2/V3 apply that temperature as ``mscale²`` on
the softmax scale (V2 paper, appendix on YaRN; V3 report §4.3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``qk_rope_head_dim/2``) and the factor applied to cos/sin.

    Without scaling the factor is 1. With YaRN it is ``mscale(factor, mscale) /
    mscale(factor, mscale_all_dim)`` (1 for DeepSeek-V3, where both are 1.0), unless the config
    gives ``attention_factor`` directly.
    """
    dim = config.qk_rope_head_dim
    base = float(config.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq_extra = 1.0 / pos_freqs
    if not config.yarn_enabled:
        return inv_freq_extra, 1.0

    scaling = config.rope_scaling
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor, 1.0)

    def correction_dim(num_rotations: float) -> float:
        # The channel index whose wavelength completes num_rotations over the original context.
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1.0 - ramp  # 1: high-frequency channels keep their frequency (extrapolate)
    inv_freq = (inv_freq_extra / factor) * (1 - keep_original) + inv_freq_extra * keep_original
    return inv_freq, float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """``1/sqrt(qk_nope + qk_rope)``, times ``mscale(factor, mscale_all_dim)²`` when YaRN is on."""
    scale = config.qk_head_dim ** -0.5
    if config.yarn_enabled and config.rope_scaling.get("mscale_all_dim"):
        m = yarn_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"])
        scale *= m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape ``[..., T, qk_rope_head_dim/2]`` in float32 for given positions."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` in place (after ``to_empty`` from the meta device)."""
        inv_freq, self.attention_factor = rope_frequencies(self.config)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` [B, T, heads, d] by (cos, sin) [B or 1, T, d/2].

    ``interleaved`` (HF ``rope_interleave=True``, DeepSeek's layout) pairs channels (0,1), (2,3), …;
    otherwise channel i pairs with i + d/2. The output is in the half-split layout either way; q and
    k go through the same function, so their dot products equal the in-place rotation.
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x1f, x2f = x1.float(), x2.float()
    out = torch.cat((x1f * cos - x2f * sin, x2f * cos + x1f * sin), dim=-1)
    return out.to(x.dtype)
