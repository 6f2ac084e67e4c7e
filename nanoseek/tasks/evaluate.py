"""Evaluation on held-out problems: accuracy, pass@k, maj@k, mean length, format rate.

Held-out means a seed range training never touches: training draws problem seeds below
:data:`EVAL_SEED_BASE`, evaluation draws them from ``EVAL_SEED_BASE + seed`` (the "test" split) or,
to choose between checkpoints without touching the test problems, from ``VALIDATION_SEED_BASE + seed``
(the "validation" split). pass@k uses the
unbiased estimator of Chen et al. (arXiv 2107.03374, eq. 1); maj@k (self-consistency, Wang et al.,
arXiv 2203.11171) is right when the most frequent parsed answer among the samples verifies.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from ..infer.sampling import SamplingParams
from .base import PROMPT_FORMATS, Problem, Task, Verdict, chat_messages, format_ok, parse_answer
from .registry import get_task

#: Problem seeds at or above this are reserved for evaluation; training must stay below it.
EVAL_SEED_BASE = 1_000_000_000
#: Validation problems (model selection) start here: above training's seeds and the test split's.
VALIDATION_SEED_BASE = 2 * EVAL_SEED_BASE
SPLIT_SEED_BASES = {"test": EVAL_SEED_BASE, "validation": VALIDATION_SEED_BASE}


def eval_problems(task: Task | str, n: int, difficulty: int = 1, seed: int = 0, split: str = "test") -> list[Problem]:
    """The held-out problems of ``split`` ("test" or "validation") for ``seed``; both seed ranges are
    disjoint from training's and from each other."""
    if split not in SPLIT_SEED_BASES:
        raise ValueError(f"unknown evaluation split {split!r} (choose from {', '.join(SPLIT_SEED_BASES)})")
    task = get_task(task) if isinstance(task, str) else task
    return task.generate(SPLIT_SEED_BASES[split] + seed, n, difficulty)


def chat_prompt(tokenizer, problem: Problem | str) -> str:
    """The problem in the checkpoint's chat template (:func:`chat_messages`), ready to generate."""
    return tokenizer.apply_chat_template(chat_messages(problem), add_generation_prompt=True)


def base_prompt(problem: Problem) -> str:
    """How a base model (no chat turns learnt yet) is asked: the question and a newline, the prefix of
    a speedrun pretraining document (:func:`nanoseek.speedrun.corpus_text`), so the completion follows."""
    return f"{problem.prompt}\n"


def prompt_builder(tokenizer, prompt_format: str = "chat") -> Callable[[Problem], str]:
    """The function that turns a problem into its prompt text in ``prompt_format`` (:data:`PROMPT_FORMATS`)."""
    if prompt_format == "chat":
        return lambda problem: chat_prompt(tokenizer, problem)
    if prompt_format == "base":
        return base_prompt
    raise ValueError(f"unknown prompt format {prompt_format!r} (choose from {', '.join(PROMPT_FORMATS)})")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k) / C(n, k)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(completions: Sequence[str]) -> str | None:
    """The most frequent parsed answer (whitespace-insensitive; earliest wins ties), or None."""
    answers = [a for a in (parse_answer(c) for c in completions) if a is not None]
    if not answers:
        return None
    keyed = [" ".join(a.split()) for a in answers]
    counts = Counter(keyed)
    best = max(counts.values())
    return next(a for a in keyed if counts[a] == best)


@dataclass
class ProblemResult:
    prompt: str
    answer: str
    completions: list[str]
    verdicts: list[str]
    lengths: list[int]


@dataclass
class EvalResult:
    task: str
    n_problems: int
    samples_per_problem: int
    k: int
    accuracy: float  # mean per-sample correctness (greedy: the one sample)
    pass_at_k: float
    maj_at_k: float
    mean_length: float  # generated tokens per sample
    format_rate: float
    difficulty: int
    seed: int
    problems: list[ProblemResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_problems: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_problems:
            out.pop("problems")
        return out


def score(task: Task, problems: Sequence[Problem], completions: Sequence[Sequence[str]],
          lengths: Sequence[Sequence[int]], k: int, difficulty: int = 1, seed: int = 0) -> EvalResult:
    """Metrics from ``completions[i]`` (the samples for problem i) — no model involved."""
    n_samples = len(completions[0]) if completions else 0
    if any(len(c) != n_samples for c in completions):
        raise ValueError("every problem needs the same number of samples")
    results, correct_total, passes, majors, formats = [], 0, 0.0, 0, 0
    for problem, samples, lens in zip(problems, completions, lengths):
        verdicts = [task.grade(c, problem.fields) for c in samples]
        c = sum(v is Verdict.CORRECT for v in verdicts)
        correct_total += c
        passes += pass_at_k(n_samples, c, k)
        majority = majority_answer(samples)
        majors += majority is not None and task.verify(majority, problem.fields)
        formats += sum(format_ok(s) for s in samples)
        results.append(ProblemResult(problem.prompt, problem.answer, list(samples),
                                     [v.value for v in verdicts], list(lens)))
    n = len(problems)
    total = max(n * n_samples, 1)
    all_lengths = [x for lens in lengths for x in lens]
    return EvalResult(
        task=task.name, n_problems=n, samples_per_problem=n_samples, k=k,
        accuracy=correct_total / total, pass_at_k=passes / max(n, 1), maj_at_k=majors / max(n, 1),
        mean_length=sum(all_lengths) / max(len(all_lengths), 1), format_rate=formats / total,
        difficulty=difficulty, seed=seed, problems=results)


def evaluate(engine, tokenizer, task: Task | str, n_problems: int = 200, difficulty: int = 1,
             samples: int = 1, k: int = 1, temperature: float = 0.0, max_tokens: int = 256,
             seed: int = 0, prompt_fn: Callable[[Problem], str] | None = None, split: str = "test") -> EvalResult:
    """Generate ``samples`` completions per held-out problem with the shared engine and score them.

    With ``samples == 1`` and temperature 0 this is greedy accuracy; for pass@k / maj@k use
    ``samples >= k`` and a temperature > 0. ``prompt_fn(problem) -> str`` builds the prompt (default:
    the checkpoint's chat form, :func:`chat_prompt`; a base model is asked in its pretraining format
    instead). ``split`` picks the problems (:func:`eval_problems`).
    """
    task = get_task(task) if isinstance(task, str) else task
    if samples < k:
        raise ValueError(f"samples ({samples}) must be >= k ({k})")
    problems = eval_problems(task, n_problems, difficulty, seed, split)
    prompt_fn = prompt_fn or prompt_builder(tokenizer)
    prompts, params = [], []
    for i, problem in enumerate(problems):
        text = prompt_fn(problem)
        for j in range(samples):
            prompts.append(text)
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                         seed=None if temperature == 0 else seed * 1_000_003 + i * samples + j))
    outs = engine.generate(prompts, params)
    texts = [[outs[i * samples + j].text for j in range(samples)] for i in range(len(problems))]
    lens = [[len(outs[i * samples + j].token_ids) for j in range(samples)] for i in range(len(problems))]
    return score(task, problems, texts, lens, k, difficulty, seed)
