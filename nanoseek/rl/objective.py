"""The GRPO objective and its DAPO / Dr. GRPO variants as pure tensor functions.

Nothing here samples, calls a model or touches an optimizer: a trainer computes per-token log-probs
of the sampled completions and hands them over. Shapes: ``N`` completions (``P`` prompts × ``G``
samples per prompt, prompt-major, i.e. completion ``n`` belongs to prompt ``n // G``), ``T`` padded
completion length; ``mask`` [N, T] marks real completion tokens (bool or 0/1).

GRPO (DeepSeekMath arXiv 2402.03300 §4.1, eq. 3; DeepSeek-R1 arXiv 2501.12948 eq. 1-3)::

    J(θ) = E_q E_{o_1..o_G ~ π_old} (1/G) Σ_i (1/|o_i|) Σ_t
           [ min(ρ_it Â_i, clip(ρ_it, 1−ε, 1+ε) Â_i) − β D_KL(π_θ ‖ π_ref)_it ]
    ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t)
    Â_i  = (r_i − mean(r_1..r_G)) / std(r_1..r_G)                                   (R1 eq. 3)
    D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1            (the "k3" estimator, R1 eq. 2; ≥ 0 per token)

We minimise ``loss = −J``. Variants:

- DAPO (arXiv 2503.14476): clip-higher (ε_low = 0.2, ε_high = 0.28), dynamic sampling (drop groups
  whose G rewards are all equal: their advantages are all zero), token-level averaging (eq. 12:
  Σ over every token of the batch / total token count) and overlong reward shaping (eq. 13).
- Dr. GRPO (arXiv 2503.20783): Â_i = r_i − mean(r) (no division by std) and no 1/|o_i|: each
  response's token sum is divided by a constant (the generation budget), then averaged.

Typical use::

    cfg = GRPOConfig.dapo()
    adv = group_advantages(rewards, cfg.group_size, scale_by_std=cfg.scale_adv_by_std)   # [N]
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, beta=cfg.beta,
                            eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_mode=cfg.loss_mode,
                            max_len=cfg.loss_max_len)
    loss.backward()

Log-probs must come from the same distribution that sampled: if sampling used ``temperature``,
compute ``log_softmax(logits / temperature)`` for ``logp``, ``old_logp`` and ``ref_logp`` alike.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import LOSS_MODES


# exp(±20) ≈ 4.9e8 / 2.1e-9: far beyond any ratio that survives clipping, but keeps exp() finite so
# that a zero advantage times a runaway ratio can never produce inf·0 = NaN.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages Â_i = (r_i − mean_g(r)) / (std_g(r) + eps), flattened to [N].

    R1 eq. 3 (DeepSeekMath §4.1.2, outcome supervision): the same scalar is used for every token of
    completion ``i``; :func:`clipped_surrogate` broadcasts it over T.

    ``rewards``: [N] (prompt-major, N = P·G) or [P, G] with G == ``group_size``.

    **std convention: unbiased (Bessel, divide by G − 1)**, i.e. ``torch.std``'s default, the same
    as TRL's GRPOTrainer, so numbers line up with the most common open implementation. For G = 2 and
    rewards (1, 0) this gives Â = ±0.5/√0.5 ≈ ±0.707 (the biased std would give ±1).

    ``eps`` is added to the std, so a zero-variance group (all correct or all wrong) gets Â = 0
    exactly, never NaN. ``scale_by_std=False`` is Dr. GRPO's Â_i = r_i − mean(r).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (advantages are relative to the group), "
                         f"got {group_size!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = torch.as_tensor(rewards)
    if r.dim() == 2:
        if r.shape[1] != group_size:
            raise ValueError(f"rewards has shape {tuple(r.shape)} but group_size is {group_size}")
    elif r.dim() == 1:
        if r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        r = r.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [N] or [P, G], got shape {tuple(r.shape)}")
    if r.dtype != torch.float64:
        r = r.to(torch.float32)  # ints/bools (0/1 verifier rewards) and half precision
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """DAPO dynamic sampling (arXiv 2503.14476 eq. 11, constraint 0 < |{correct}| < G): bool [P],
    True for groups to KEEP, i.e. whose rewards are not all equal.

    A zero-variance group has Â = 0 for every member, so it adds no policy gradient, only dilutes
    the batch; DAPO over-samples prompts and drops these groups. Equality is tested exactly
    (max == min), not via a floating-point variance. ``rewards``: [P, G], or [N] with
    ``group_size``.
    """
    r = torch.as_tensor(rewards)
    if r.dim() == 1:
        if group_size is None:
            raise ValueError("flat rewards [N] need group_size")
        if r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        r = r.view(-1, group_size)
    elif r.dim() != 2:
        raise ValueError(f"rewards must be [P, G] or [N], got shape {tuple(r.shape)}")
    elif group_size is not None and r.shape[1] != group_size:
        raise ValueError(f"rewards has shape {tuple(r.shape)} but group_size is {group_size}")
    return r.amax(dim=1) != r.amin(dim=1)


def zero_variance_fraction(rewards: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """Fraction (0-dim float tensor) of groups whose rewards are all equal: the share of the batch
    that carries no GRPO signal. A useful health metric whether or not dynamic sampling is on."""
    keep = dynamic_sampling_mask(rewards, group_size)
    return 1.0 - keep.to(torch.float32).mean()


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476 eq. 13), added to the task reward::

        R(y) = 0                               if |y| <= L_max − L_cache
             = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| <= L_max
             = −1                              if |y| > L_max

    so the penalty falls linearly from 0 to −1 over the last ``cache_len`` tokens of the budget
    (a truncated completion of exactly ``max_len`` tokens gets −1). Returns float32, shape of
    ``lengths``.
    """
    if max_len <= 0 or cache_len <= 0 or cache_len > max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got max_len={max_len}, "
                         f"cache_len={cache_len}")
    n = torch.as_tensor(lengths).to(torch.float32)
    start = float(max_len - cache_len)
    ramp = (start - n) / float(cache_len)
    out = torch.where(n <= start, torch.zeros_like(n), ramp)
    return torch.where(n > max_len, torch.full_like(n, -1.0), out)


# --------------------------------------------------------------------------- per-token terms
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, R1 eq. 2 (Schulman's "k3")::

        D = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(d) − d − 1,   d = ref_logp − logp

    Unbiased for KL(π_θ‖π_ref) when tokens are sampled from π_θ, and ≥ 0 for every token. Evaluated
    as ``expm1(d) − d``, which keeps full precision when d ≈ 0 (where exp(d) − 1 would cancel) and
    cannot round below zero. Elementwise; no clamping (padded positions are the caller's job;
    :func:`grpo_loss` neutralises them). Computed in at least float32.
    """
    d = ref_logp.float() - logp.float()
    return torch.expm1(d) - d


def _broadcast_adv(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(advantages, device=like.device).detach().to(like.dtype)  # constants
    if a.dim() == 1 and like.dim() == 2:
        if a.shape[0] != like.shape[0]:
            raise ValueError(f"advantages [{a.shape[0]}] do not match {like.shape[0]} sequences")
        return a.unsqueeze(-1)
    if a.shape != like.shape:
        raise ValueError(f"advantages shape {tuple(a.shape)} matches neither [N] nor the "
                         f"log-prob shape {tuple(like.shape)}")
    return a


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return x.float().mean()
    m = mask.to(torch.bool)
    return torch.where(m, x.float(), 0.0).sum() / m.sum().clamp(min=1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2,
                      mask: Optional[torch.Tensor] = None):
    """PPO clipped surrogate, per token (R1 eq. 1 inner term), negated into a loss::

        loss_t = −min(ρ_t Â, clip(ρ_t, 1 − eps_low, 1 + eps_high) Â),   ρ_t = exp(logp − old_logp)

    ``eps_high > eps_low`` is DAPO's clip-higher (eq. 10). ``advantages``: [N] (broadcast over T)
    or the log-prob shape. The log-ratio is clamped to ±20 before exp() only to keep it finite.

    Returns ``(per_token_loss, stats)`` with stats (detached 0-dim tensors, averaged over ``mask``
    tokens when given, else all elements):

    - ``clip_low``: fraction of tokens where the lower clip is the selected, different term:
      Â < 0 and ρ < 1 − eps_low (the gradient of these tokens is zero);
    - ``clip_high``: Â > 0 and ρ > 1 + eps_high;
    - ``ratio_mean``: mean of ρ.
    """
    if not (0.0 <= eps_low < 1.0) or not (eps_high >= 0.0) or math.isinf(eps_high):
        raise ValueError(f"need 0 <= eps_low < 1 and finite eps_high >= 0, "
                         f"got {eps_low}, {eps_high}")
    log_ratio = (logp.float() - old_logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = _broadcast_adv(advantages, ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        r = ratio.detach()
        low = (adv < 0) & (r < 1.0 - eps_low)
        high = (adv > 0) & (r > 1.0 + eps_high)
        stats = {"clip_low": _masked_mean(low, mask), "clip_high": _masked_mean(high, mask),
                 "ratio_mean": _masked_mean(r, mask)}
    return per_token, stats


# --------------------------------------------------------------------------- aggregation
def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "sequence_mean",
              max_len: Optional[int] = None) -> torch.Tensor:
    """Reduce a per-token [N, T] quantity to a scalar over the ``mask`` tokens.

    - ``"sequence_mean"`` (GRPO, R1 eq. 1): (1/N) Σ_i (1/|o_i|) Σ_t x_it. Every response weighs the
      same, so a token in a long response weighs less. A row with no tokens contributes 0 (and
      still counts in N).
    - ``"token_mean"`` (DAPO eq. 12): Σ_i Σ_t x_it / Σ_i |o_i|. Every token weighs the same.
    - ``"constant"`` (Dr. GRPO): (1/N) Σ_i Σ_t x_it / max_len, with ``max_len`` a fixed constant
      (the generation budget), so neither the response length nor the batch's token count
      rescales the gradient.

    Padded positions are excluded with ``where`` (not multiplied by 0), so inf/NaN there cannot
    leak into the value. With gradient accumulation, "token_mean" over micro-batches is not the
    token mean of the whole batch; pass the batch's tokens in one call or rescale yourself.
    """
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(f"per_token and mask must both be [N, T], got {tuple(per_token.shape)} "
                         f"and {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    x = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "sequence_mean":
        lengths = m.sum(dim=1).clamp(min=1).to(x.dtype)
        return (x.sum(dim=1) / lengths).mean()
    if mode == "token_mean":
        return x.sum() / m.sum().clamp(min=1).to(x.dtype)
    if mode == "constant":
        if max_len is None or isinstance(max_len, bool) or max_len <= 0:
            raise ValueError(f'loss mode "constant" needs a positive max_len, got {max_len!r}')
        return x.sum(dim=1).mean() / float(max_len)
    raise ValueError(f"unknown loss mode {mode!r}; choose one of {LOSS_MODES}")


# --------------------------------------------------------------------------- the loss
def grpo_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor],
              ref_logp: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor,
              *, beta: float = 0.04, eps_low: float = 0.2, eps_high: float = 0.2,
              loss_mode: str = "sequence_mean", max_len: Optional[int] = None):
    """GRPO loss = −J(θ) of R1 eq. 1 (DeepSeekMath eq. 3), with the DAPO / Dr. GRPO options::

        per_token = −min(ρ Â, clip(ρ, 1−eps_low, 1+eps_high) Â) + beta · k3_kl(logp, ref_logp)
        loss      = aggregate(per_token, mask, loss_mode, max_len)

    ``logp`` [N, T] carries the gradient; ``old_logp`` (π_old, detached; ``None`` means on-policy,
    μ = 1: old = logp.detach(), so ρ ≡ 1 and the gradient is REINFORCE with the group baseline),
    ``ref_logp`` (π_ref; ``None`` or ``beta == 0`` drops the KL term). ``advantages`` [N] or [N, T].

    Positions outside ``mask`` are neutralised before exp() so garbage there never produces
    inf/NaN in the loss or in the gradient.

    Returns ``(loss, stats)``; stats are detached 0-dim float tensors (no host sync): ``kl`` (token
    mean of k3 over the mask; 0 when the KL term is off), ``clip_low``, ``clip_high``,
    ``ratio_mean``.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be [N, T], got {tuple(logp.shape)} and "
                         f"{tuple(mask.shape)}")
    m = mask.to(torch.bool)
    if old_logp is None:
        old_logp = logp.detach()
    # Padded positions: make every log-difference exactly 0 there (ρ = 1, KL = 0), so no exp() can
    # overflow and no 0·inf NaN can reach the gradient of the real tokens.
    lp = logp.float()
    old = torch.where(m, old_logp.detach().float(), lp.detach())
    lp = torch.where(m, lp, old)
    per_token, stats = clipped_surrogate(lp, old, advantages, eps_low, eps_high, mask=m)
    use_kl = ref_logp is not None and beta > 0
    if use_kl:
        ref = torch.where(m, ref_logp.detach().float(), lp.detach())
        kl = k3_kl(lp, ref)
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), m)
    else:
        stats["kl"] = torch.zeros((), device=logp.device)
    loss = aggregate(per_token, m, loss_mode, max_len)
    return loss, stats
