"""Inference: the generation engine (slot latent cache, continuous batching, sampling, MTP speculation).

::

    from nanoseek.infer import Engine, SamplingParams
    engine = Engine(model, tokenizer, max_slots=16)
    [c] = engine.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=20))
"""

from .cache import SlotCacheView, SlotLatentCache
from .engine import Completion, Engine, EngineStats, TokenEvent
from .sampling import GenerationError, SamplingParams, sample_tokens, sampling_probs, verify_draft

__all__ = ["Engine", "EngineStats", "Completion", "TokenEvent", "SamplingParams", "GenerationError",
           "SlotLatentCache", "SlotCacheView", "sample_tokens", "sampling_probs", "verify_draft"]
