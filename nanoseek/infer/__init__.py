"""Inference: the generation engine (continuous batching over the model's slot latent cache, sampling,
MTP speculation).

::

    from nanoseek.infer import Engine, SamplingParams
    engine = Engine(model, tokenizer, max_slots=16)
    [c] = engine.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=20))
"""

import importlib

_EXPORTS = {"Completion": "engine", "Engine": "engine",
            "EngineStats": "engine", "TokenEvent": "engine", "GenerationError": "sampling",
            "SamplingParams": "sampling", "sample_tokens": "sampling", "sampling_probs": "sampling",
            "verify_draft": "sampling"}


def __getattr__(name: str):
    # Lazy, so that `nanoseek.infer.cli` (argument definitions) imports without torch.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "EngineStats", "Completion", "TokenEvent", "SamplingParams", "GenerationError",
           "sample_tokens", "sampling_probs", "verify_draft"]
