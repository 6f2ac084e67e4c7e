"""R1 at laptop scale: four pipelines on the cpu speedrun preset, per seed, and their table.

The DeepSeek-R1 paper (arXiv 2501.12948) trains R1-Zero by RL straight from the base model (§2.2),
R1 by cold start → reasoning RL → rejection-sampling SFT → a second RL round (§2.3), and finds that a
small model SFT'd on R1's verified outputs beats the same small model trained by RL (§4.1, Table 6).
This driver runs the laptop-scale version of each, sharing every stage `nanoseek speedrun` already
has (pretraining, cold start, the first GRPO round):

    SFT-only   base → SFT on worked solutions for the device time cold start + GRPO took
    R1-Zero    base → GRPO asked in the base model's document format (no SFT, no chat turns)
    R1         base → cold start → GRPO (the speedrun's stages) → rejection-sampling SFT (the GRPO model's
               verified samples plus a share of the cold-start data) → a second GRPO round
    distill    a student with half the layers and half the width, pretrained on the same corpus and
               tokens → SFT on the R1 model's verified samples, against GRPO straight on that student for
               the same device time (measured: a 4-step probe times its steps, then it resumes to match)

Every accuracy is greedy on the same 500 held-out test problems of the seed (``evaluate``), base
models asked in their document format. Device time is each stage's metered training time (sampling
included, evaluation not). Usage::

    python benchmarks/r1_tables.py --out runs/r1 --seeds 0 1 2 [--speedrun 1=runs/sr1 ...]

``--speedrun SEED=DIR`` reuses a finished ``nanoseek speedrun --seed SEED`` directory (same preset);
otherwise the driver runs it into ``OUT/seed<S>/speedrun``. Each stage already finished (its
``final/`` and eval JSON exist) is skipped on a rerun. Writes ``OUT/seed<S>/rows.json`` per seed and
``OUT/r1_tables.json`` + ``OUT/r1_tables.md`` (mean ± sd over every seed finished under ``OUT``,
so seeds run by separate invocations in parallel end up in one table) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import get_preset  # noqa: E402
from nanoseek.hf import load_with_tokenizer  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.rl.grpo import grpo  # noqa: E402
from nanoseek.speedrun import PRESETS, SUMMARY_FILE, SpeedrunPreset, run_speedrun  # noqa: E402
from nanoseek.tasks.evaluate import base_prompt, evaluate  # noqa: E402
from nanoseek.train.distill import distill  # noqa: E402
from nanoseek.train.pretrain import pretrain  # noqa: E402
from nanoseek.train.sft import COLD_START_FILE, sft  # noqa: E402

#: the student halves these of the teacher (experts and their routing kept)
HALVED = ("hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size", "kv_lora_rank",
          "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
#: rejection sampling (R1 §2.3.3): problems, samples per problem, sampling temperature, and how
#: many cold-start examples ("the original data") are mixed into the SFT set. One sample per problem:
#: a correct worked solution is one deterministic text, so 4 samples of 256 problems left ~250
#: distinct ones (and cost ~5 points); 1,024 × 1 at temperature 0.5 keeps 800-930 and costs ~2
#: (docs/2026-11-28-r1-laptop.md, session 8)
RS_PROMPTS, RS_SAMPLES, RS_TEMPERATURE, RS_ORIGINAL = 1024, 1, 0.5, 1024
#: the student's pretraining learning rate by optimizer. AdamW: 1e-3 (the teacher's 3e-3 left seeds 0-2's
#: students at 47.8 / 63.2 / 69.0%, and seed 0 at 81.6% in another run of the same seed;
#: docs/2026-11-28-r1-laptop.md, session 8). Muon (not listed): the teacher's, 3e-3 on the cpu preset — 92.5 ±
#: 3.8% on seeds 0-2 where 1e-3 gave 38.9 ± 17.9% (docs/2026-11-29-speedrun-overheads.md)
STUDENT_LR = {"adamw": 1e-3}


def student_lr(pretrain: dict) -> float:
    """The student's pretraining lr for the preset's pretraining settings (:data:`STUDENT_LR`)."""
    return STUDENT_LR.get(pretrain.get("optimizer", "adamw"), pretrain["lr"])
#: GRPO steps of the student's timing probe (then it resumes to the distillation's device time)
PROBE_STEPS = 4
#: the second GRPO round draws its problems from another run seed than the first
ROUND2_SEED_OFFSET = 1000

PIPELINES = {  # pipeline → its stages in order (the stage names of the rows)
    "SFT-only": ["base", "sft_long"],
    "R1-Zero": ["base", "grpo_from_base"],
    "R1": ["base", "cold_start", "grpo", "rs_sft", "grpo2"],
    "distill": ["student_base", "student_distilled"],
    "student RL": ["student_base", "student_grpo"],
}


def student_model(model: dict) -> dict:
    """The distillation student: half the layers and half the width of ``model``, no MTP module."""
    return dict(model, **{k: max(1, model[k] // 2) for k in HALVED}, num_nextn_predict_layers=0)


def stage_seconds(run_dir: Path) -> float:
    """Metered device seconds of a run directory (every stage in its ``cost.json``)."""
    return json.loads((run_dir / "cost.json").read_text())["total"]["wall_seconds"]


def held_out(preset: SpeedrunPreset, ckpt: Path, out: Path, seed: int, base: bool) -> dict:
    """Greedy accuracy on the seed's test split (as the speedrun scores its stages), cached in ``out``."""
    if out.is_file():
        return json.loads(out.read_text())
    model, tokenizer = load_with_tokenizer(str(ckpt), "cpu")
    engine = Engine(model, tokenizer, max_slots=64, max_seq_len=512 + preset.eval_max_tokens)
    res = evaluate(engine, tokenizer, preset.task, n_problems=preset.eval_problems, difficulty=preset.difficulty,
                   max_tokens=preset.eval_max_tokens, seed=seed, prompt_fn=base_prompt if base else None).to_dict()
    row = {k: res[k] for k in ("accuracy", "format_rate", "mean_length")}
    out.write_text(json.dumps(row, indent=2) + "\n")
    return row


def run_seed(root: Path, seed: int, speedrun_dir: Path | None, log, preset: str = "cpu") -> list[dict]:
    """Every stage of every pipeline for one seed; returns the rows (also ``rows.json``)."""
    p = PRESETS[preset]
    task = f"{p.task}:{p.difficulty}"
    root.mkdir(parents=True, exist_ok=True)
    sr = speedrun_dir or root / "speedrun"
    if not (sr / SUMMARY_FILE).is_file():
        run_speedrun(sr, preset=preset, seed=seed, log=log)
    common = dict(seed=seed, device="cpu")

    def sft_settings(**changes) -> dict:
        return {**{k: v for k, v in p.sft.items() if k != "cold_start_n"}, **changes}

    def held_out_at(run_dir: Path, base: bool = False) -> dict:
        return held_out(p, run_dir / "final", run_dir / "eval.json", seed, base)
    rows: list[dict] = []

    def row(stage: str, result: dict, seconds: float | None) -> None:
        rows.append({"seed": seed, "stage": stage, "seconds": seconds, **result})
        log(f"r1_tables: seed {seed} {stage}: {result['accuracy']:.1%} held-out, "
            f"{result['mean_length']:.0f} tokens" + (f", {seconds:.0f} s" if seconds else ""))

    def done(run_dir: Path) -> bool:
        return (run_dir / "final" / "config.json").is_file()

    # the speedrun's stages: base, cold start, the first GRPO round
    for stage, name in (("base", "pretrain"), ("cold_start", "sft"), ("grpo", "grpo")):
        result = json.loads((sr / f"eval_{name}.json").read_text())
        row(stage, {k: result[k] for k in ("accuracy", "format_rate", "mean_length")}, stage_seconds(sr / name))
    base, rl1 = sr / "pretrain" / "final", sr / "grpo" / "final"

    # SFT-only: the cold start's steps plus as many more as the first GRPO round's device time buys
    sft_steps = p.sft["max_steps"]
    per_step = stage_seconds(sr / "sft") / sft_steps
    long_steps = sft_steps + round(stage_seconds(sr / "grpo") / per_step)
    d = root / "sft_long"
    if not done(d):
        sft(d, dict(sft_settings(max_steps=long_steps, checkpoint_every=long_steps, eval_every=long_steps),
                    init_from=str(base), cold_start=[task], cold_start_n=long_steps * p.sft["batch_size"],
                    **common), log=log)
    row("sft_long", held_out_at(d), stage_seconds(d))

    # R1-Zero: GRPO straight from the base model, asked as its documents begin
    d = root / "grpo_from_base"
    if not done(d):
        grpo(d, init_from=str(base), task=task, prompt_format="base", **p.grpo, **common, log=log)
    row("grpo_from_base", held_out_at(d, base=True), stage_seconds(d))

    # R1: rejection-sampling SFT on the GRPO model's verified samples + some original data, then GRPO again
    d = root / "rs_sft"
    if not done(d):
        original = root / "rs_original_data.jsonl"
        lines = (sr / "sft" / COLD_START_FILE).read_text().splitlines()[:RS_ORIGINAL]
        original.write_text("\n".join(lines) + "\n")
        distill(d, dict(sft_settings(), teacher=str(rl1), init_from=str(rl1), task=task, prompts=RS_PROMPTS,
                        samples_per_prompt=RS_SAMPLES, temperature=RS_TEMPERATURE, max_tokens=p.grpo["max_tokens"],
                        data=[str(original)], **common), log=log)
    row("rs_sft", held_out_at(d), stage_seconds(d))
    d2 = root / "grpo2"
    if not done(d2):
        grpo(d2, init_from=str(d / "final"), task=task, **p.grpo,
             **dict(common, seed=seed + ROUND2_SEED_OFFSET), log=log)
    row("grpo2", held_out_at(d2), stage_seconds(d2))
    r1_final = d2 / "final"

    # distillation vs RL on a half-size student pretrained on the same corpus and tokens (lower lr)
    d = root / "student"
    if not done(d):
        config = root / "student_config.json"
        get_preset("small").replace(vocab_size=p.vocab_size, **student_model(p.model)).save(config)
        pretrain(d, dict(config=str(config), data=[str(sr / "corpus.jsonl")], tokenizer=str(base),
                         **dict(p.pretrain, lr=student_lr(p.pretrain)), **common), log=log)
    student = d / "final"
    row("student_base", held_out_at(d, base=True), stage_seconds(d))
    d = root / "student_distilled"
    if not done(d):
        distill(d, dict(sft_settings(), teacher=str(r1_final), init_from=str(student), task=task,
                        prompts=RS_PROMPTS, samples_per_prompt=RS_SAMPLES, temperature=RS_TEMPERATURE,
                        max_tokens=p.grpo["max_tokens"], **common), log=log)
    distill_seconds = stage_seconds(d)
    row("student_distilled", held_out_at(d), distill_seconds)
    d = root / "student_grpo"
    if not done(d):
        rl = dict(p.grpo, checkpoint_every=PROBE_STEPS)
        grpo(d, init_from=str(student), task=task, prompt_format="base", **dict(rl, steps=PROBE_STEPS), **common,
             log=log)
        steps = max(PROBE_STEPS, round(distill_seconds / (stage_seconds(d) / PROBE_STEPS)))
        if steps > PROBE_STEPS:
            grpo(d, resume=True, init_from=str(student), task=task, prompt_format="base", **dict(rl, steps=steps),
                 **common, log=log)
    row("student_grpo", held_out_at(d, base=True), stage_seconds(d))
    (root / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return f"{statistics.mean(xs):.1%} ± {sd:.1%}" if len(xs) > 1 else f"{xs[0]:.1%}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per pipeline stage, mean ± sd over seeds of held-out accuracy, the mean
    answer length and each seed's device minutes for the stage (per seed: runs that shared the
    machine took longer, an average would hide it)."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| pipeline | stage | held-out accuracy (seeds {', '.join(map(str, seeds))}) | per seed | "
             "answer tokens | stage minutes per seed |", "|---|---|---:|---|---:|---:|"]
    for pipeline, stages in PIPELINES.items():
        for stage in stages:
            rs = [r for r in rows if r["stage"] == stage]
            if not rs:
                continue
            accs = [r["accuracy"] for r in rs]
            lines.append(f"| {pipeline} | {stage} | {mean_sd(accs)} | "
                         + " / ".join(f"{a:.1%}" for a in accs)
                         + f" | {statistics.mean(r['mean_length'] for r in rs):.0f} | "
                         + " / ".join(f"{r['seconds'] / 60:.1f}" if r["seconds"] else "–" for r in rs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS), help="the speedrun preset (tiny: a smoke run)")
    ap.add_argument("--speedrun", action="append", default=[], metavar="SEED=DIR",
                    help="reuse a finished cpu-preset speedrun of that seed")
    args = ap.parse_args(argv)
    given = {int(k): Path(v) for k, v in (s.split("=", 1) for s in args.speedrun)}
    for seed in args.seeds:
        run_seed(args.out / f"seed{seed}", seed, given.get(seed), print, args.preset)
    # every seed finished under --out so far, also those of other invocations (seeds run in parallel)
    rows = [row for path in sorted(args.out.glob("seed*/rows.json")) for row in json.loads(path.read_text())]
    (args.out / "r1_tables.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "r1_tables.md").write_text(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
