"""``nanoseek sft`` and ``nanoseek distill``: arguments (importing this module stays light: no torch) and
handlers (which import the training code when they run)."""

from __future__ import annotations

import argparse

GUARD_FLAGS = {"on_nan": "on_nonfinite", "on_spike": "on_spike", "on_grad_explosion": "on_grad_explosion",
               "on_collapse": "on_collapse"}
# TrainConfig fields the SFT-style commands take from same-named arguments.
SFT_FIELDS = ("max_steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup_steps", "val_fraction",
              "checkpoint_every", "keep_last", "eval_every", "eval_batches", "log_every", "seed", "device",
              "compile", "activation_checkpointing", "deterministic", "tensorboard", "peak_tflops")


def _add_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, report, final/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g = p.add_argument_group("training (unset: the SFT defaults, lr 1e-4, warmup 20, 500 steps; or the run's own "
                             "with --resume)")
    g.add_argument("--max-steps", type=int)
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, help="packed sequence length (longer examples are truncated)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default lr/10)")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--val-fraction", type=float, help="examples held out by hash for the val loss (default 0.02)")
    g.add_argument("--seed", type=int, help="data order (and problem / sampling seeds); below 1e9")
    g.add_argument("--device", help="auto, cuda, xpu, npu, mps or cpu")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute block activations in backward to save memory")
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels on accelerators (slower; CPU runs are deterministic anyway)")
    add_bookkeeping_and_guard_arguments(p)


def _nan_policy(value: str) -> str:
    """``--on-nan``: a policy that keeps the NaN update out of the weights."""
    if value == "warn":
        raise argparse.ArgumentTypeError("'warn' is refused: a NaN/inf loss or gradient would be applied to the "
                                         "weights; choose skip, lr_down or rollback")
    if value not in ("skip", "rollback", "lr_down"):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from skip, rollback, lr_down)")
    return value


def add_bookkeeping_and_guard_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint/logging/cost options and the training-guard policies every Trainer stage takes."""
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    g.add_argument("--keep-last", type=int, help="checkpoints to keep (default 3)")
    g.add_argument("--eval-every", type=int, help="steps between validation losses")
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    g.add_argument("--log-every", type=int, help="steps between metrics records")
    g.add_argument("--tensorboard", action="store_true", default=None, help="also log to RUN_DIR/tensorboard")
    g.add_argument("--price-per-hour", type=float, help="$ per device-hour for cost.json (default 2.0)")
    g.add_argument("--peak-tflops", type=float,
                   help="bf16 peak TFLOP/s per device for MFU (default: 790 on H100/H200, else no MFU)")
    g = p.add_argument_group("training guard")
    policies = ("warn", "skip", "rollback", "lr_down")
    g.add_argument("--on-nan", type=_nan_policy, metavar="{skip,rollback,lr_down}",
                   help="response to a NaN/inf loss or grad norm (default rollback). 'warn' is refused: it would "
                        "apply the NaN update, and NaN weights are never checkpointed")
    g.add_argument("--on-spike", choices=policies, help="response to a loss spike (default skip)")
    g.add_argument("--on-grad-explosion", choices=policies, help="response to a grad-norm explosion (default skip)")
    g.add_argument("--on-collapse", choices=policies, help="response to dead experts / imbalance (default warn)")


def training_overrides(args: argparse.Namespace, fields: tuple[str, ...]) -> dict:
    """TrainConfig overrides from parsed arguments: ``fields`` by name, the price and the guard policies;
    unset (None) arguments are left out so the defaults, or a resumed run's own values, apply."""
    out = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    if args.price_per_hour is not None:
        out["price_per_device_hour"] = args.price_per_hour
    guard = {field: getattr(args, flag) for flag, field in GUARD_FLAGS.items() if getattr(args, flag) is not None}
    if guard:
        out["guard"] = guard
    return out


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-from", help="the checkpoint to fine-tune (its tokenizer is used); required unless --resume")
    p.add_argument("--data", nargs="+", metavar="FILE.jsonl",
                   help='chat JSONL files or directories of them: one {"messages": [{"role", "content"}, ...]} '
                        "per line; only assistant turns are trained")
    p.add_argument("--cold-start", nargs="+", metavar="TASK[:DIFFICULTY]",
                   help="also (or instead) train on generated cold-start examples: the tasks' solver-written "
                        "worked solutions in the chat format (R1 cold start)")
    p.add_argument("--cold-start-n", type=int, help="cold-start examples in total (default 2000)")
    p.add_argument("--cold-start-seed", type=int, help="problem seed of the cold-start set (default: --seed)")
    p.add_argument("--cold-start-answer-only", type=float, metavar="FRACTION",
                   help="share of cold-start examples that state the answer without the working (default 0)")
    _add_training_arguments(p)


def sft_main(args: argparse.Namespace) -> int:
    from ..errors import NanoseekError
    from .sft import sft

    if not args.resume and args.init_from is None:
        raise NanoseekError("sft needs --init-from CKPT (the model to fine-tune)")
    overrides = training_overrides(args, SFT_FIELDS)
    overrides.update(init_from=args.init_from, data=args.data, cold_start=args.cold_start,
                     cold_start_n=args.cold_start_n, cold_start_seed=args.cold_start_seed,
                     cold_start_answer_only=args.cold_start_answer_only)
    result = sft(args.out, overrides, resume=args.resume)
    print(f"final model: {result.get('final')}")
    return 0


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="teacher checkpoint directory (model + tokenizer); required unless --resume")
    p.add_argument("--task", help="TASK[:DIFFICULTY] whose training problems the teacher solves")
    p.add_argument("--prompts", type=int, default=256, help="problems to sample (default 256)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="teacher samples per problem (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per teacher sample at most (default 256)")
    p.add_argument("--max-length-chars", type=int, default=None,
                   help="reject samples longer than this many characters (default: no limit)")
    p.add_argument("--max-slots", type=int, default=32, help="teacher requests decoded together (default 32)")
    student = p.add_mutually_exclusive_group()
    student.add_argument("--student-preset", help="a fresh student of this preset with the teacher's tokenizer")
    student.add_argument("--student-init", help="a student checkpoint to start from (its own tokenizer)")
    _add_training_arguments(p)


def distill_main(args: argparse.Namespace) -> int:
    from ..errors import NanoseekError
    from .distill import distill

    if not args.resume and (args.teacher is None or args.task is None):
        raise NanoseekError("distill needs --teacher CKPT and --task TASK[:DIFFICULTY]")
    if not args.resume and args.student_preset is None and args.student_init is None:
        raise NanoseekError("distill needs a student: --student-preset NAME or --student-init CKPT")
    result = distill(args.out, args.teacher, args.task, prompts=args.prompts,
                     samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
                     max_tokens=args.max_tokens, max_length_chars=args.max_length_chars,
                     student_preset=args.student_preset, student_init=args.student_init, max_slots=args.max_slots,
                     overrides=training_overrides(args, SFT_FIELDS), resume=args.resume)
    print(f"final model: {result.get('final')}")
    return 0
