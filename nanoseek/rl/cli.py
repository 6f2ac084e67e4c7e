"""``nanoseek grpo``: its flags, derived from :class:`~nanoseek.rl.config.GRPORunConfig` and
:class:`~nanoseek.rl.config.RLGuardConfig` (help, type and default are the fields'), and its handler.
Importing this module stays light (no torch); the handler imports :mod:`nanoseek.rl.grpo` when it runs."""

from __future__ import annotations

import argparse

from ..errors import NanoseekError
from ..settings import add_arguments, given
from .config import GRPOConfig, POLICY_FIELDS, RL_POLICIES, GRPORunConfig, RLGuardConfig

RUN_FIELDS = ("init_from", "task")
OBJECTIVE = tuple(GRPOConfig.__dataclass_fields__)


def add_grpo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``nanoseek grpo`` flags; unset ones keep the GRPORunConfig defaults (the run's own on --resume)."""
    add_arguments(p, GRPORunConfig, only=RUN_FIELDS)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, samples, final/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g = p.add_argument_group("objective")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--dapo", dest="variant", action="store_const", const="dapo", default=argparse.SUPPRESS,
                   help="DAPO defaults: eps 0.2/0.28, dynamic sampling, token-mean loss, beta 0")
    v.add_argument("--dr-grpo", dest="variant", action="store_const", const="dr_grpo", default=argparse.SUPPRESS,
                   help="Dr. GRPO defaults: no std scaling, constant normaliser (= max tokens), beta 0")
    add_arguments(g, GRPORunConfig, only=OBJECTIVE)
    add_arguments(p.add_argument_group("rollout, optimizer and bookkeeping"), GRPORunConfig,
                  exclude=RUN_FIELDS + OBJECTIVE)
    g = p.add_argument_group("RL guard", "what each detector does when it fires: warn (log and go on) or "
                                         "rollback (reload the last checkpoint, move on to new prompts)")
    g.add_argument("--guard-policy", choices=RL_POLICIES,
                   help="one response for every detector; the --on-KIND flags override it per detector")
    add_arguments(g, RLGuardConfig)


def grpo_main(args: argparse.Namespace) -> int:
    """``nanoseek grpo``."""
    from .grpo import grpo

    fields = given(args, GRPORunConfig)
    guard = {name: args.guard_policy for name in POLICY_FIELDS} if args.guard_policy is not None else {}
    guard.update(given(args, RLGuardConfig))
    if guard:
        fields["guard"] = guard
    if not args.resume:
        if not fields.get("init_from"):
            raise NanoseekError("--init-from is required (the checkpoint directory of the policy to train)")
        if not fields.get("task"):
            raise NanoseekError("--task is required (NAME or NAME:DIFFICULTY)")
    summary = grpo(args.out, resume=args.resume, **fields)
    print(f"final policy: {summary['final']}")
    return 0
