"""Context extension at laptop scale: passkey retrieval at ½×, 1×, 2× and 4× the pretraining length,
before and after ``nanoseek extend`` (YaRN, V3 report §4.3).

    python benchmarks/context_extension.py --out runs/ctx            # the cpu model, ~20 min on 2 cores
    python benchmarks/context_extension.py --out /tmp/ctx --smoke    # every step in seconds (CI)

What it runs (one seed):
1. a tokenizer on the pretraining text, then the cpu speedrun's model shape pretrained at
   ``--context`` tokens on the speedrun's arithmetic corpus mixed with passkey documents that fit that
   window (8,000 of 38,000 documents), so retrieval is a skill the model can have at 1× (whether a
   run's model learns it varies: docs/2026-11-28-ablations-and-context-extension.md);
2. passkey retrieval (exact match, greedy, the base model's document format) with prompt + answer
   within ½×, 1×, 2× and 4× ``--context`` tokens — for the pretrained model, for the same weights with
   only the YaRN config written (no training), and, after step 3, for the extended model;
3. ``extend`` ×``--factor`` at ``factor × context`` tokens per sequence for ``--extend-steps`` steps on
   the same mix with passkey documents up to the new length; with ``--control``, the same training
   without YaRN (plain RoPE positions past the original context) as a control;
4. for every model, the mean next-token loss on held-out text of 4× ``--context`` tokens per position
   band (the long-context perplexity test, which needs no retrieval skill).
Writes ``results.json``, ``table.md`` and ``passkey.png`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import header  # noqa: E402
from nanoseek.config import ModelConfig, get_preset  # noqa: E402
from nanoseek.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from nanoseek.hf import load_with_tokenizer  # noqa: E402
from nanoseek.infer.engine import Engine  # noqa: E402
from nanoseek.speedrun import PRESETS, base_prompt, corpus_text  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tasks.evaluate import EVAL_SEED_BASE, evaluate, eval_problems  # noqa: E402
from nanoseek.tasks.passkey import PasskeyTask, difficulty_for_tokens  # noqa: E402
from nanoseek.train.extend import extend, yarn_extended  # noqa: E402
from nanoseek.train.pretrain import pretrain  # noqa: E402

ANSWER_TOKENS = 40  # the completion "<think>The line that names the pass key says N.</think> <answer>N</answer>"


def write_mix(path: Path, arithmetic: list, passkey: list) -> None:
    """Arithmetic and passkey documents, shuffled together (fixed order), as ``{"text"}`` JSONL."""
    docs = [corpus_text(p) for p in arithmetic + passkey]
    random.Random(0).shuffle(docs)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def passkey_docs(count_tokens, max_tokens: int, n: int, seed: int) -> list:
    """``n`` passkey problems whose whole document stays within ``max_tokens``, levels spread evenly."""
    top = difficulty_for_tokens(max_tokens - ANSWER_TOKENS, count_tokens, base_prompt)
    task = PasskeyTask()
    return [task.generate(seed * 1000 + i, 1, 1 + i % top)[0] for i in range(n)]


def retrieval(ckpt: Path, lengths: list[int], n: int, seed: int, log) -> list[dict]:
    """Passkey accuracy with prompts of at most each length (tokens), greedy, base-model format."""
    model, tokenizer = load_with_tokenizer(str(ckpt), "cpu")
    engine = Engine(model, tokenizer, max_slots=16, max_seq_len=max(lengths) + ANSWER_TOKENS + 64)
    rows = []
    for length in lengths:
        count = lambda text: len(tokenizer.encode(text))  # noqa: E731
        level = difficulty_for_tokens(length - ANSWER_TOKENS, count, base_prompt)  # prompt + answer fit
        res = evaluate(engine, tokenizer, PasskeyTask(), n_problems=n, difficulty=level, max_tokens=ANSWER_TOKENS,
                       seed=seed, prompt_fn=base_prompt)
        tokens = [count(base_prompt(p)) for p in eval_problems(PasskeyTask(), n, level, seed)]
        rows.append({"length": length, "level": level, "mean_prompt_tokens": sum(tokens) / len(tokens),
                     "max_prompt_tokens": max(tokens), "accuracy": res.accuracy})
        log(f"  {ckpt.parent.name if ckpt.name == 'final' else ckpt.name}: ≤{length} tokens "
            f"(mean {rows[-1]['mean_prompt_tokens']:.0f}): passkey accuracy {res.accuracy:.1%}")
    return rows


def held_out_stream(tokenizer, n_tokens: int, seed: int) -> torch.Tensor:
    """``n_tokens`` of held-out text (eval-seed arithmetic and passkey documents, the training format)."""
    arithmetic = get_task("arithmetic").generate(EVAL_SEED_BASE + seed, 2000, 2)
    passkey = PasskeyTask().generate(EVAL_SEED_BASE + seed, 400, 8)
    docs = [corpus_text(p) for p in arithmetic + passkey]
    random.Random(seed).shuffle(docs)
    ids = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_eos=True)  # as the shards separate documents
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


@torch.no_grad()
def loss_by_position(ckpt: Path, lengths: list[int], sequences: int, seed: int) -> list[float]:
    """Mean next-token loss of sequences of ``lengths[-1]`` held-out tokens, per position band
    ``[0, lengths[0])``, ``[lengths[0], lengths[1])``, ...: the long-context perplexity test (YaRN
    paper §4.3.1) that needs no retrieval skill, only whether positions past the old context work."""
    model, tokenizer = load_with_tokenizer(str(ckpt), "cpu")
    span = lengths[-1]
    x = held_out_stream(tokenizer, sequences * (span + 1), seed).view(sequences, span + 1)
    logits = model(x[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(dim=0)
    bands = [0, *lengths]
    return [loss[a:b].mean().item() for a, b in zip(bands, bands[1:])]


def arithmetic_accuracy(ckpt: Path, n: int, seed: int) -> float:
    """Short-context skill kept? Held-out 2-digit arithmetic, greedy, base-model format."""
    model, tokenizer = load_with_tokenizer(str(ckpt), "cpu")
    engine = Engine(model, tokenizer, max_slots=32, max_seq_len=512)
    return evaluate(engine, tokenizer, "arithmetic", n_problems=n, difficulty=2, max_tokens=160, seed=seed,
                    prompt_fn=base_prompt).accuracy


def yarn_only(ckpt: Path, out: Path, factor: int) -> Path:
    """``ckpt`` with the YaRN config written and no training (what extension changes before it trains)."""
    shutil.copytree(ckpt, out, dirs_exist_ok=True)
    yarn_extended(ModelConfig.from_json(ckpt), factor).save(out / "config.json")
    return out


def settings(smoke: bool) -> dict:
    if smoke:
        model = dict(PRESETS["tiny"].model, max_position_embeddings=64)
        return dict(model=model, vocab=320, context=64, arithmetic=300, passkey=100, pretrain_steps=4,
                    batch=4, extend_steps=2, extend_batch=1, eval_n=4, arith_n=4, loss_sequences=2)
    model = dict(PRESETS["cpu"].model, max_position_embeddings=256, num_nextn_predict_layers=1)  # as recorded
    return dict(model=model, vocab=512, context=256, arithmetic=30000, passkey=8000, pretrain_steps=400,
                batch=16, extend_steps=100, extend_batch=4, eval_n=100, arith_n=200, loss_sequences=16)


def run(args) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = settings(args.smoke)
    for key in ("pretrain_steps", "extend_steps", "eval_n"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    context, factor, seed = s["context"], args.factor, args.seed
    lengths = [context, 2 * context, factor * context]
    passkey_lengths = [context // 2, *lengths]  # ½×: where a small model's retrieval is easiest to see
    log = print
    t0 = time.perf_counter()

    # 1. tokenizer on arithmetic + passkey text (the long documents hold the filler vocabulary)
    arithmetic = get_task("arithmetic").generate(seed, s["arithmetic"], 2)
    sample = out / "tokenizer_text.jsonl"
    write_mix(sample, arithmetic[:2000], PasskeyTask().generate(seed, 200, 4))
    tok_dir = out / "tokenizer"
    train_tokenizer([str(sample)], s["vocab"], tok_dir, text_field="text")
    tokenizer = load_tokenizer(tok_dir)
    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    short_mix, long_mix = out / "pretrain_mix.jsonl", out / "extend_mix.jsonl"
    write_mix(short_mix, arithmetic, passkey_docs(count, context, s["passkey"], seed))
    write_mix(long_mix, arithmetic, passkey_docs(count, factor * context, s["passkey"], seed + 1))

    # 2. pretrain at the short context
    config = out / "model_config.json"
    get_preset("small").replace(vocab_size=s["vocab"], **s["model"]).save(config)
    common = dict(seed=seed, device="cpu", log_every=10, eval_batches=4)
    pretrain(out / "pretrain", dict(config=str(config), data=[str(short_mix)], tokenizer=str(tok_dir),
                                    max_steps=s["pretrain_steps"], batch_size=s["batch"], seq_len=context, lr=3e-3,
                                    warmup_steps=max(1, s["pretrain_steps"] // 20),
                                    checkpoint_every=s["pretrain_steps"], eval_every=s["pretrain_steps"], **common),
             log=log)
    base = out / "pretrain" / "final"
    models = {"pretrained": base, "YaRN config only": yarn_only(base, out / "yarn_only", factor)}

    # 3. extend (and the control without YaRN)
    ext = dict(init_from=str(base), data=[str(long_mix)], max_steps=s["extend_steps"], batch_size=s["extend_batch"],
               seq_len=factor * context, checkpoint_every=s["extend_steps"], eval_every=s["extend_steps"], **common)
    extend(out / "extend", dict(ext, factor=factor), log=log)
    models[f"extended ×{factor} (YaRN)"] = out / "extend" / "final"
    if args.control:
        pretrain(out / "control", dict(ext, lr=3e-4, warmup_steps=10), log=log)
        models[f"trained at {factor * context} without YaRN"] = out / "control" / "final"

    rows = {}
    for name, ckpt in models.items():
        log(f"evaluating {name}")
        rows[name] = {"passkey": retrieval(ckpt, passkey_lengths, s["eval_n"], seed, log),
                      "arithmetic": arithmetic_accuracy(ckpt, s["arith_n"], seed),
                      "loss_by_position": loss_by_position(ckpt, lengths, s["loss_sequences"], seed)}
    costs = {stage: json.loads((out / stage / "cost.json").read_text())["stages"]
             for stage in ("pretrain", "extend", "control") if (out / stage / "cost.json").is_file()}
    result = {**header(torch.device("cpu")), "settings": s, "factor": factor, "lengths": lengths, "rows": rows,
              "cost": costs, "wall_seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "table.md").write_text(table + "\n")
    plot(result, out / "passkey.png")
    print(table)
    return result


def markdown(result: dict) -> str:
    lengths = result["lengths"]
    some_row = next(iter(result["rows"].values()))["passkey"]
    head = " | ".join(f"≤ {r['length']} tok ({r['length'] / lengths[0]:g}×; mean {r['mean_prompt_tokens']:.0f})"
                      for r in some_row)
    bands = [0, *lengths]
    loss_head = " | ".join(f"loss @ [{a}, {b})" for a, b in zip(bands, bands[1:]))
    lines = [f"| model | passkey {head} | 2-digit arithmetic | {loss_head} |",
             "|---|" + "---|" * (len(some_row) + len(lengths) + 1)]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{r['accuracy']:.1%}" for r in row["passkey"])
        losses = " | ".join(f"{v:.3f}" for v in row["loss_by_position"])
        lines.append(f"| {name} | {cells} | {row['arithmetic']:.1%} | {losses} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, row in result["rows"].items():
        ax.plot([r["length"] for r in row["passkey"]], [100 * r["accuracy"] for r in row["passkey"]], "o-",
                label=name)
    ax.axvline(result["lengths"][0], color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens, at most)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7)
    ax.set_title("passkey retrieval before / after YaRN extension")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the runs and results")
    p.add_argument("--factor", type=int, default=4, help="YaRN factor (default 4: 256 → 1024 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--extend-steps", type=int, default=None)
    p.add_argument("--eval-n", type=int, default=None, help="passkey problems per length")
    p.add_argument("--control", action="store_true", help="also train at the long length without YaRN")
    p.add_argument("--smoke", action="store_true", help="the tiny model and a few steps (seconds)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
