"""Distillation (R1 §2.3.3 and §4): rejection-sample a teacher, then plain SFT of a student on what survives.

Rejection sampling
    For ``prompts`` training problems of a task (problem seeds below
    :data:`~nanoseek.tasks.evaluate.EVAL_SEED_BASE`), the teacher samples ``samples_per_prompt``
    completions of the chat prompt (:func:`~nanoseek.tasks.evaluate.chat_prompt`) through the shared
    :class:`~nanoseek.infer.engine.Engine`. A completion is kept only when, in this order of checks,

    1. the verifier says CORRECT (else rejected as ``wrong``, ``malformed`` or ``missing``: the
       task's :class:`~nanoseek.tasks.base.Verdict`),
    2. it is well formed, ``<think>…</think> <answer>…</answer>`` and nothing else
       (:func:`~nanoseek.tasks.base.format_ok`; else ``bad_format``),
    3. it is at most ``max_length_chars`` characters long when that is set (else ``too_long``),
    4. its text differs from every completion already kept for the same prompt (else ``duplicate``).

    Each rejected sample counts under the first check it fails, so ``kept + sum(rejected) ==
    sampled``. The kept ones become chat examples (``chat_messages(problem)`` + the completion as the
    assistant turn) in ``RUN_DIR/distill_data.jsonl``; the counts go to ``RUN_DIR/distill_stats.json``.
    No kept sample is an error ("no verified samples"): there is nothing to distil.

SFT of the student
    Then the student trains on that file through :func:`nanoseek.train.sft.sft` with stage
    ``"distill"``: a fresh model of ``student_preset`` with the teacher's tokenizer (the vocabulary is
    sized from it), or ``student_init`` (a checkpoint, with its own tokenizer: the data is text). R1
    §4: this plain SFT on the teacher's verified samples beat RL on the small models.

The sampling time is charged to stage ``"distill_sampling"`` of ``cost.json``, the training to
``"distill"``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..device import pick_device
from ..errors import NanoseekError
from ..fsutil import write_json_durable
from ..hf import load_with_tokenizer
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..tasks.base import Verdict, chat_messages, format_ok, parse_task_spec
from ..tasks.coldstart import write_jsonl
from ..tasks.evaluate import EVAL_SEED_BASE, chat_prompt
from ..tasks.registry import get_task
from .config import DistillConfig
from .cost import CostMeter
from .sft import sft

STAGE = "distill"
DATA_FILE = "distill_data.jsonl"
STATS_FILE = "distill_stats.json"
REJECT_REASONS = ("wrong", "malformed", "missing", "bad_format", "too_long", "duplicate")


@dataclass
class DistillStats:
    prompts: int = 0
    sampled: int = 0
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REJECT_REASONS})
    prompts_with_kept: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reject_reason(task, problem, text: str, kept_texts: set[str], max_length_chars: int | None) -> str | None:
    """Why the completion ``text`` is rejected (one of :data:`REJECT_REASONS`), or ``None`` to keep it."""
    verdict = task.grade(text, problem.fields)
    if verdict is not Verdict.CORRECT:
        return verdict.value
    if not format_ok(text):
        return "bad_format"
    if max_length_chars is not None and len(text) > max_length_chars:
        return "too_long"
    if text in kept_texts:
        return "duplicate"
    return None


def filter_completions(task, problems: Sequence, completions: Sequence[Sequence[str]],
                       max_length_chars: int | None = None) -> tuple[list[dict], DistillStats]:
    """Chat records of the kept completions (``completions[i]``: the samples for ``problems[i]``) and the
    counts. Records keep problem order, then sample order."""
    stats = DistillStats(prompts=len(problems))
    records = []
    for problem, samples in zip(problems, completions):
        kept: set[str] = set()
        for text in samples:
            stats.sampled += 1
            reason = reject_reason(task, problem, text, kept, max_length_chars)
            if reason is not None:
                stats.rejected[reason] += 1
                continue
            kept.add(text)
            stats.kept += 1
            records.append({"messages": chat_messages(problem) + [{"role": "assistant", "content": text}],
                            "task": task.name, "answer": problem.answer})
        stats.prompts_with_kept += bool(kept)
    return records, stats


def sample_teacher(engine, tokenizer, problems: Sequence, samples_per_prompt: int, temperature: float,
                   max_tokens: int, seed: int) -> tuple[list[list[str]], int]:
    """``samples_per_prompt`` completions per problem (chat prompt), each with its own sampling seed;
    returns (texts per problem, generated tokens)."""
    prompts, params = [], []
    for i, problem in enumerate(problems):
        text = chat_prompt(tokenizer, problem)
        for j in range(samples_per_prompt):
            prompts.append(text)
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=False,
                                         seed=None if temperature == 0 else
                                         seed * 1_000_003 + i * samples_per_prompt + j))
    outs = engine.generate(prompts, params)
    k = samples_per_prompt
    texts = [[outs[i * k + j].text for j in range(k)] for i in range(len(problems))]
    return texts, sum(len(o.token_ids) for o in outs)


def rejection_sample(run_dir: Path, teacher: str, task_spec: str, prompts: int, samples_per_prompt: int,
                     temperature: float, max_tokens: int, max_length_chars: int | None, seed: int,
                     device: str = "auto", max_slots: int = 32, price_per_device_hour: float = 2.0,
                     log: Callable = print) -> DistillStats:
    """Sample the teacher, filter, write ``RUN_DIR/distill_data.jsonl`` and ``distill_stats.json``."""


    name, difficulty = parse_task_spec(task_spec, flag="--task")
    task = get_task(name)
    difficulty = difficulty or 1
    if not 0 <= seed < EVAL_SEED_BASE:
        raise NanoseekError(f"--seed must lie in [0, {EVAL_SEED_BASE}) (the seeds above are held out for "
                            f"evaluation), got {seed}")
    problems = task.generate(seed, prompts, difficulty)
    dev = pick_device(device)
    meter = CostMeter(run_dir, "distill_sampling", dev, price_per_device_hour=price_per_device_hour)
    meter.start()
    try:
        model, tokenizer = load_with_tokenizer(teacher, device)
        longest = max(len(tokenizer.encode(chat_prompt(tokenizer, p))) for p in problems)
        engine = Engine(model, tokenizer, max_slots=max(1, min(max_slots, prompts * samples_per_prompt)),
                        max_seq_len=longest + max_tokens + 1)
        log(f"distill: sampling {samples_per_prompt} completion(s) for each of {prompts} {name} problems "
            f"(difficulty {difficulty}) from {teacher} at temperature {temperature}, up to {max_tokens} tokens")
        with torch.no_grad():
            texts, n_tokens = sample_teacher(engine, tokenizer, problems, samples_per_prompt, temperature,
                                             max_tokens, seed)
        del engine, model
        meter.add_tokens(n_tokens)
        meter.add_samples(prompts * samples_per_prompt)
    finally:
        meter.stop()
        meter.save()
    records, stats = filter_completions(task, problems, texts, max_length_chars)
    summary = dict(stats.to_dict(), teacher=str(teacher), task=name, difficulty=difficulty,
                   samples_per_prompt=samples_per_prompt, temperature=temperature, max_tokens=max_tokens,
                   max_length_chars=max_length_chars, seed=seed)

    write_json_durable(run_dir / STATS_FILE, summary)
    rejected = ", ".join(f"{r} {c}" for r, c in stats.rejected.items() if c) or "none"
    log(f"distill: kept {stats.kept} of {stats.sampled} samples ({stats.prompts_with_kept} of {stats.prompts} "
        f"prompts have one); rejected: {rejected}")
    if not records:
        raise NanoseekError(f"distill: no verified samples: all {stats.sampled} teacher samples on {name} were "
                            f"rejected ({rejected}); use a stronger teacher, more --samples-per-prompt or "
                            f"--max-tokens, or an easier task difficulty")
    write_jsonl(records, run_dir / DATA_FILE)
    return stats


def distill(out: str | os.PathLike, overrides: dict[str, Any], resume: bool = False, log: Callable = print) -> dict:
    """Rejection-sample the teacher on the task and SFT the student on the kept samples, all in
    ``out``. ``overrides`` are :class:`~nanoseek.train.config.DistillConfig` fields (``seed`` also
    seeds the problems and the sampling); every one is saved with the run. Returns the SFT summary
    plus ``"distill_stats"``."""
    run_dir = Path(out).expanduser().resolve()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        result = sft(run_dir, overrides, resume=True, log=log, stage=STAGE, config_cls=DistillConfig)
        stats_path = run_dir / STATS_FILE
        result["distill_stats"] = json.loads(stats_path.read_text()) if stats_path.is_file() else None
        return result
    if overrides.get("teacher") is None or overrides.get("task") is None:
        raise NanoseekError("distill needs --teacher CKPT and --task TASK[:DIFFICULTY]")
    if (overrides.get("preset") is None) == (overrides.get("init_from") is None):
        raise NanoseekError("distill needs exactly one student: --student-preset NAME (a fresh model with the "
                            "teacher's tokenizer) or --student-init CKPT")
    teacher = overrides["teacher"] = os.path.abspath(os.path.expanduser(overrides["teacher"]))
    if not (Path(teacher) / "config.json").is_file() or not (Path(teacher) / "tokenizer.json").is_file():
        raise NanoseekError(f"--teacher {teacher}: not a checkpoint directory with config.json and tokenizer.json")
    if overrides.get("preset") is not None:
        overrides["tokenizer"] = teacher
    overrides["data"] = [str(run_dir / DATA_FILE)] + [str(p) for p in overrides.get("data") or []]
    cfg = DistillConfig.from_dict(overrides)  # every setting checked before any work
    get_task(parse_task_spec(cfg.task, flag="--task")[0])  # an unknown task fails before any work

    def make_data(log_fn: Callable) -> None:
        rejection_sample(run_dir, cfg.teacher, cfg.task, cfg.prompts, cfg.samples_per_prompt, cfg.temperature,
                         cfg.max_tokens, cfg.max_length_chars, cfg.seed, device=cfg.device, max_slots=cfg.max_slots,
                         price_per_device_hour=cfg.price_per_device_hour, log=log_fn)

    result = sft(run_dir, overrides, resume=False, log=log, stage=STAGE, make_data=make_data,
                 config_cls=DistillConfig)
    result["distill_stats"] = json.loads((run_dir / STATS_FILE).read_text())
    return result


__all__ = ["DATA_FILE", "DistillStats", "REJECT_REASONS", "STATS_FILE", "distill", "filter_completions",
           "reject_reason", "rejection_sample", "sample_teacher"]
