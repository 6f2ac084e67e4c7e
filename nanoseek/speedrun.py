"""``nanoseek speedrun``: the R1 story end to end on synthetic verifiable tasks.

    corpus → tokenizer → pretrain → eval → [context extension → eval] → cold-start SFT → eval → GRPO → eval
    → report card

Run directory::

    corpus.jsonl            generated problems with solver-written worked solutions (pretraining text);
                            with ``answer_only_fraction`` > 0 a share of them state only the answer,
                            a habit RL can find does not pay (R1-Zero's story)
    pretrain/ sft/ grpo/    each stage's own run directory (checkpoints, metrics, cost, report)
    extend/                 with ``extend=True``: YaRN context extension (V3 report §4.3) after pretraining
    final/                  the best chat stage's model + tokenizer (SFT or GRPO, by accuracy on the
                            validation split; the later stage on a tie): what `nanoseek serve/chat` take
    metrics.jsonl, incidents.jsonl, cost.json   all stages merged
    eval_<stage>.json       held-out results after each stage
    summary.json            per stage: held-out accuracy, format rate, tokens, device-hours, $; the
                            validation accuracies and which stage final/ holds
    report.md + *.png       the report card

Every problem the model trains on comes from seeds below :data:`~nanoseek.tasks.evaluate.EVAL_SEED_BASE`;
every evaluation uses seeds at or above it: the reported held-out accuracies the test split's, the
choice of final/ the validation split's, so the choice never sees the problems it is reported on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import get_preset
from .device import autocast_dtype, device_name, pick_device
from .errors import NanoseekError
from .hf import load_with_tokenizer
from .infer.engine import Engine
from .report import write_report
from .rl.grpo import grpo
from .tasks import answer_only_mix, format_completion, get_task
from .tasks.evaluate import base_prompt, evaluate
from .train.extend import extend as extend_context
from .train.pretrain import pretrain
from .train.sft import sft

SUMMARY_FILE = "summary.json"


@dataclass
class SpeedrunPreset:
    """Everything one speedrun does; the presets below are tuned for their hardware budget."""

    name: str
    task: str
    difficulty: int
    model: dict[str, Any]  # ModelConfig fields on top of the "small" preset (vocab follows the tokenizer)
    corpus_problems: int
    vocab_size: int
    pretrain: dict[str, Any]  # TrainConfig fields
    sft: dict[str, Any]
    grpo: dict[str, Any]
    #: ExtendConfig fields of the optional context-extension stage (factor, seq_len, steps, ...)
    extend: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_problems: int = 200
    #: problems of the validation split that choose the final model among the chat stages
    validation_problems: int = 200
    eval_max_tokens: int = 160
    #: problems the evaluations decode together: a decode step of the cpu model costs about the same
    #: at 64 rows as at 256 (per-step overhead), so 256 slots take a 500-problem evaluation from 6.6 to
    #: 4.7 s on 2 cores (docs/2026-11-29-speedrun-overheads.md)
    eval_slots: int = 256
    #: share of corpus documents and cold-start examples that state the answer without the working
    #: (:func:`~nanoseek.tasks.base.answer_only`); the choice between the two habits is left to RL
    answer_only_fraction: float = 0.0
    description: str = ""


_CPU_MODEL = dict(hidden_size=192, num_hidden_layers=4, intermediate_size=512, moe_intermediate_size=128,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  num_attention_heads=4, kv_lora_rank=48, q_lora_rank=96, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512, num_nextn_predict_layers=1)

PRESETS: dict[str, SpeedrunPreset] = {
    "cpu": SpeedrunPreset(
        # No MTP module, an all-worked corpus and batches of 8 × 256: at this scale MTP costs 46% more
        # time per step for no better loss (benchmarks/RESULTS.md "Ablations"), and twice the updates
        # per token take the same ~3.3M tokens from 57% to 78% held-out on seed 0
        # (docs/2026-11-28-r1-laptop.md). `--mtp` and `--answer-only 0.6` bring back V3's MTP and
        # R1-Zero's mixed habits. Pretraining uses Muon, not V3's AdamW (`--optimizer adamw` brings it
        # back): on one machine the same 1,600 steps take the base model from 86.6 / 77.2 / 69.8% to
        # 97.4 / 94.8 / 93.2% held-out on seeds 0-2 for ~1.36x the pretraining time in float32
        # (docs/2026-11-29-muon.md); on CPUs with bf16 instructions the training stages autocast to
        # bf16 (--precision auto): 6.1 instead of 8.4 minutes there (docs/2026-11-29-cpu-bf16.md).
        name="cpu", task="arithmetic", difficulty=2, model=dict(_CPU_MODEL, num_nextn_predict_layers=0),
        corpus_problems=40000, vocab_size=512,
        pretrain=dict(max_steps=1600, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=60, optimizer="muon",
                      checkpoint_every=800, eval_every=800, log_every=20),
        # Cold start 90 steps, then GRPO on the problems the model's greedy answer gets wrong (8 × 8
        # candidates screened per step, 10 steps): on seeds 0-2 this takes the same base models from
        # 82.4% (30 SFT steps, 20 unscreened GRPO steps) to 86.2% in about the same time (seed 0: SFT
        # 55 s + GRPO 44 s; the old stages took 24 + 71 s) (docs/2026-11-28-r1-laptop.md, session 7).
        sft=dict(cold_start_n=2000, max_steps=90, batch_size=16, seq_len=256, lr=3e-4, warmup_steps=3,
                 checkpoint_every=90, eval_every=90, log_every=10),
        grpo=dict(steps=10, prompts_per_step=8, screen_factor=8, group_size=8, max_tokens=110, temperature=1.0,
                  lr=1e-4, train_layers=1, beta=0.0, checkpoint_every=10, eval_every=0),
        extend=dict(factor=4, seq_len=1024, max_steps=40, batch_size=4, lr=3e-4, warmup_steps=4,
                    checkpoint_every=40, eval_every=40, log_every=10),
        eval_problems=500, answer_only_fraction=0.0,
        description="~3M-parameter DeepSeek-V3 (MLA, 8 routed + 1 shared experts; MTP with --mtp) on 2-digit "
                    "arithmetic with worked solutions, pretrained with Muon; 5-6 minutes on 2 CPU cores with AVX512-BF16 "
                    "(bf16 autocast), longer in float32 elsewhere"),
    "tiny": SpeedrunPreset(
        name="tiny", task="arithmetic", difficulty=1, corpus_problems=600, vocab_size=320,
        model=dict(_CPU_MODEL, hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                   kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        pretrain=dict(max_steps=8, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=2, optimizer="muon",
                      checkpoint_every=8, eval_every=8, log_every=2),
        sft=dict(cold_start_n=64, max_steps=4, batch_size=4, seq_len=320, lr=1e-3, warmup_steps=1,
                 checkpoint_every=4, eval_every=4, log_every=2),
        grpo=dict(steps=2, prompts_per_step=2, screen_factor=2, group_size=4, max_tokens=24, temperature=1.0,
                  lr=1e-4, train_layers=1, beta=0.0, checkpoint_every=2, eval_every=0),
        extend=dict(factor=2, seq_len=256, max_steps=2, batch_size=1, warmup_steps=1, checkpoint_every=2,
                    eval_every=2, log_every=1),
        eval_problems=8, validation_problems=8, eval_max_tokens=24, answer_only_fraction=0.6,
        description="a seconds-long smoke run of every stage (CI)"),
    "gpu-small": SpeedrunPreset(
        name="gpu-small", task="arithmetic", difficulty=3, corpus_problems=200000, vocab_size=1024,
        model=dict(num_nextn_predict_layers=1, max_position_embeddings=1024),
        pretrain=dict(max_steps=3000, batch_size=64, seq_len=512, lr=2e-3, warmup_steps=100,
                      checkpoint_every=500, eval_every=500, log_every=20),
        sft=dict(cold_start_n=8000, max_steps=300, batch_size=32, seq_len=512, lr=5e-4, warmup_steps=20,
                 checkpoint_every=300, eval_every=100, log_every=10),
        grpo=dict(steps=200, prompts_per_step=64, group_size=8, max_tokens=256, temperature=1.0, lr=1e-4,
                  beta=0.0, checkpoint_every=50, eval_every=50),
        extend=dict(factor=4, seq_len=2048, max_steps=200, batch_size=16, lr=2e-4, warmup_steps=10,
                    checkpoint_every=200, eval_every=100),
        eval_problems=500, eval_max_tokens=256, answer_only_fraction=0.6,
        description="the 16M-parameter `small` model on 3-digit arithmetic, for one GPU"),
}


def corpus_text(problem) -> str:
    """A pretraining document: the question, a newline (where the chat template puts its role tokens)
    and the completion. The chat form's constant system instruction is left out: repeated in every
    document it took a quarter of each step's tokens and taught nothing; the cold-start SFT, which
    teaches the role tokens, also teaches the model to read past it."""

    return f"{problem.prompt}\n{format_completion(problem)}"


def best_stage(validation: dict[str, float]) -> str:
    """The stage whose model scored best on the validation split; on a tie the later stage (the
    pipeline's order), so RL that neither helps nor hurts still gives the final model."""
    return max(reversed(list(validation)), key=validation.__getitem__)


def write_corpus(path: Path, preset: SpeedrunPreset, seed: int) -> int:

    problems = answer_only_mix(get_task(preset.task).generate(seed, preset.corpus_problems, preset.difficulty),
                               preset.answer_only_fraction, seed)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"text": corpus_text(p)}) + "\n")
    return len(problems)


def _merge_jsonl(parts: list[Path], out: Path) -> None:
    with open(out, "w", encoding="utf-8") as dst:
        for part in parts:
            if part.is_file():
                dst.write(part.read_text(encoding="utf-8"))


def _merge_costs(stage_dirs: list[Path], extra: dict[str, dict], out: Path) -> dict:
    stages: dict[str, dict] = {}
    price = None
    for d in stage_dirs:
        path = d / "cost.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            stages.update(data.get("stages", {}))
            price = data.get("price_per_device_hour", price)
    stages.update(extra)
    total = {key: sum(s.get(key, 0) or 0 for s in stages.values())
             for key in ("device_hours", "usd", "tokens", "samples", "wall_seconds")}
    merged = {"price_per_device_hour": price if price is not None else 2.0, "stages": stages, "total": total}
    out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return merged


class _Clock:
    """Charges wall time that no training stage's meter saw (evaluation; data, tokenizer and model
    setup) as a cost stage of its own, at the same price, so the totals equal real wall-clock."""

    def __init__(self, device_type: str, device: str, price: float):
        self.seconds, self.samples = 0.0, 0
        self.device_type, self.device, self.price = device_type, device, price

    def as_stage(self) -> dict:
        hours = self.seconds / 3600
        return {"device_type": self.device_type, "device": self.device, "n_devices": 1,
                "wall_seconds": self.seconds, "device_hours": hours, "tokens": 0, "samples": self.samples,
                "usd": hours * self.price, "price_per_device_hour": self.price}


def run_speedrun(out: str | Path, preset: str = "cpu", seed: int = 0, device: str = "auto",
                 price_per_device_hour: float = 2.0, log: Callable[[str], None] = print,
                 answer_only_fraction: float | None = None, compile: bool = False, extend: bool = False,
                 mtp: bool | None = None, optimizer: str | None = None, precision: str = "auto") -> dict:
    """Run every stage into ``out``; returns the summary (also written to ``out/summary.json``).
    ``answer_only_fraction`` replaces the preset's :attr:`SpeedrunPreset.answer_only_fraction`;
    ``mtp`` gives the model one multi-token-prediction module (True) or none (False) whatever the
    preset says; ``optimizer`` (``adamw`` / ``muon``) replaces the pretraining stage's optimizer;
    ``precision`` is the training stages' compute dtype (:func:`nanoseek.device.autocast_dtype`; GRPO's
    one-layer updates stay float32);
    ``compile`` runs every training step and every decode step through ``torch.compile``; ``extend``
    adds the context-extension stage (:attr:`SpeedrunPreset.extend`) between pretraining and SFT."""

    if preset not in PRESETS:
        raise NanoseekError(f"unknown speedrun preset {preset!r} (choose from {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if answer_only_fraction is not None:
        if not 0.0 <= answer_only_fraction <= 1.0:
            raise NanoseekError(f"--answer-only must lie in [0, 1], got {answer_only_fraction}")
        p = dataclasses.replace(p, answer_only_fraction=answer_only_fraction)
    if mtp is not None:
        p = dataclasses.replace(p, model=dict(p.model, num_nextn_predict_layers=int(mtp)))
    if optimizer is not None:
        p = dataclasses.replace(p, pretrain=dict(p.pretrain, optimizer=optimizer))
    run = Path(out).expanduser().resolve()
    if (run / SUMMARY_FILE).exists():
        raise NanoseekError(f"{run} already holds a finished speedrun ({SUMMARY_FILE}); choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    training_precision = str(autocast_dtype(dev, precision) or "float32").replace("torch.", "")
    clock = _Clock(dev.type, device_name(dev), price_per_device_hour)
    setup = _Clock(dev.type, device_name(dev), price_per_device_hour)

    def timed_stage(name: str, fn, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        metered = json.loads((run / name / "cost.json").read_text(encoding="utf-8"))["stages"]
        setup.seconds += max(0.0, time.perf_counter() - t0 - sum(s["wall_seconds"] for s in metered.values()))
    started = time.perf_counter()
    log(f"speedrun[{p.name}]: {p.description}\nspeedrun: device {dev} ({device_name(dev)}), run directory {run}")

    corpus = run / "corpus.jsonl"
    n = write_corpus(corpus, p, seed)
    log(f"speedrun: corpus of {n} {p.task} problems (difficulty {p.difficulty}), "
        f"{p.answer_only_fraction:.0%} answering without the working, the rest with worked solutions")

    def held_out(stage: str, ckpt: Path, prompt_fn: Callable | None = None) -> dict:
        """Test-split accuracy of ``ckpt`` (``eval_<stage>.json``), and for chat models the
        validation-split accuracy that picks the final model."""
        t0 = time.perf_counter()
        model, tokenizer = load_with_tokenizer(str(ckpt), device)
        engine = Engine(model, tokenizer, max_slots=min(p.eval_slots, max(p.eval_problems, p.validation_problems)),
                        max_seq_len=512 + p.eval_max_tokens, compile=compile)
        scored = dict(difficulty=p.difficulty, max_tokens=p.eval_max_tokens, seed=seed, prompt_fn=prompt_fn)
        result = evaluate(engine, tokenizer, p.task, n_problems=p.eval_problems, **scored).to_dict()
        (run / f"eval_{stage}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        clock.samples += p.eval_problems
        log(f"speedrun: {stage}: held-out accuracy {result['accuracy']:.1%}, format rate "
            f"{result['format_rate']:.1%}, mean length {result['mean_length']:.0f} tokens")
        if prompt_fn is None:  # a chat model: a candidate for final/
            validation[stage] = evaluate(engine, tokenizer, p.task, n_problems=p.validation_problems,
                                         split="validation", **scored).accuracy
            clock.samples += p.validation_problems
        clock.seconds += time.perf_counter() - t0
        return result

    validation: dict[str, float] = {}
    common = dict(seed=seed, device=device, price_per_device_hour=price_per_device_hour, compile=compile)
    trained = dict(common, precision=precision)  # the TrainConfig stages
    n_stages = 4 if extend else 3
    log(f"speedrun: stage 1/{n_stages}: pretrain")
    model_config = run / "model_config.json"
    get_preset("small").replace(vocab_size=p.vocab_size, **p.model).save(model_config)
    timed_stage("pretrain", pretrain, run / "pretrain",
                dict(config=str(model_config), data=[str(corpus)], vocab_size=p.vocab_size, **p.pretrain, **trained),
                log=log)
    results = {"pretrain": held_out("pretrain", run / "pretrain" / "final", base_prompt)}
    base = run / "pretrain" / "final"
    if extend:
        log(f"speedrun: stage 2/{n_stages}: context extension (YaRN ×{p.extend['factor']:g})")
        timed_stage("extend", extend_context, run / "extend",
                    dict(init_from=str(base), data=[str(corpus)], original_max_position_embeddings=p.pretrain["seq_len"],
                         **p.extend, **trained), log=log)
        base = run / "extend" / "final"
        results["extend"] = held_out("extend", base, base_prompt)

    log(f"speedrun: stage {n_stages - 1}/{n_stages}: cold-start SFT")
    sft_cfg = dict(p.sft)
    cold_n = sft_cfg.pop("cold_start_n")
    timed_stage("sft", sft, run / "sft", dict(init_from=str(base),
                                              cold_start=[f"{p.task}:{p.difficulty}"], cold_start_n=cold_n,
                                              cold_start_answer_only=p.answer_only_fraction,
                                              **sft_cfg, **trained), log=log)
    results["sft"] = held_out("sft", run / "sft" / "final")

    log(f"speedrun: stage {n_stages}/{n_stages}: GRPO")
    timed_stage("grpo", grpo, run / "grpo", init_from=str(run / "sft" / "final"), task=f"{p.task}:{p.difficulty}",
                **p.grpo, **common, log=log)
    results["grpo"] = held_out("grpo", run / "grpo" / "final")

    final, final_stage = run / "final", best_stage(validation)
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(run / final_stage / "final", final)
    log(f"speedrun: final model: the {final_stage} stage's (validation accuracy "
        + ", ".join(f"{stage} {acc:.1%}" for stage, acc in validation.items()) + ")")

    stage_dirs = [run / s for s in ("pretrain", "extend", "sft", "grpo") if s in results]
    _merge_jsonl([d / "metrics.jsonl" for d in stage_dirs], run / "metrics.jsonl")
    _merge_jsonl([d / "incidents.jsonl" for d in stage_dirs], run / "incidents.jsonl")
    costs = _merge_costs(stage_dirs, {"eval": clock.as_stage(), "setup": setup.as_stage()}, run / "cost.json")
    summary = {"preset": p.name, "seed": seed, "task": p.task, "difficulty": p.difficulty,
               "answer_only_fraction": p.answer_only_fraction, "optimizer": p.pretrain.get("optimizer", "adamw"),
               "training_precision": training_precision,
               "wall_seconds": time.perf_counter() - started, "device": device_name(dev), "stages": {}}
    previous = None
    for stage, res in results.items():
        c = costs["stages"].get(stage, {})
        summary["stages"][stage] = {
            "accuracy": res["accuracy"], "format_rate": res["format_rate"], "mean_length": res["mean_length"],
            "accuracy_gain": None if previous is None else res["accuracy"] - previous,
            "tokens": c.get("tokens"), "device_hours": c.get("device_hours"), "usd": c.get("usd")}
        previous = res["accuracy"]
    summary["total"] = costs["total"]
    summary["final_checkpoint"] = str(final)
    summary["final_stage"] = final_stage
    summary["validation_accuracy"] = validation
    (run / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    report = write_report(run)
    log(f"speedrun: done in {summary['wall_seconds'] / 60:.1f} min; report card {report}")
    log(f"  chat with it:   nanoseek chat --ckpt {final}\n  serve it:       nanoseek serve --ckpt {final}")
    return summary
