"""GRPO rollouts: the seeds of a step's problems and samples, the sampling of one step through the
engine with its rule-based rewards, and the trainer's recomputation of the completions' log-probs
(:func:`completion_logprobs`, exactly as the engine reports them)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import NanoseekError
from ..infer.sampling import SamplingParams, token_logprobs
from ..tasks import accuracy_reward, format_reward
from ..tasks.evaluate import EVAL_SEED_BASE, prompt_builder
from .objective import overlong_penalty

_U63 = (1 << 63) - 1
#: The reward of a completion on which the reward function raised: the lowest the built-in rewards
#: pay (no answer), so a crash never pays more than a plain failure.
REWARD_ON_ERROR = 0.0
_ERROR_TEXT_CHARS = 200  # how much of a failing completion (and of the error) the incident keeps


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters; no Python ``hash``, so stable across processes)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h & _U63


def problem_seed(run_seed: int, batch: int) -> int:
    """The task-generator seed of batch ``batch``: always below ``EVAL_SEED_BASE`` (held-out problems
    are generated from EVAL_SEED_BASE + seed, so training never sees them)."""
    return mix_seed(run_seed, batch, 0x7A5C) % EVAL_SEED_BASE


def sample_seed(run_seed: int, batch: int, prompt: int, sample: int) -> int:
    """The sampling seed of sample ``sample`` of prompt ``prompt`` in batch ``batch``."""
    return mix_seed(run_seed, batch, prompt, sample)


# ----------------------------------------------------------------------------- log-probs
def completion_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        temperature: float, n_usable: int | None = None, with_entropy: bool = False,
                        pad_id: int = 0, return_expert_load: bool = False):
    """Per-token log-probs of each completion under ``model``, exactly as the engine reports them.

    One forward of ``prompt + completion[:-1]`` per row (right-padded; causal attention makes the
    padding invisible to real positions); completion token j is scored by the logits at position
    ``len(prompt) - 1 + j`` as ``log_softmax(logits.float() / temperature)[token]``
    (:func:`~nanoseek.infer.sampling.token_logprobs`), after masking ids ``>= n_usable`` (model
    vocabulary padding past the tokenizer's) to −inf as the engine does.

    Returns ``(logp [B, T] float32 with grad, mask [B, T] bool, entropy [B, T] or None)``;
    ``entropy`` (no grad) is that of the same temperature-scaled distribution, in nats. With
    ``return_expert_load`` a fourth value is the forward's ``expert_load`` (or None).
    """
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError("need one completion per prompt, at least one")
    device = next(model.parameters()).device
    rows = [list(p) + list(c[:-1]) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    n_comp = [len(c) for c in completion_ids]
    if min(n_comp) < 1 or min(len(p) for p in prompt_ids) < 1:
        raise ValueError("empty prompt or completion")
    t_max = max(n_comp)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    pos = torch.zeros(len(rows), t_max, dtype=torch.long)
    targets = torch.zeros(len(rows), t_max, dtype=torch.long)
    mask = torch.zeros(len(rows), t_max, dtype=torch.bool)
    for i, (row, p, c) in enumerate(zip(rows, prompt_ids, completion_ids)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        n = len(c)
        pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        targets[i, :n] = torch.tensor(list(c), dtype=torch.long)
        mask[i, :n] = True
    ids, pos, targets, mask = ids.to(device), pos.to(device), targets.to(device), mask.to(device)
    fwd = model(ids)
    logits = fwd.logits  # [B, W, V]
    vocab = logits.shape[-1]
    picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, vocab))  # [B, T, V]
    if n_usable is not None and n_usable < vocab:
        picked = picked.index_fill(-1, torch.arange(n_usable, vocab, device=device), float("-inf"))
    logp = token_logprobs(picked.reshape(-1, vocab), targets.reshape(-1), temperature).view(targets.shape)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            lp = (picked.detach().float() / (temperature if temperature > 0 else 1.0)).log_softmax(dim=-1)
            entropy = torch.special.entr(lp.exp()).sum(dim=-1)
            entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    if return_expert_load:
        load = fwd.expert_load.detach() if fwd.expert_load is not None else None
        return logp, mask, entropy, load
    return logp, mask, entropy


# ----------------------------------------------------------------------------- one rollout
@dataclass
class Rollout:
    """What one step sampled: P problems × G completions (prompt-major)."""

    batch: int
    problems: list
    prompt_texts: list[str]
    prompt_ids: list[list[int]]  # per problem
    completions: list  # [P·G] Completion
    rewards: torch.Tensor  # [P·G] float32 (shaped: task reward + overlong penalty)
    accuracies: list[float]  # the accuracy check of each completion it could judge
    formats: list[float]  # the format check of each completion
    reward_none: int
    seconds: float
    #: one entry per completion whose reward raised: index, check, error type, message, completion start
    reward_errors: list[dict] = field(default_factory=list)
    #: with ``screen_factor`` > 1: the mean reward of the greedy answers to every screened candidate
    screen_reward: float | None = None

    @property
    def accuracy(self) -> float | None:
        """Mean accuracy check over the completions it could judge."""
        return _mean(self.accuracies)

    @property
    def format_rate(self) -> float | None:
        """Mean format check."""
        return _mean(self.formats)

    @property
    def lengths(self) -> list[int]:
        """Generated tokens per completion."""
        return [len(c.token_ids) for c in self.completions]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _judge(what: str, fn: Callable, args: tuple, on_error: float, failed: list) -> float | None:
    """``fn(*args)`` as a float (``None`` stays ``None``); when it raises, ``on_error``, and
    ``(what, exception)`` is appended to ``failed``: a verifier that breaks on one completion
    must not end the run."""
    try:
        value = fn(*args)
        return None if value is None else float(value)
    except Exception as exc:
        failed.append((what, exc))
        return on_error


def _greedy_rewards(engine, texts: list[str], ids: list[list[int]], problems: list, reward_fn,
                    max_tokens: int) -> list[float]:
    """The reward of one greedy completion of each problem (a reward that raises or gives ``None``
    counts as :data:`REWARD_ON_ERROR`)."""
    completions = engine.generate(ids, [SamplingParams(temperature=0.0, max_tokens=max_tokens) for _ in ids])
    rewards = []
    for text, comp, problem in zip(texts, completions, problems):
        r = _judge("reward", reward_fn, (text, comp.text, problem.fields), REWARD_ON_ERROR, [])
        rewards.append(r if r is not None and math.isfinite(r) else REWARD_ON_ERROR)
    return rewards


def step_problems(engine, tokenizer, task, reward_fn, cfg, batch: int) -> tuple[list, float | None]:
    """The ``prompts_per_step`` problems of batch ``batch`` (a pure function of the run seed, the
    batch and, when screening, the policy) and the mean greedy reward of the screened candidates.

    With ``cfg.screen_factor`` K > 1 the generator draws K × P candidates, the policy answers each
    once greedily, and the P whose greedy answer earns the least reward are kept (ties in generation
    order): the groups go to the problems the model's own answer still gets wrong, the decisions
    greedy decoding makes and held-out accuracy measures. This is the prioritized sampling of Kimi
    k1.5 (arXiv 2501.12599: sample problems by their failure rate) with a one-sample estimate on fresh
    problems, and it spends no group on a problem the policy always solves, the zero-variance groups
    that DAPO's dynamic sampling (arXiv 2503.14476) has to drop after paying for them. Every rank of a
    distributed run screens all K × P candidates with the same weights and takes its share of the
    kept ones; a rank whose kernels broke a near-tie differently would sample another problem in a
    slot, which changes what is trained on but not the objective."""
    n = cfg.prompts_per_step * cfg.screen_factor
    problems = task.generate(problem_seed(cfg.seed, batch), n, cfg.difficulty)
    if cfg.screen_factor == 1:
        return problems, None
    ask = prompt_builder(tokenizer, cfg.prompt_format)
    texts = [ask(p) for p in problems]
    rewards = _greedy_rewards(engine, texts, [tokenizer.encode(t) for t in texts], problems, reward_fn,
                              cfg.max_tokens)
    keep = sorted(range(n), key=rewards.__getitem__)[: cfg.prompts_per_step]
    return [problems[i] for i in keep], sum(rewards) / n


def sample_rollout(engine, tokenizer, task, reward_fn, reward_name: str, cfg, objective, batch: int,
                   prompts: range | None = None) -> Rollout:
    """Sample batch ``batch``: the step's problems (:func:`step_problems`), ``group_size``
    completions of each through ``engine`` (the model must be in eval mode), their rewards, accuracy
    and format checks. ``prompts``: which of the step's ``prompts_per_step`` problems to sample here
    (default all; a rank of a distributed run takes its share), each with the same seeds it gets in a
    one-process run."""
    t0 = time.perf_counter()
    problems, screen_reward = step_problems(engine, tokenizer, task, reward_fn, cfg, batch)
    prompts = prompts if prompts is not None else range(len(problems))
    problems = [problems[i] for i in prompts]
    ask = prompt_builder(tokenizer, cfg.prompt_format)
    texts = [ask(p) for p in problems]
    ids = [tokenizer.encode(t) for t in texts]
    seqs, params = [], []
    for i, pid in zip(prompts, ids):
        for j in range(objective.group_size):
            seqs.append(pid)
            params.append(SamplingParams(temperature=objective.temperature, max_tokens=cfg.max_tokens,
                                         seed=sample_seed(cfg.seed, batch, i, j)))
    completions = engine.generate(seqs, params)
    rewards, accs, fmts, none, errors = [], [], [], 0, []
    for n, comp in enumerate(completions):
        problem, text = problems[n // objective.group_size], texts[n // objective.group_size]
        failed: list[tuple[str, Exception]] = []
        args = (text, comp.text, problem.fields)
        r = _judge("reward", reward_fn, args, REWARD_ON_ERROR, failed)
        if r is None or not math.isfinite(r):
            none += 1
            r = 0.0
        rewards.append(r)
        a = _judge("accuracy", accuracy_reward, args, 0.0, failed)
        if a is not None:
            accs.append(a)
        fmts.append(_judge("format", format_reward, args, 0.0, failed))
        if failed:
            errors.append(_error_record(n, failed[0], comp.text))
    if errors and sum(e["check"] == "reward" for e in errors) == len(completions):
        e = errors[0]
        raise NanoseekError(f"the reward {reward_name!r} raised on all {len(completions)} completions of batch "
                            f"{batch} ({e['error']}: {e['message']}): the reward is broken, not a completion")
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    if objective.overlong_max_len is not None:
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        rewards_t = rewards_t + overlong_penalty(lengths, objective.overlong_max_len, objective.overlong_cache_len)
    return Rollout(batch, problems, texts, ids, completions, rewards_t, accs, fmts, none,
                   time.perf_counter() - t0, errors, screen_reward)


def _error_record(index: int, failure: tuple[str, Exception], completion: str) -> dict:
    """What the incident log keeps of a check that raised on completion ``index``."""
    what, exc = failure
    try:
        message = str(exc)[:_ERROR_TEXT_CHARS]
    except Exception:  # an exception that cannot even describe itself
        message = "(no message)"
    return {"index": index, "check": what, "error": type(exc).__name__, "message": message,
            "completion": completion[:_ERROR_TEXT_CHARS]}


@dataclass
class StepSamples:
    """What every rank sampled in one step, gathered in global prompt order (in one process: the
    rollout itself). Every rank holds the same, so metrics and guard decisions agree."""

    rewards: torch.Tensor  # [P·G]
    accuracies: list[float]
    formats: list[float]
    lengths: list[int]
    truncated: int  # completions that hit max_tokens
    token_ids: list[list[int]]
    reward_none: int
    reward_errors: list[dict]
    tokens_processed: int  # prompt + completion tokens of every sample (what the update's forward reads)

    @classmethod
    def gather(cls, roll: Rollout, gather: Callable[[dict], list[dict]]) -> "StepSamples":
        """Merge ``roll`` of every rank; ``gather`` returns one dict per rank, in rank order."""
        g = len(roll.completions) // max(len(roll.problems), 1)
        local = {"rewards": roll.rewards.tolist(), "accuracies": roll.accuracies, "formats": roll.formats,
                 "lengths": roll.lengths, "truncated": sum(c.finish_reason == "length" for c in roll.completions),
                 "token_ids": [list(c.token_ids) for c in roll.completions], "reward_none": roll.reward_none,
                 "reward_errors": roll.reward_errors,
                 "tokens_processed": sum(len(roll.prompt_ids[i // g]) + len(c.token_ids)
                                         for i, c in enumerate(roll.completions))}
        parts = gather(local)
        return cls(rewards=torch.tensor([r for p in parts for r in p["rewards"]], dtype=torch.float32),
                   **{k: [x for p in parts for x in p[k]] for k in ("accuracies", "formats", "lengths", "token_ids",
                                                                     "reward_errors")},
                   **{k: sum(p[k] for p in parts) for k in ("truncated", "reward_none", "tokens_processed")})

    @property
    def n(self) -> int:
        """Completions sampled in the step, all ranks."""
        return len(self.lengths)

    def signals(self) -> dict:
        """The rollout signals the RL guard watches."""
        return {"accuracy": _mean(self.accuracies), "format_rate": _mean(self.formats),
                "response_length": sum(self.lengths) / self.n, "truncation_rate": self.truncated / self.n}
