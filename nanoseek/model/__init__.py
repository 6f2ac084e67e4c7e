"""The DeepSeek-V3 model: MLA attention, DeepSeekMoE, multi-token prediction."""

from .cache import LatentCacheLayer, SlotCacheView, SlotLatentCache
from .model import IGNORE_INDEX, CausalLMOutput, DecoderLayer, DeepSeekV3, causal_lm_loss
from .moe import Router, sequence_balance_loss, update_routing_bias

__all__ = ["DeepSeekV3", "CausalLMOutput", "DecoderLayer", "LatentCacheLayer", "SlotLatentCache", "SlotCacheView", "Router", "IGNORE_INDEX",
           "causal_lm_loss", "sequence_balance_loss", "update_routing_bias"]
