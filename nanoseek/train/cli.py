"""The flags of ``nanoseek pretrain``, ``extend``, ``sft`` and ``distill`` and their handlers.

Every training setting's flag is derived from its declaration (:class:`~nanoseek.train.config.TrainConfig`,
:class:`~nanoseek.train.config.SFTConfig`, :class:`~nanoseek.train.config.GuardConfig`) by
:func:`nanoseek.settings.add_arguments`: the help, the type and the default shown are the field's.
Importing this module stays light (no torch); the handlers import the training code when they run.
"""

from __future__ import annotations

import argparse

from ..errors import NanoseekError
from ..settings import add_arguments, given
from .config import DistillConfig, ExtendConfig, GuardConfig, SFTConfig, TrainConfig

MODEL_FIELDS = ("preset", "config", "init_from")
DATA_FLAGS = ("data", "tokenizer", "vocab_size", "text_field")


def _add_run_arguments(p: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...]) -> None:
    """``--out``, ``--resume``, every setting of ``cls`` but ``exclude``, and the guard's policies."""
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, report, final/)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint (unset flags: the run's own)")
    add_arguments(p.add_argument_group("training"), cls, exclude=exclude + ("guard",))
    add_arguments(p.add_argument_group("training guard"), GuardConfig)


def overrides_from(args: argparse.Namespace, cls: type) -> dict:
    """The settings given on the command line: ``cls`` fields, and the guard's under ``"guard"``."""
    out = given(args, cls)
    guard = given(args, GuardConfig)
    if guard:
        out["guard"] = guard
    return out


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek pretrain``."""
    add_arguments(p.add_mutually_exclusive_group(), TrainConfig, only=MODEL_FIELDS)
    add_arguments(p, TrainConfig, only=DATA_FLAGS)
    _add_run_arguments(p, TrainConfig, exclude=MODEL_FIELDS + DATA_FLAGS)


def pretrain_main(args: argparse.Namespace) -> int:
    """``nanoseek pretrain``."""
    from .pretrain import pretrain

    pretrain(args.out, overrides_from(args, TrainConfig), resume=args.resume)
    return 0


def add_extend_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek extend``."""
    p.add_argument("--init-from", help="the pretrained (or once-extended) checkpoint; required unless --resume")
    add_arguments(p, ExtendConfig, only=("data", "tokenizer", "text_field"))
    _add_run_arguments(p, ExtendConfig, exclude=MODEL_FIELDS + DATA_FLAGS)


def extend_main(args: argparse.Namespace) -> int:
    """``nanoseek extend``."""
    from .extend import extend

    overrides = overrides_from(args, ExtendConfig)
    if args.init_from is not None:
        overrides["init_from"] = args.init_from
    result = extend(args.out, overrides, resume=args.resume)
    print(f"final model: {result.get('final')}")
    return 0


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek sft``."""
    p.add_argument("--init-from", help="the checkpoint to fine-tune (its tokenizer is used); required unless --resume")
    p.add_argument("--data", nargs="+", metavar="FILE.jsonl",
                   help='chat JSONL files or directories of them: one {"messages": [{"role", "content"}, ...]} '
                        "per line; only assistant turns are trained")
    _add_run_arguments(p, SFTConfig, exclude=MODEL_FIELDS + DATA_FLAGS)


def sft_main(args: argparse.Namespace) -> int:
    """``nanoseek sft``."""
    from .sft import sft

    if not args.resume and args.init_from is None:
        raise NanoseekError("sft needs --init-from CKPT (the model to fine-tune)")
    overrides = overrides_from(args, SFTConfig)
    overrides.update(init_from=args.init_from, data=args.data)
    result = sft(args.out, overrides, resume=args.resume)
    print(f"final model: {result.get('final')}")
    return 0


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``nanoseek distill``: the teacher's sampling, the student, and the SFT's settings."""
    _add_run_arguments(p, DistillConfig, exclude=())


def distill_main(args: argparse.Namespace) -> int:
    """``nanoseek distill``."""
    from .distill import distill

    result = distill(args.out, overrides_from(args, DistillConfig), resume=args.resume)
    print(f"final model: {result.get('final')}")
    return 0
