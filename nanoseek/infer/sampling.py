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


def _key(p: SamplingParams) -> tuple:
    return (float(p.temperature), int(p.top_k), float(p.top_p))


def _groups(params: Sequence[SamplingParams]) -> dict[tuple, list[int]]:
    """Row indices grouped by (temperature, top_k, top_p): each group is processed in one go."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(_key(p), []).append(i)
    return groups


def _as_rows(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} rows")
    return params


def _uniforms(generators: Sequence[torch.Generator | None], rows: Sequence[int]) -> torch.Tensor:
    """One U[0,1) number per row, each from that row's generator (float64, CPU)."""
    out = torch.empty(len(rows), dtype=torch.float64)
    for j, i in enumerate(rows):
        g = generators[i]
        out[j] = torch.rand((), generator=g, dtype=torch.float64) if g is not None else \
            torch.rand((), dtype=torch.float64)
    return out


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution tokens are drawn from: [n, V] float32 rows summing to 1.

    ``temperature`` must be > 0 (greedy rows never reach here). Order: temperature, top-k, top-p.
    """
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        drop = torch.ones_like(scaled, dtype=torch.bool)
        drop.scatter_(-1, scaled.topk(top_k, dim=-1).indices, False)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: row i takes the first token whose cumulative mass exceeds ``u[i]·total``."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    # Rounding can land past the last token with mass: take the last such token instead.
    zero = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if zero.any():
        last = (probs > 0).long() * torch.arange(probs.shape[-1], device=probs.device)
        idx = torch.where(zero, last.argmax(dim=-1), idx)
    return idx


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits.float() / temperature)[token]`` per row (temperature 0 → 1)."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(dim=-1).gather(-1, tokens[:, None].to(scaled.device)).squeeze(-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None] | None = None, return_probs: bool = False):
    """Draw one token per row of ``logits`` [B, V].

    ``params`` is one :class:`SamplingParams` for all rows or one per row; ``generators`` one per
    row (``None`` entries use torch's global RNG). Rows sharing (temperature, top_k, top_p) are
    processed together. Returns ``(token_ids [B] int64, logprobs [B] float32)`` on ``logits``'
    device, the log-probabilities as defined in the module docstring. With ``return_probs`` a
    third value lists, per row, the distribution the token was drawn from ([V] float32) or
    ``None`` for greedy rows (speculative decoding needs it as the draft distribution).
    """
    b = logits.shape[0]
    rows_params = _as_rows(params, b)
    generators = list(generators) if generators is not None else [None] * b
    if len(generators) != b:
        raise ValueError(f"got {len(generators)} generators for {b} rows")
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    logps = torch.empty(b, dtype=torch.float32, device=logits.device)
    probs_out: list[torch.Tensor | None] = [None] * b
    for (temperature, top_k, top_p), rows in _groups(rows_params).items():
        idx = torch.tensor(rows, device=logits.device)
        sub = logits.index_select(0, idx).float()
        if temperature == 0:
            chosen = sub.argmax(dim=-1)
        else:
            probs = sampling_probs(sub, temperature, top_k, top_p)
            chosen = draw(probs, _uniforms(generators, rows))
            if return_probs:
                for j, i in enumerate(rows):
                    probs_out[i] = probs[j]
        tokens[idx] = chosen
        logps[idx] = token_logprobs(sub, chosen, temperature)
    if return_probs:
        return tokens, logps, probs_out
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
    b = logits.shape[0]
    rows_params = _as_rows(params, b)
    generators = list(generators) if generators is not None else [None] * b
    device = logits.device
    first = torch.empty(b, dtype=torch.long, device=device)
    second = torch.empty(b, dtype=torch.long, device=device)
    accepted = torch.empty(b, dtype=torch.bool, device=device)
    draft_ids = draft_ids.to(device)
    for (temperature, top_k, top_p), rows in _groups(rows_params).items():
        idx = torch.tensor(rows, device=device)
        l0 = logits[:, 0].index_select(0, idx).float()
        l1 = logits[:, 1].index_select(0, idx).float()
        d = draft_ids.index_select(0, idx)
        if temperature == 0:
            t1 = l0.argmax(dim=-1)
            acc = t1 == d
            t2 = l1.argmax(dim=-1)
        else:
            p1 = sampling_probs(l0, temperature, top_k, top_p)
            p2 = sampling_probs(l1, temperature, top_k, top_p)
            q = torch.stack([draft_probs[i].to(device).float() for i in rows])
            u_accept = _uniforms(generators, rows).to(device)
            u_token = _uniforms(generators, rows)
            p_d = p1.gather(-1, d[:, None]).squeeze(-1).double()
            q_d = q.gather(-1, d[:, None]).squeeze(-1).double()
            acc = u_accept * q_d < p_d  # u < p/q, with q(d) > 0 since d was drawn from q
            residual = (p1 - q).clamp_(min=0.0)
            empty = residual.sum(dim=-1, keepdim=True) <= 0
            residual = torch.where(empty, p1, residual)  # p == q: rejection has probability 0
            t1 = torch.where(acc, d, draw(residual, u_token))
            t2 = draw(p2, u_token)
        first[idx], second[idx], accepted[idx] = t1, t2, acc
    logps = torch.stack([_row_logprobs(logits[:, 0], first, rows_params),
                         _row_logprobs(logits[:, 1], second, rows_params)], dim=1)
    return torch.stack([first, second], dim=1), logps, accepted


def _row_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                         dtype=torch.float32, device=logits.device)
    scaled = logits.float() / temps[:, None]
    return scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
