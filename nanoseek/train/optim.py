"""AdamW with decay / no-decay parameter groups, and the step schedules (LR, γ, λ).

Every schedule is a pure function of the 0-based step index and the :class:`TrainConfig`, so a
resumed run recomputes exactly the values an uninterrupted run would have used.

Weight decay (V3: 0.1) applies to every matrix — attention and MLP projections, the stacked routed
experts, the router weights, the MTP projection, the output head and the token embedding. It does not
apply to RMSNorm scales or biases (every 1-D parameter). The embedding is decayed like the other
matrices, as Megatron-LM (on which DeepSeek's HAI-LLM framework is modelled) does by default; set
``TrainConfig.decay_embeddings = False`` to exclude it (the OLMo / some-GPT-recipes choice). The
router's ``e_score_correction_bias`` is a buffer, not a parameter: only the balancing rule moves it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..device import autocast_dtype
from ..errors import ConfigError
from .config import TrainConfig
from .distributed import is_sharded
from .muon import NS_STEPS, MuonAdamW, muon_param_names


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd, "names": ...}, {"params": rest, "weight_decay": 0, ...}]``.

    Shared (tied) parameters are listed once. Parameters with ``requires_grad=False`` are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, decay_names, no_decay_names, seen = [], [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim >= 2
        if is_matrix and (decay_embeddings or id(p) not in embeddings):
            decay.append(p)
            decay_names.append(name)
        else:
            no_decay.append(p)
            no_decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def train_top_layers(model: nn.Module, n_layers: int) -> int:
    """Leave only the last ``n_layers`` decoder layers, the final RMSNorm and the output head
    trainable (``requires_grad``); everything below them, and the MTP modules, is frozen. A tied
    embedding stays trainable with the head it shares. ``n_layers = 0`` changes nothing.
    Returns how many parameters are trainable.

    Backward then stops at the lowest trainable layer, and AdamW (which moves every coordinate it
    holds by about ``lr`` per step whatever the gradient's size) cannot random-walk the frozen ones;
    on the cpu speedrun's model this is what keeps GRPO's noisy small-batch gradients from eroding
    it (README, "Speedrun results").
    """
    layers = model.model.layers
    if not 0 <= n_layers <= len(layers):
        raise ValueError(f"train_layers must be between 0 and {len(layers)} (the model's decoder layers), "
                         f"got {n_layers}")
    if n_layers:
        model.requires_grad_(False)
        for module in (*layers[len(layers) - n_layers:], model.model.norm, model.lm_head):
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # a tied weight counts once


def build_optimizer(model: nn.Module, cfg, device: torch.device, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (trainable parameters only); ``fused`` on CUDA, ``foreach``
    elsewhere. ``cfg`` is any stage's config with ``weight_decay``, ``betas``, ``eps`` (and
    ``decay_embeddings``, default True; ``optimizer = "muon"`` moves the hidden matrices to Muon,
    :class:`~nanoseek.train.muon.MuonAdamW`); ``lr`` defaults to the TrainConfig schedule's first value."""
    groups = param_groups(model, cfg.weight_decay, getattr(cfg, "decay_embeddings", True))
    lr = lr_at(0, cfg) if lr is None else lr
    if getattr(cfg, "optimizer", "adamw") == "muon":
        if is_sharded(model):
            raise ConfigError("optimizer 'muon' needs whole matrices and does not support FSDP2-sharded models "
                              "(torchrun) yet; use --optimizer adamw there")
        return MuonAdamW(muon_groups(model, groups), lr=lr, betas=cfg.betas, eps=cfg.eps,
                         momentum=cfg.muon_momentum, ns_steps=getattr(cfg, "muon_ns_steps", NS_STEPS),
                         foreach=device.type != "cuda" or None,
                         ns_dtype=autocast_dtype(device, getattr(cfg, "precision", "float32")) or torch.float32)
    for g in groups:
        g.pop("names")
    groups = [g for g in groups if g["params"]]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def muon_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """:func:`param_groups`' groups split into Muon's matrices (``muon=True``, one group per number
    of stacked row ``blocks``) and the AdamW rest, empty groups dropped; ``names`` is consumed."""
    on_muon = muon_param_names(model)
    out = []
    for g in groups:
        named = list(zip(g["params"], g.pop("names")))
        for blocks in sorted(set(on_muon.values())):
            out.append({"params": [p for p, n in named if on_muon.get(n) == blocks],
                        "weight_decay": g["weight_decay"], "muon": True, "blocks": blocks})
        out.append({"params": [p for p, n in named if n not in on_muon], "weight_decay": g["weight_decay"],
                    "muon": False})
    return [g for g in out if g["params"]]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based step ``step``: linear warmup to ``lr`` over ``warmup_steps`` steps
    (step 0 gets ``lr/warmup_steps``), then cosine decay to ``min_lr`` at ``max_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def bias_speed_at(step: int, cfg: TrainConfig) -> float:
    """γ of 0-based step ``step``: ``bias_update_speed``, then 0 for the last
    ``bias_update_stop_fraction`` of the steps (V3: γ = 0 for the last 500B of 14.8T tokens)."""
    if step >= (1.0 - cfg.bias_update_stop_fraction) * cfg.max_steps:
        return 0.0
    return cfg.bias_update_speed


def mtp_weight_at(step: int, cfg: TrainConfig) -> float:
    """λ of 0-based step ``step``: ``mtp_loss_weight`` for the first ``mtp_switch_fraction`` of the
    steps, then ``mtp_loss_weight_late`` (V3: 0.3 for the first 10T tokens, 0.1 after)."""
    if step >= cfg.mtp_switch_fraction * cfg.max_steps:
        return cfg.mtp_loss_weight_late
    return cfg.mtp_loss_weight
