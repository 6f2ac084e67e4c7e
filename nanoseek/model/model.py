"""The DeepSeek-V3 causal language model: one definition for pretraining, SFT, RL and inference.

Parameter names follow ``transformers``' ``DeepseekV3ForCausalLM`` (``model.layers.{i}.self_attn…``)
so checkpoints map one-to-one, except that routed experts are stored stacked per layer and the MTP
modules live under ``mtp.{k}`` (hub files keep them at layer index ``num_hidden_layers + k``;
:mod:`nanoseek.hf` converts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .cache import LatentCacheLayer
from .layers import RMSNorm, SwiGLU
from .mla import MultiHeadLatentAttention
from .moe import DeepSeekMoE, MoEStats, RoutedExperts, Router
from .mtp import MTPModule
from .rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What a forward returns. Losses are set only when ``labels`` are given.

    ``loss = lm_loss + mtp_loss_weight·mtp_loss + aux_loss``; ``expert_load`` [rows, E] counts the
    tokens each routed expert received: one row per main-model MoE layer, in order, followed by one
    per MoE block of the MTP modules when they ran (a forward with labels and no cache). Its rows
    pair with the first rows of :meth:`DeepSeekV3.moe_routers`; the trainer feeds them to the
    auxiliary-loss-free bias update, so the MTP routers are balanced like the others.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final normalised hidden states (MTP drafting uses them)
    mtp_logits: list[torch.Tensor] | None = None


class DecoderLayer(nn.Module):
    """Pre-norm block: MLA then (dense SwiGLU | DeepSeekMoE), each with a residual connection."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCacheLayer | None = None, balance_alpha: float = 0.0
                ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h, balance_alpha)
            return x + out, stats
        return x + self.mlp(h), None


class DeepSeekV3Model(nn.Module):
    """Embedding, decoder layers and final norm (``model.*`` in checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 with optional MTP modules. ``model(input_ids)`` → :class:`CausalLMOutput`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DeepSeekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_layers = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPModule(config, k, DecoderLayer(config, n_layers + k))
            for k in range(config.num_nextn_predict_layers))
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, ``initializer_range``) for matrices and embeddings, ones for norms, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Recompute buffers that checkpoints do not hold (RoPE frequencies), e.g. after ``to_empty``."""
        self.model.rotary_emb.reset_buffers()

    def moe_routers(self) -> list[Router]:
        """Every MoE router, in the row order of ``expert_load``: the main layers', then the MTP blocks'."""
        blocks = [*self.model.layers, *(module.block for module in self.mtp)]
        return [block.mlp.gate for block in blocks if block.is_moe]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: LatentCacheLayer | None = None,
                mtp_loss_weight: float | None = None, aux_loss_alpha: float | None = None,
                return_hidden: bool = False) -> CausalLMOutput:
        """Run the model on ``input_ids`` [B, T].

        ``labels`` [B, T] are the targets aligned with the inputs (``labels[:, i]`` is the token that
        should follow position i, already shifted; ``-100`` is ignored). With labels the output holds
        the LM loss, the MTP loss over depths 1..D (depth k at position i predicts ``labels[:, i+k]``)
        and the sequence-wise balance loss when ``aux_loss_alpha`` > 0. ``cache`` switches attention
        to the absorbed path over a latent cache (inference); the MTP modules do not run then.
        """
        cfg = self.config
        lam = cfg.mtp_loss_weight if mtp_loss_weight is None else mtp_loss_weight
        alpha = (cfg.aux_loss_alpha if aux_loss_alpha is None else aux_loss_alpha) if labels is not None else 0.0
        if position_ids is None:
            position_ids = (cache.positions(input_ids.shape[1]) if cache is not None
                            else torch.arange(input_ids.shape[1], device=input_ids.device)[None])
        cos, sin = self.model.rotary_emb(position_ids)
        embeds = self.model.embed_tokens(input_ids)
        hidden, stats = self._run_layers(self.model.layers, embeds, cos, sin, cache, alpha)
        if cache is not None:
            cache.advance()
        hidden = self.model.norm(hidden)
        logits = self.lm_head(hidden)
        out = CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden else None)
        if labels is not None:
            out.lm_loss = causal_lm_loss(logits, labels)
            if self.mtp and cache is None:
                out.mtp_loss, out.mtp_logits, mtp_stats = self._mtp_loss(hidden, input_ids, labels, cos, sin, alpha)
                stats += mtp_stats
        if stats:
            out.expert_load = torch.stack([s.expert_load for s in stats])
        if labels is None:
            return out

        balance = [s.balance_loss for s in stats if s.balance_loss is not None]
        loss = out.lm_loss
        if out.mtp_loss is not None:
            loss = loss + lam * out.mtp_loss
        if balance:
            out.aux_loss = torch.stack(balance).sum()
            loss = loss + out.aux_loss
        out.loss = loss
        return out

    def _run_layers(self, layers, x, cos, sin, cache, alpha) -> tuple[torch.Tensor, list[MoEStats]]:
        stats = []
        for layer in layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x, s = checkpoint(layer, x, cos, sin, None, alpha, use_reentrant=False)
            else:
                x, s = layer(x, cos, sin, cache, alpha)
            if s is not None:
                stats.append(s)
        return x, stats

    def _mtp_loss(self, hidden, input_ids, labels, cos, sin, alpha):
        """Mean over depths k = 1..D of the CE of predicting ``labels[:, i+k]`` (V3 report eq. 24-25).

        Returns (loss, logits per depth, the MoE statistics of the depths' blocks).
        """
        seq = input_ids.shape[1]
        losses, all_logits, all_stats = [], [], []
        prev = hidden
        for k, module in enumerate(self.mtp, start=1):
            if seq - k <= 0:
                break
            next_embeds = self.model.embed_tokens(input_ids[:, k:])
            x = module.combine(prev[:, : seq - k], next_embeds)
            x, stats = self._run_layers([module.block], x, cos[:, : seq - k], sin[:, : seq - k], None, alpha)
            all_stats += stats
            logits = self.lm_head(module.norm(x))
            losses.append(causal_lm_loss(logits, labels[:, k:]))
            all_logits.append(logits)
            prev = x
        if not losses:
            return hidden.new_zeros(()), all_logits, all_stats
        return torch.stack(losses).mean(), all_logits, all_stats

    def mtp_draft_logits(self, module_index: int, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                         position_ids: torch.Tensor | None = None, cache: LatentCacheLayer | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module on its own (speculative drafting): returns (logits, block output).

        With ``cache`` — the same step object the main forward just ran through — the block attends
        over its own cache layer (index ``num_hidden_layers + module_index``) at that forward's
        positions (``cache.positions(T)``); the main forward's ``advance`` already committed them
        (see :mod:`nanoseek.model.cache`).
        """
        module = self.mtp[module_index]
        if position_ids is None:
            if cache is None:
                raise ValueError("mtp_draft_logits needs position_ids or a cache")
            position_ids = cache.positions(next_ids.shape[1])
        cos, sin = self.model.rotary_emb(position_ids)
        x = module.combine(prev_hidden, self.model.embed_tokens(next_ids))
        x, _ = module.block(x, cos, sin, cache, 0.0)
        return self.lm_head(module.norm(x)), x

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.gradient_checkpointing = enabled

    def num_parameters(self, include_mtp: bool = False) -> int:
        params = {id(p): p for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp.")}
        return sum(p.numel() for p in params.values())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy in float32 over positions whose label is not ``-100``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
