"""DeepSeek-V3's ablations at laptop scale: MTP on/off, balancing strategies, MoE vs dense.

    python benchmarks/ablations.py --out runs/ablations                   # all studies, seeds 0 1 2
    python benchmarks/ablations.py --out runs/abl --study balancing --seeds 0 1 2 3
    python benchmarks/ablations.py --out /tmp/abl --smoke                 # every study in seconds (CI)

Every run pretrains the cpu speedrun's model shape (``nanoseek.speedrun.PRESETS["cpu"]``, with V3's
MTP module, which that preset leaves out since this study) on the speedrun's 2-digit arithmetic corpus,
all-worked (no answer-only documents), for ``--steps`` steps (default 120, a stated variant of the 650
the speedrun ran then: three seeds of seven variants must fit about an hour on 2 cores). One tokenizer
and one set of shards serve every run, so runs differ only in what the
study varies and in the seed (model init and data order). Studies:

- ``mtp`` (V3 report Table 4): ``v3`` (one MTP module, λ 0.3 → 0.1) vs ``no-mtp``; main-head
  validation loss, held-out accuracy after the same cold-start SFT, and the acceptance rate the MTP
  module gives speculative decoding (V3 §5.4.3) on the SFT model.
- ``balancing`` (Table 5, Figure 9): auxiliary-loss-free bias (``v3``: γ 0.001 plus V3's tiny
  sequence-wise loss α 1e-4; ``v3-fast-bias``: γ 0.01, since a run of 10² steps moves each bias at
  most γ per step) vs a conventional sequence-wise auxiliary loss (``aux-loss``: γ 0, α 0.01) vs
  ``no-balancing``; validation loss, MaxVio (max load / mean load − 1 per MoE layer and
  batch, §4.5.3) over training, dead experts on held-out text, and expert load by problem kind
  (addition, subtraction, multiplication, countdown) with a specialisation score: the mean total
  variation distance between a kind's expert distribution and the all-kinds one.
- ``moe-dense``: ``v3`` vs ``dense`` (every FFN dense, intermediate size chosen for the same active
  parameters per token) at equal tokens, and ``dense-time`` at the MoE runs' mean wall-clock on this
  machine; validation loss and held-out accuracy after SFT.

A run that finished is reused (its directory holds ``final/``), so an interrupted study resumes.
Writes ``results.json``, ``tables.md``, ``maxvio.png`` and ``specialisation.png`` into ``--out`` and
prints the tables (mean ± sd over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import header  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.data.shards import build_shards  # noqa: E402
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from nanoseek.hf import load_with_tokenizer  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.speedrun import PRESETS, corpus_text, write_corpus  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tasks.evaluate import EVAL_SEED_BASE, evaluate  # noqa: E402
from nanoseek.train.pretrain import pretrain  # noqa: E402
from nanoseek.train.sft import sft  # noqa: E402

DENSE_INTERMEDIATE = 416  # 4 dense FFNs of 416 = 1 of 512 + 3 × (1 shared + 2 routed) × 128 active (cpu shape)

#: what each variant changes: model config fields and pretraining settings
VARIANTS = {
    "v3": ({}, {}),
    "no-mtp": ({"num_nextn_predict_layers": 0}, {}),
    "v3-fast-bias": ({}, {"bias_update_speed": 0.01}),  # γ ×10: V3's 0.001 was set for ~10^5 steps, not 10^2
    "aux-loss": ({}, {"bias_update_speed": 0.0, "aux_loss_alpha": 0.01}),
    "no-balancing": ({}, {"bias_update_speed": 0.0, "aux_loss_alpha": 0.0}),
    "dense": ({"n_routed_experts": 0, "intermediate_size": DENSE_INTERMEDIATE}, {}),
    "dense-time": ({"n_routed_experts": 0, "intermediate_size": DENSE_INTERMEDIATE}, {}),  # steps set at run time
}
STUDIES = {"mtp": ["v3", "no-mtp"], "balancing": ["v3", "v3-fast-bias", "aux-loss", "no-balancing"],
           "moe-dense": ["v3", "dense", "dense-time"]}
DOWNSTREAM = {"mtp", "moe-dense"}  # studies whose variants go on to SFT + held-out accuracy
KINDS = {"addition": "+", "subtraction": "-", "multiplication": "*"}


def settings(smoke: bool, steps: int | None) -> dict:
    cpu = PRESETS["tiny" if smoke else "cpu"]
    # "v3" is V3's whole recipe, MTP included, which the cpu speedrun preset itself now leaves out
    s = dict(model=dict(cpu.model, num_nextn_predict_layers=1), vocab=cpu.vocab_size, corpus=cpu.corpus_problems,
             difficulty=cpu.difficulty,
             # batches of 16 × 256 and 30 warm-up steps, as recorded (the cpu preset's before it went to 8 × 256),
             # V3's AdamW (the preset's pretraining went to Muon after these studies), in float32
             pretrain=dict(cpu.pretrain, optimizer="adamw", precision="float32", max_steps=steps or (3 if smoke else 120),
                           **({} if smoke else dict(batch_size=16, warmup_steps=30))),
             sft=dict(cpu.sft, precision="float32"), eval_n=8 if smoke else 200, eval_max_tokens=cpu.eval_max_tokens,
             kind_problems=16 if smoke else 200)
    s["pretrain"].update(checkpoint_every=s["pretrain"]["max_steps"], eval_every=s["pretrain"]["max_steps"],
                         eval_batches=2 if smoke else 20, log_every=1 if smoke else 5)
    return s


def prepare(out: Path, s: dict) -> tuple[Path, Path]:
    """One tokenizer and one set of shards (seed-0 corpus, all-worked) for every run."""
    tok_dir, shard_dir = out / "tokenizer", out / "shards"
    if (shard_dir / "manifest.json").is_file():
        return tok_dir, shard_dir
    preset = PRESETS["tiny" if s["vocab"] == PRESETS["tiny"].vocab_size else "cpu"]
    corpus = out / "corpus.jsonl"
    write_corpus(corpus, dataclasses.replace(preset, answer_only_fraction=0.0), seed=0)
    train_tokenizer([str(corpus)], s["vocab"], tok_dir, text_field="text")
    build_shards([str(corpus)], load_tokenizer(tok_dir), shard_dir, val_fraction=0.01,
                 min_val_tokens=s["pretrain"]["seq_len"] + 1, text_field="text", overwrite=True)
    return tok_dir, shard_dir


def pretrained(out: Path, s: dict, variant: str, seed: int, tok_dir: Path, shard_dir: Path,
               steps: int | None = None) -> Path:
    run = out / "runs" / variant / f"seed{seed}"
    if (run / "pretrain" / "final").is_dir():
        return run
    model_fields, train_fields = VARIANTS[variant]
    config = run / "model_config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    get_preset("small").replace(vocab_size=s["vocab"], **{**s["model"], **model_fields}).save(config)
    train = dict(s["pretrain"], **train_fields)
    if steps is not None:
        train.update(max_steps=steps, checkpoint_every=steps, eval_every=steps)
    pretrain(run / "pretrain", dict(config=str(config), data=[str(shard_dir)], tokenizer=str(tok_dir), seed=seed,
                                    device="cpu", **train), log=lambda *_: None)
    return run


def downstream(run: Path, s: dict, seed: int, speculative: bool) -> dict:
    """Cold-start SFT as the speedrun does it (all-worked), then greedy held-out accuracy (and the MTP
    acceptance rate of speculative decoding on the same prompts)."""
    out = run / "downstream.json"
    if out.is_file():
        return json.loads(out.read_text())
    cfg = dict(s["sft"])
    n = cfg.pop("cold_start_n")
    if not (run / "sft" / "final").is_dir():
        sft(run / "sft", dict(init_from=str(run / "pretrain" / "final"), cold_start=[f"arithmetic:{s['difficulty']}"],
                              cold_start_n=n, seed=seed, device="cpu", **cfg), log=lambda *_: None)
    model, tokenizer = load_with_tokenizer(str(run / "sft" / "final"), "cpu")
    res = {}
    for mode in ("plain", "mtp") if speculative else ("plain",):
        engine = Engine(model, tokenizer, max_slots=64, max_seq_len=512 + s["eval_max_tokens"],
                        speculative="mtp" if mode == "mtp" else None)
        ev = evaluate(engine, tokenizer, "arithmetic", n_problems=s["eval_n"], difficulty=s["difficulty"],
                      max_tokens=s["eval_max_tokens"], seed=0)
        if mode == "plain":
            res.update(accuracy=ev.accuracy, mean_length=ev.mean_length)
        else:
            res.update(acceptance=engine.stats.acceptance_rate, accuracy_speculative=ev.accuracy)
    out.write_text(json.dumps(res) + "\n")
    return res


def kind_problems(s: dict) -> dict[str, list[str]]:
    """Held-out documents per problem kind (the corpus format), for expert load by kind."""
    arithmetic = get_task("arithmetic").generate(EVAL_SEED_BASE, 4 * s["kind_problems"], s["difficulty"])
    out = {kind: [corpus_text(p) for p in arithmetic if op in p.fields["expression"]][:s["kind_problems"]]
           for kind, op in KINDS.items()}
    out["countdown"] = [corpus_text(p) for p in get_task("countdown").generate(EVAL_SEED_BASE, s["kind_problems"], 1)]
    return {kind: docs for kind, docs in out.items() if docs}  # difficulty 1 has no multiplication


@torch.no_grad()
def expert_load_by_kind(ckpt: Path, texts: dict[str, list[str]]) -> dict[str, list[list[float]]]:
    """Tokens routed to each expert ([MoE layer][expert]) per kind of text, main model only."""
    model, tokenizer = load_with_tokenizer(str(ckpt), "cpu")
    loads = {}
    for kind, docs in texts.items():
        total = None
        for doc in docs:
            ids = torch.tensor([tokenizer.encode(doc)])
            load = model(ids).expert_load.double()
            total = load if total is None else total + load
        loads[kind] = total.tolist()
    return loads


def specialisation(loads: dict[str, list[list[float]]]) -> float:
    """Mean over kinds and MoE layers of the total variation distance between the kind's expert
    distribution and the all-kinds one (0: every kind routed alike; 1: disjoint experts)."""
    per_kind = {k: torch.tensor(v) for k, v in loads.items()}
    overall = sum(per_kind.values())
    overall = overall / overall.sum(dim=1, keepdim=True)
    tv = [0.5 * (v / v.sum(dim=1, keepdim=True) - overall).abs().sum(dim=1).mean() for v in per_kind.values()]
    return float(torch.stack(tv).mean())


def record(run: Path) -> dict:
    """What a pretraining run measured: final validation loss, wall time, MaxVio per logged step."""
    metrics = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    cost = json.loads((run / "pretrain" / "cost.json").read_text())["stages"]["pretrain"]
    rec = {"val_loss": [m["val_loss"] for m in metrics if "val_loss" in m][-1], "wall_seconds": cost["wall_seconds"],
           "tokens": cost["tokens"], "steps": metrics[-1]["step"]}
    vio = [(m["step"], m["max_vio"]) for m in metrics if m.get("max_vio")]
    if vio:
        rec["max_vio_curve"] = vio
        tail = [v for _, v in vio[len(vio) // 2:]]  # second half of training, per layer
        rec["max_vio"] = statistics.fmean(statistics.fmean(v) for v in tail)
    return rec


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4g} ± {sd:.2g}"


def run_study(out: Path, study: str, s: dict, seeds: list[int], tok_dir: Path, shard_dir: Path,
              texts: dict[str, list[str]] | None) -> dict:
    rows: dict[str, list[dict]] = {}
    for variant in STUDIES[study]:
        rows[variant] = []
        for seed in seeds:
            steps = None
            if variant == "dense-time":  # the MoE runs' mean wall-clock, at the dense runs' step time
                moe = [record(out / "runs" / "v3" / f"seed{x}")["wall_seconds"] for x in seeds]
                dense = [record(out / "runs" / "dense" / f"seed{x}") for x in seeds]
                step_time = statistics.fmean(d["wall_seconds"] / d["steps"] for d in dense)
                steps = max(1, round(statistics.fmean(moe) / step_time))
            t0 = time.perf_counter()
            run = pretrained(out, s, variant, seed, tok_dir, shard_dir, steps)
            rec = record(run)
            if study in DOWNSTREAM:
                rec.update(downstream(run, s, seed, speculative=variant == "v3"))
            if study == "balancing":
                loads = expert_load_by_kind(run / "pretrain" / "final", texts)
                rec["load_by_kind"] = loads
                rec["specialisation"] = specialisation(loads)
                total = torch.tensor(list(loads.values())).sum(dim=0)
                rec["dead_experts"] = int((total == 0).sum())
            rows[variant].append(rec)
            print(f"{study}: {variant} seed {seed}: val loss {rec['val_loss']:.4f}"
                  + (f", accuracy {rec['accuracy']:.1%}" if "accuracy" in rec else "")
                  + (f", MaxVio {rec['max_vio']:.3f}" if "max_vio" in rec else "")
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


COLUMNS = {
    "mtp": [("val_loss", "val loss (main head)"), ("accuracy", "held-out acc. after SFT"),
            ("acceptance", "MTP acceptance")],
    "balancing": [("val_loss", "val loss"), ("max_vio", "MaxVio (2nd half, mean of layers)"),
                  ("dead_experts", "dead experts"), ("specialisation", "specialisation (TV)")],
    "moe-dense": [("val_loss", "val loss"), ("accuracy", "held-out acc. after SFT"), ("steps", "steps"),
                  ("wall_seconds", "pretrain seconds")],
}


def table(study: str, rows: dict[str, list[dict]]) -> str:
    cols = COLUMNS[study]
    lines = [f"| {study} | " + " | ".join(name for _, name in cols) + " |", "|---|" + "---|" * len(cols)]
    for variant, recs in rows.items():
        cells = [mean_sd([r.get(key) for r in recs]) for key, _ in cols]
        lines.append(f"| {variant} (n={len(recs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bal = results["studies"].get("balancing")
    if bal:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for variant, recs in bal.items():
            curves = [r["max_vio_curve"] for r in recs if "max_vio_curve" in r]
            if not curves:
                continue
            steps = [st for st, _ in curves[0]]
            mean = [statistics.fmean(statistics.fmean(c[i][1]) for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, label=variant)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio (batch, mean of MoE layers)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "maxvio.png", dpi=120)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(bal), figsize=(4 * len(bal), 3), squeeze=False)
        for ax, (variant, recs) in zip(axes[0], bal.items()):
            loads = recs[0]["load_by_kind"]
            kinds = list(loads)
            layer = len(loads[kinds[0]]) - 1  # the last MoE layer of the main model (V3 Figure 9 shows each)
            rel = torch.tensor([loads[k][layer] for k in kinds])
            rel = rel / rel.sum(dim=1, keepdim=True) * rel.shape[1]  # 1 = the uniform share
            im = ax.imshow(rel, cmap="viridis", vmin=0, vmax=max(2.0, float(rel.max())))
            ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
            ax.set_xlabel("expert (last MoE layer, first seed)")
            ax.set_title(variant, fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), label="load / uniform share")
        fig.savefig(out / "specialisation.png", dpi=120)
        plt.close(fig)


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.smoke, args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok_dir, shard_dir = prepare(out, s)
    studies = list(STUDIES) if args.study == "all" else [args.study]
    texts = kind_problems(s) if "balancing" in studies else None
    results = {**header(torch.device("cpu")), "settings": s, "seeds": args.seeds, "studies": {}}
    if "moe-dense" in studies:  # dense-time needs the dense runs' step time first
        studies = [st for st in studies if st != "moe-dense"] + ["moe-dense"]
    for study in studies:
        results["studies"][study] = run_study(out, study, s, args.seeds, tok_dir, shard_dir, texts)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = "\n\n".join(table(study, rows) for study, rows in results["studies"].items())
    (out / "tables.md").write_text(text + "\n")
    plots(out, results)
    print(text)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the runs and results (reused runs are skipped)")
    p.add_argument("--study", default="all", choices=["all", *STUDIES])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run (default 120; smoke 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="the tiny preset and a few steps (seconds per run)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
