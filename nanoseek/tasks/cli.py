"""``nanoseek eval``: its arguments and handler. Building the CLI parser imports this module, so it
stays light (no torch); the handler loads the model and engine when the command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek eval``."""
    p.add_argument("--task", required=True, metavar="TASK[:DIFFICULTY]",
                   help="arithmetic, countdown, linear, gsm8k, passkey or a registered task, optionally with its difficulty")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (model + tokenizer)")
    p.add_argument("--n", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--difficulty", type=int, default=None,
                   help="problem difficulty (default: the one in --task, else 1)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (default 1: greedy)")
    p.add_argument("--k", type=int, default=1, help="k of pass@k and maj@k (<= --samples)")
    p.add_argument("--temperature", type=float, default=None, help="default 0 for one sample, else 1.0")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="held-out seed (problems and sampling)")
    p.add_argument("--max-slots", type=int, default=32, help="requests decoded together")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the JSON (with per-problem records) here")


def eval_main(args: argparse.Namespace) -> int:
    """``nanoseek eval``: held-out accuracy, pass@k, maj@k, mean length and format rate as JSON."""
    from ..hf import load_with_tokenizer
    from ..infer.engine import Engine
    from .coldstart import parse_task_spec
    from .evaluate import evaluate

    task, difficulty = parse_task_spec(args.task, "--task")
    if difficulty is not None and args.difficulty is not None and difficulty != args.difficulty:
        raise ConfigError(f"--task {args.task!r} and --difficulty {args.difficulty} disagree; give the difficulty once")
    difficulty = difficulty or args.difficulty or 1
    model, tokenizer = load_with_tokenizer(args.ckpt, args.device)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    engine = Engine(model, tokenizer, max_slots=args.max_slots)
    result = evaluate(engine, tokenizer, task, n_problems=args.n, difficulty=difficulty,
                      samples=args.samples, k=args.k, temperature=temperature,
                      max_tokens=args.max_tokens, seed=args.seed)
    print(json.dumps(result.to_dict(), indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(with_problems=True), indent=2) + "\n")
    return 0
