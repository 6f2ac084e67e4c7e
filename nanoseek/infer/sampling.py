"""Sampling parameters and the token sampler shared by every caller of the engine.

What a returned log-probability means
    For a sampled token ``t`` the engine reports ``log_softmax(logits.float() / temperature)[t]``
    (plain ``log_softmax(logits.float())`` when ``temperature == 0``), computed over the FULL
    vocabulary, BEFORE top-k / top-p truncation. That is exactly what a full forward of the policy
    gives at the same temperature, so the GRPO trainer can recompute it from ``model(ids).logits``
    and the importance ratio starts at exactly 1 (``tests/test_engine.py`` checks the equality).
    Truncation changes which tokens can be drawn, not the number reported.

How a token is drawn
    ``temperature`` scales the logits, ``top_k`` keeps the k largest (exactly k, ties broken by
    index), then ``top_p`` keeps the smallest set of the remaining tokens, in order of probability,
    whose renormalised mass reaches ``top_p`` (the token that crosses the threshold is kept). The
    draw is an inverse-CDF lookup with ONE uniform number from the request's own
    ``torch.Generator``, so a seeded request reproduces its tokens whatever else shares the batch.
    Requests without a seed draw from torch's global generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import NanoseekError


class GenerationError(NanoseekError, ValueError):
    """Bad sampling parameters or a request the engine cannot serve (prints cleanly in the CLI)."""


@dataclass
class SamplingParams:
    """How to generate one completion.

    ``temperature`` 0 means greedy (argmax). ``top_k`` 0 means off, ``top_p`` 1.0 means off.
    ``stop`` strings end the request when they appear in the decoded text (they are cut from the
    returned text; needs a tokenizer). ``stop_token_ids`` (and the tokenizer's / config's EOS unless
    ``ignore_eos``) end it when sampled; that token is kept in ``token_ids`` but not in the text.
    ``seed`` gives the request its own ``torch.Generator``. ``logprobs`` False makes the engine
    report ``None`` instead of log-probabilities (they are computed anyway; it costs nothing).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = True
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GenerationError` (a ``ValueError``) naming the offending field."""

        def bad(name: str, why: str) -> GenerationError:
            return GenerationError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_real(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must lie in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 means off)")
        if not is_int(self.max_tokens) or self.max_tokens <= 0:
            raise bad("max_tokens", "must be a positive integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be a bool")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a bool")

    @property
    def greedy(self) -> bool:
        """Temperature 0: the most likely token, no random draw."""
        return self.temperature == 0

    def make_generator(self) -> torch.Generator | None:
        """A CPU generator seeded with ``seed`` (None without a seed: torch's global RNG is used)."""
        if self.seed is None:
            return None
        return torch.Generator(device="cpu").manual_seed(self.seed)


class RowParams:
    """Per-row sampling parameters as tensors on the device: what the batched sampler reads.

    ``temperature`` [n] float32 (0: greedy), ``top_k`` [n] int64 (0: off), ``top_p`` [n] float32
    (1: off). The compiled decode step takes them as inputs, so rows with different parameters
    share one graph.
    """

    def __init__(self, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> RowParams:
        return cls(torch.tensor([float(p.temperature) for p in params], dtype=torch.float32, device=device),
                   torch.tensor([int(p.top_k) for p in params], dtype=torch.long, device=device),
                   torch.tensor([float(p.top_p) for p in params], dtype=torch.float32, device=device))

    def rows(self, n: int) -> RowParams:
        """The first ``n`` rows (views, no copy)."""
        return RowParams(self.temperature[:n], self.top_k[:n], self.top_p[:n])

    def set_row(self, i: int, p: SamplingParams) -> None:
        self.temperature[i], self.top_k[i], self.top_p[i] = float(p.temperature), int(p.top_k), float(p.top_p)


def _as_rows(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} rows")
    return params


def draw_uniforms(params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One U[0,1) number per sampled row from that row's generator (float64, CPU); 0 for greedy rows."""
    out = torch.zeros(len(params), dtype=torch.float64)
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            out[i] = torch.rand((), generator=g, dtype=torch.float64)
    return out


def batch_needs(params: Sequence[SamplingParams]) -> tuple[bool, bool]:
    """``(sampling, truncating)``: whether any row samples, and whether any sampled row asks for top-k
    or top-p. Without them a step skips the draw and :func:`truncated_probs`' vocabulary sort (at 256
    rows of a 512-token vocabulary on a CPU core pair: 1.3 and 4.4 ms, more than the model's step)."""
    sampled = [p for p in params if not p.greedy]
    return bool(sampled), any(p.top_k > 0 or p.top_p < 1 for p in sampled)


def truncated_probs(logits: torch.Tensor, rows: RowParams, truncating: bool = True) -> torch.Tensor:
    """The distributions tokens are drawn from: [n, V] float32 rows summing to 1.

    Order: temperature, top-k (exactly k, ties broken by index), top-p. Greedy rows get the
    temperature-1 distribution (their token is the argmax; the caller ignores this row). A row
    without top-k and top-p is the plain softmax whatever the other rows ask, so a seeded row's
    tokens do not depend on its batch; ``truncating=False`` (the caller knows, from
    :func:`batch_needs`, that no sampled row truncates) skips the vocabulary sort that only
    truncating rows need.
    """
    temperature = torch.where(rows.temperature > 0, rows.temperature, 1.0)
    scaled = logits.float() / temperature[:, None]
    plain = scaled.softmax(dim=-1)
    if not truncating:
        return plain
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=scaled.device)
    k = torch.where(rows.top_k > 0, rows.top_k, vocab)
    sorted_p = sorted_logits.masked_fill(rank >= k[:, None], float("-inf")).softmax(dim=-1)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    top_p = rows.top_p[:, None]
    sorted_p = sorted_p.masked_fill((mass_before >= top_p) & (top_p < 1), 0.0)  # the first token always stays
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    truncated = torch.zeros_like(sorted_p).scatter_(-1, order, sorted_p)
    return torch.where(((rows.top_k > 0) | (rows.top_p < 1))[:, None], truncated, plain)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """:func:`truncated_probs` with one setting for every row (``temperature`` > 0)."""
    n = logits.shape[0]
    full = functools.partial(torch.full, (n,), device=logits.device)
    return truncated_probs(logits, RowParams(full(float(temperature)), full(int(top_k)), full(float(top_p))))


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row i takes the first token whose cumulative mass exceeds ``u[i]·total``."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    # Rounding can land past the last token with mass: take the last such token instead.
    last = ((probs > 0).long() * torch.arange(probs.shape[-1], device=probs.device)).argmax(dim=-1)
    return torch.where(probs.gather(-1, idx[:, None]).squeeze(-1) > 0, idx, last)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float() / temperature)[token]`` per row (temperature 0 → 1; a float or [n])."""
    if isinstance(temperature, torch.Tensor):
        scale = torch.where(temperature > 0, temperature, 1.0)[:, None]
    else:
        scale = temperature if temperature > 0 else 1.0
    scaled = logits.float() / scale
    return scaled.log_softmax(dim=-1).gather(-1, tokens[:, None].to(scaled.device)).squeeze(-1)


def sample_rows(logits: torch.Tensor, rows: RowParams, u: torch.Tensor, sampling: bool = True,
                truncating: bool = True):
    """Draw one token per row of ``logits`` [n, V] with the uniforms ``u`` [n], on the device.

    Returns ``(tokens [n] int64, logprobs [n] float32, probs [n, V])``: the log-probabilities as
    the module docstring defines them, ``probs`` the distributions drawn from (greedy rows: unused).
    ``sampling`` / ``truncating`` False (see :func:`batch_needs`) skip work no row needs; the
    tokens are the same.
    """
    probs = truncated_probs(logits, rows, truncating and sampling)
    greedy = logits.argmax(dim=-1)
    tokens = torch.where(rows.temperature > 0, draw(probs, u), greedy) if sampling else greedy
    return tokens, token_logprobs(logits, tokens, rows.temperature), probs


def verify_rows(logits: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor, rows: RowParams,
                u_accept: torch.Tensor, u_token: torch.Tensor, sampling: bool = True, truncating: bool = True):
    """Speculative verification of one drafted token per row, on the device (see :func:`verify_draft`).

    ``logits`` [n, 2, V], ``draft_ids`` [n], ``draft_probs`` [n, V] (read for sampled rows only),
    two uniforms per row; ``sampling`` / ``truncating`` as in :func:`sample_rows`. Returns
    ``(tokens [n, 2], logprobs [n, 2], accepted [n] bool)``.
    """
    l0, l1 = logits[:, 0], logits[:, 1]
    first, second = l0.argmax(dim=-1), l1.argmax(dim=-1)  # greedy rows
    accepted = first == draft_ids
    if sampling:
        p1, p2 = truncated_probs(l0, rows, truncating), truncated_probs(l1, rows, truncating)
        d = draft_ids[:, None]
        p_d = p1.gather(-1, d).squeeze(-1).double()
        q_d = draft_probs.gather(-1, d).squeeze(-1).double()
        accept_sampled = u_accept.to(p_d.device, p_d.dtype) * q_d < p_d  # u < p/q; q(d) > 0 as d was drawn from q
        residual = (p1 - draft_probs).clamp(min=0.0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p1)  # p == q: never rejected
        sampled = rows.temperature > 0
        accepted = torch.where(sampled, accept_sampled, accepted)
        first = torch.where(sampled, torch.where(accept_sampled, draft_ids, draw(residual, u_token)), first)
        second = torch.where(sampled, draw(p2, u_token), second)
    logps = torch.stack([token_logprobs(l0, first, rows.temperature), token_logprobs(l1, second, rows.temperature)], 1)
    return torch.stack([first, second], dim=1), logps, accepted


def sample_tokens(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None] | None = None, return_probs: bool = False):
    """Draw one token per row of ``logits`` [B, V] (:func:`sample_rows` with per-row settings).

    ``params`` is one :class:`SamplingParams` for all rows or one per row; ``generators`` one per
    row (``None`` entries use torch's global RNG). Returns ``(token_ids [B] int64, logprobs [B]
    float32)`` on ``logits``' device, the log-probabilities as defined in the module docstring. With
    ``return_probs`` a third value lists, per row, the distribution the token was drawn from ([V]
    float32) or ``None`` for greedy rows (speculative decoding needs it as the draft distribution).
    """
    b = logits.shape[0]
    rows_params = _as_rows(params, b)
    generators = list(generators) if generators is not None else [None] * b
    if len(generators) != b:
        raise ValueError(f"got {len(generators)} generators for {b} rows")
    tokens, logps, probs = sample_rows(logits, RowParams.of(rows_params, logits.device),
                                       draw_uniforms(rows_params, generators), *batch_needs(rows_params))
    if return_probs:
        return tokens, logps, [None if p.greedy else probs[i] for i, p in enumerate(rows_params)]
    return tokens, logps


def verify_draft(logits: torch.Tensor, draft_ids: torch.Tensor, draft_probs: Sequence[torch.Tensor | None],
                 params: SamplingParams | Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None] | None = None):
    """Speculative verification of one drafted token per row.

    ``logits`` [B, 2, V] are the target model's logits after the last accepted token (position 0)
    and after the draft (position 1); ``draft_ids`` [B]; ``draft_probs[i]`` the distribution the
    draft was drawn from (ignored for greedy rows).

    Greedy rows: the first token is ``argmax(logits[:, 0])``; the draft is accepted iff it equals
    it, and then ``argmax(logits[:, 1])`` is the second token — exactly plain greedy decoding.
    Sampled rows: standard speculative sampling (Leviathan et al. arXiv 2211.17192; Chen et al.
    arXiv 2302.01318): accept with probability ``min(1, p(d)/q(d))``, else draw from
    ``normalise(max(0, p - q))``; the output follows ``p`` exactly. ``p`` is the target's
    distribution after temperature/top-k/top-p. Two uniforms per sampled row are used.

    Returns ``(tokens [B, 2], logprobs [B, 2], accepted [B] bool)``; ``tokens[:, 1]`` is meaningful
    only where accepted. Log-probabilities follow the module definition (target model, full
    vocabulary, before truncation).
    """
    b, _, vocab = logits.shape
    rows_params = _as_rows(params, b)
    generators = list(generators) if generators is not None else [None] * b
    q = torch.stack([torch.zeros(vocab) if p.greedy else draft_probs[i].float().cpu()
                     for i, p in enumerate(rows_params)]).to(logits.device)
    u_accept = draw_uniforms(rows_params, generators)
    u_token = draw_uniforms(rows_params, generators)
    return verify_rows(logits, draft_ids.to(logits.device), q, RowParams.of(rows_params, logits.device),
                       u_accept, u_token, *batch_needs(rows_params))
