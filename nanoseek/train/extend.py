"""``nanoseek extend``: context extension with YaRN, DeepSeek-V3's stage between pretraining and SFT.

V3 (report §4.3) extends its 4K pretraining context in two phases of ~1,000 steps each, 4K → 32K →
128K, with YaRN (Peng et al., arXiv 2309.00071) applied to the decoupled RoPE key only, and the same
YaRN settings in both phases: scale ``s = 40``, ``α = 1`` (``beta_slow``), ``β = 32`` (``beta_fast``),
attention temperature ``√t = 0.1·ln s + 1`` (``mscale = mscale_all_dim = 1``). The published
``config.json`` spells that as ``rope_scaling = {"type": "yarn", "factor": 40,
"original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
"beta_slow": 1}`` with ``max_position_embeddings = 4096·40``.

A run here is a pretraining run (same data handling, guard, checkpoints, cost meter) that starts from
``--init-from CKPT`` with that ``rope_scaling`` written into the model's config, so the checkpoint it
writes means the same to ``transformers``. A second phase starts from the first one's output: the
original context stays the one the model was pretrained at, only ``--seq-len`` (and optionally the
factor) grows. Its cost lands in ``cost.json`` as the stage ``extend``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..config import ModelConfig
from ..errors import ConfigError, NanoseekError
from ..model import DeepSeekV3
from .config import ExtendConfig
from .pretrain import Trainer, run_stage
from .sft import check_stage

STAGE = "extend"

#: The YaRN settings V3 uses in both extension phases (report §4.3; DeepSeek-V3's config.json).
V3_YARN = {"mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}


def yarn_extended(config: ModelConfig, factor: float, original: int | None = None) -> ModelConfig:
    """``config`` with V3's YaRN ``rope_scaling`` for ``factor`` and ``max_position_embeddings =
    original × factor`` (``transformers`` derives the attention temperature from that ratio, so the two
    must agree). ``original`` defaults to the config's own YaRN original, else its
    ``max_position_embeddings`` (a model that has not been extended yet)."""
    current = config.rope_scaling if config.yarn_enabled else None
    if original is None:
        original = current["original_max_position_embeddings"] if current else config.max_position_embeddings
    if not factor > 1:
        raise ConfigError(f"extend: --factor must be > 1, got {factor!r}")
    if current and current["original_max_position_embeddings"] != original:
        raise ConfigError(f"extend: the checkpoint was already extended from an original context of "
                          f"{current['original_max_position_embeddings']} tokens; --original-context {original} "
                          f"contradicts it (a second phase keeps the first one's original)")
    new_context = original * factor
    if abs(new_context - round(new_context)) > 1e-9:
        raise ConfigError(f"extend: original context {original} × factor {factor} = {new_context} is not a whole "
                          f"number of positions")
    scaling = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
               **V3_YARN}
    return config.replace(rope_scaling=scaling, max_position_embeddings=int(round(new_context)))


class ExtendTrainer(Trainer):
    """The pretraining loop, started from ``init_from`` with its config extended by YaRN."""

    stage = STAGE

    def initial_model(self, model_cfg: ModelConfig) -> DeepSeekV3:
        cfg = self.cfg
        extended = yarn_extended(model_cfg, cfg.factor, cfg.original_max_position_embeddings)
        if cfg.seq_len > extended.max_position_embeddings:
            raise ConfigError(f"extend: --seq-len {cfg.seq_len} exceeds the extended context "
                              f"{extended.max_position_embeddings} (original × --factor)")
        scaling = extended.rope_scaling
        self.log(f"extend: YaRN factor {scaling['factor']:g}, original context "
                 f"{scaling['original_max_position_embeddings']} → {extended.max_position_embeddings} positions; "
                 f"training at {cfg.seq_len} tokens per sequence")
        weights = super().initial_model(model_cfg).state_dict()
        model = DeepSeekV3(extended)
        model.load_state_dict(weights)
        return model


def extend(out: str | os.PathLike, overrides: dict[str, Any], resume: bool = False, log: Callable = print) -> dict:
    """Run (or ``resume``) a context-extension phase in ``out``; ``overrides`` are
    :class:`ExtendConfig` fields. Returns the trainer's summary (``final``: ``out/final``)."""
    run_dir = Path(out).expanduser().resolve()
    if resume:
        check_stage(run_dir, STAGE)
    else:
        if overrides.get("init_from") is None:
            raise NanoseekError("extend needs --init-from CKPT (the pretrained model whose context to extend)")
        if overrides.get("factor") is None:
            raise NanoseekError("extend needs --factor F (the YaRN scale: new context = original × F)")
        for key in ("preset", "config"):
            if overrides.get(key) is not None:
                raise NanoseekError(f"extend starts from --init-from; --{key} does not apply")
        # the YaRN settings' errors before any data work (the trainer applies them again)
        yarn_extended(ModelConfig.from_json(overrides["init_from"]), overrides["factor"],
                      overrides.get("original_max_position_embeddings"))
    return run_stage(run_dir, overrides, resume, log, ExtendTrainer, ExtendConfig)
