"""``nanoseek <command>``: the command-line interface.

Heavy imports (torch, the model) happen inside the handlers so that ``nanoseek --help`` is quick.
Errors caused by user input (:class:`~nanoseek.errors.NanoseekError`) print one ``error: ...`` line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import PRECISIONS
from .errors import NanoseekError

# --------------------------------------------------------------------------- handlers
def _config_from_args(args: argparse.Namespace):
    from .config import ModelConfig, get_preset

    if args.config is not None:
        return ModelConfig.from_json(args.config), str(args.config)
    return get_preset(args.preset), f"preset {args.preset}"


def cmd_info(args: argparse.Namespace) -> int:
    from .info import describe, format_info

    config, source = _config_from_args(args)
    d = describe(config, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_info(d, title=f"nanoseek info: {source}"))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    import nanoseek

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    print(f"loading {args.src} as {args.dtype}")
    model = nanoseek.load(args.src, dtype=dtype)
    print(f"saving to {args.dst} (shards up to {args.max_shard_size})")
    nanoseek.save(model, args.dst, max_shard_size=args.max_shard_size)
    print("done")
    return 0


def cmd_tokenizer(argv: list[str]) -> int:
    """Everything after ``tokenizer`` goes to the tokenizer tool, which has its own parser."""
    from .data.tokenizer import tokenizer_main

    return int(tokenizer_main(argv) or 0)


def cmd_speedrun(args: argparse.Namespace) -> int:
    import time

    from .speedrun import run_speedrun

    out = args.out or Path("runs") / f"speedrun-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_speedrun(out, preset=args.preset, seed=args.seed, device=args.device,
                 price_per_device_hour=args.price_per_hour, answer_only_fraction=args.answer_only,
                 compile=args.compile, extend=args.extend, mtp=args.mtp, optimizer=args.optimizer,
                 precision=args.precision)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def _lazy_handler(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``nanoseek.<module>`` only when its command runs (fast ``--help``)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), func)(args)

    return run


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="The DeepSeek-V3 / R1 recipe: tokenizer, pretrain, SFT, GRPO, distill, eval, serve.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("info", help="parameters, memory, KV cache and FLOPs of a model config")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="tiny, small, bench or v3")
    source.add_argument("--config", help="a config.json, or a checkpoint directory holding one")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for the FLOPs figure (default: min(4096, max positions))")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("convert", help="load a HF DeepSeek-V3 checkpoint and save it in nanoseek's format")
    p.add_argument("--src", required=True, help="source checkpoint directory (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="destination directory")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB, 2GB (default 2GB)")
    p.set_defaults(handler=cmd_convert)

    # Listed for --help only: main() hands `tokenizer ...` to the tokenizer tool before parsing.
    sub.add_parser("tokenizer", help="train or inspect a BPE tokenizer (`nanoseek tokenizer train --help`)")

    p = sub.add_parser("speedrun", help="the whole R1 recipe on synthetic verifiable tasks: pretrain, SFT, GRPO, "
                                        "eval, report card")
    p.add_argument("--preset", default="cpu", help="cpu (default, 5-6 min on 2 AVX512-BF16 cores), gpu-small, or tiny (smoke)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/speedrun-PRESET-TIME)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda, xpu, npu, mps or cpu")
    p.add_argument("--price-per-hour", type=float, default=2.0, help="$ per device-hour for the cost table")
    p.add_argument("--answer-only", type=float, default=None, metavar="FRACTION",
                   help="share of corpus and cold-start problems answered without the working (default: the "
                        "preset's; cpu: 0, every answer worked); 0.6 is R1-Zero's story, in which GRPO finds out "
                        "that working pays and the answers grow")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training steps and the decode steps of GRPO's rollouts and the "
                        "evaluations (off by default: on 2 CPU cores compiling costs more than it saves; see README)")
    p.add_argument("--extend", action="store_true",
                   help="add YaRN context extension after pretraining (V3 report 4.3; cpu: 256 -> 1024 tokens, "
                        "40 steps, 1-3 more minutes with its evaluation; off by default: it adds nothing to the "
                        "preset's task, whose problems fit in 256 tokens)")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=None,
                   help="give the model V3's multi-token-prediction module (--mtp) or not (--no-mtp); default: "
                        "the preset's (cpu: off, since at this scale it costs 46%% more time per step for no "
                        "better loss, see README; with it the final model drafts for speculative decoding)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default=None,
                   help="the pretraining stage's optimizer (default: the preset's; cpu and tiny: muon, Muon on the "
                        "hidden matrices and AdamW on the rest, nanoseek/train/muon.py, 1.1-1.4x AdamW's pretraining "
                        "time on 2 CPU cores for a far stronger base model; gpu-small: adamw, V3's; see README)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the training stages' compute dtype (default auto: bf16 autocast where the chip computes in "
                        "it natively -- recent GPUs, CPUs with AVX512-BF16 or AMX -- else float32)")
    p.set_defaults(handler=cmd_speedrun)

    p = sub.add_parser("report", help="cost and quality report card (report.md + plots) of a run directory")
    p.add_argument("run_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    p.set_defaults(handler=cmd_report)

    from .train.cli import add_distill_arguments, add_extend_arguments, add_pretrain_arguments, add_sft_arguments

    p = sub.add_parser("pretrain", help="pre-train a model from scratch (tokenizer, shards, guarded training loop)",
                       description="Pre-train a DeepSeek-V3-architecture model on text files. Unset options "
                                   "take the TrainConfig defaults (or, with --resume, the run's own values).")
    add_pretrain_arguments(p)
    p.set_defaults(handler=_lazy_handler("train.cli", "pretrain_main"))
    p = sub.add_parser("extend", help="context extension with YaRN (V3 report 4.3): longer sequences from a checkpoint",
                       description="Write V3's YaRN rope_scaling into a checkpoint's config (new context = "
                                   "original x --factor) and train it briefly at --seq-len; repeat from its "
                                   "output for a second phase. Unset options take the ExtendConfig defaults.")
    add_extend_arguments(p)
    p.set_defaults(handler=_lazy_handler("train.cli", "extend_main"))
    from .infer.cli import add_chat_arguments, add_generate_arguments, add_serve_arguments
    from .tasks.cli import add_eval_arguments

    p = sub.add_parser("generate", help="generate text from a checkpoint (streams to stdout)")
    add_generate_arguments(p)
    p.set_defaults(handler=_lazy_handler("infer.cli", "generate_main"))
    p = sub.add_parser("eval", help="held-out accuracy, pass@k, maj@k, length and format rate on a task")
    add_eval_arguments(p)
    p.set_defaults(handler=_lazy_handler("tasks.cli", "eval_main"))
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page")
    add_serve_arguments(p)
    p.set_defaults(handler=_lazy_handler("infer.server", "serve_main"))
    p = sub.add_parser("chat", help="interactive chat with a checkpoint in the terminal")
    add_chat_arguments(p)
    p.set_defaults(handler=_lazy_handler("infer.chat", "chat_main"))
    from .rl.cli import add_grpo_arguments

    p = sub.add_parser("grpo", help="GRPO reasoning RL with rule-based rewards (R1 recipe; DAPO / Dr. GRPO options)",
                       description="GRPO from an SFT (or pretrained) checkpoint on a verifiable task. Unset "
                                   "options take the GRPORunConfig defaults (or, with --resume, the run's own).")
    add_grpo_arguments(p)
    p.set_defaults(handler=_lazy_handler("rl.cli", "grpo_main"))
    p = sub.add_parser("sft", help="supervised fine-tuning / cold start on chat JSONL (assistant tokens only)",
                       description="SFT from a checkpoint on chat JSONL files and/or a generated cold-start set "
                                   "(R1 cold start), on the pretraining loop: same checkpoints, guard, cost, "
                                   "metrics and report; the model ends in OUT/final.")
    add_sft_arguments(p)
    p.set_defaults(handler=_lazy_handler("train.cli", "sft_main"))
    p = sub.add_parser("distill", help="distil a teacher into a student: rejection sampling + SFT (R1)",
                       description="Sample a teacher on a task's training problems, keep only verified, "
                                   "well-formed, distinct completions, then SFT a student on them.")
    add_distill_arguments(p)
    p.set_defaults(handler=_lazy_handler("train.cli", "distill_main"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "tokenizer":
            return cmd_tokenizer(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.handler(args)
    except NanoseekError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nanoseek info ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
