"""``nanoseek grpo``: its arguments and handler. Importing this module stays light (no torch), so
building the CLI parser is fast; the handler imports :mod:`nanoseek.rl.grpo` when it runs."""

from __future__ import annotations

import argparse

# Mirrors of nanoseek.rl.objective.LOSS_MODES, nanoseek.rl.guard.RL_POLICIES / POLICY_FIELDS (those
# modules import torch; tests/test_grpo.py checks that the copies agree).
LOSS_MODES = ("sequence_mean", "token_mean", "constant")
RL_POLICIES = ("warn", "rollback")
GUARD_KINDS = ("hacking", "length", "kl", "entropy", "repetition")  # RLGuardConfig.on_<kind>
# Mirror of nanoseek.rl.guard.DEFAULT_POLICIES (the reasons are in that module's docstring).
GUARD_DEFAULTS = {"hacking": "rollback", "length": "warn", "kl": "rollback", "entropy": "warn",
                  "repetition": "rollback"}
GUARD_HELP = {  # (what fires, why the default)
    "hacking": ("format rate up while accuracy falls", "the reward is being gamed"),
    "length": ("mean length jumps or most completions hit --max-tokens",
               "longer reasoning is what a healthy R1-style run learns"),
    "kl": ("KL to the reference above kl_max or far above its recent values (only with --beta > 0)",
           "on a jump; a KL that crept up only warns"),
    "entropy": ("policy entropy below the floor or halving",
                "entropy falls as a policy commits, and a rollback replays the same trend"),
    "repetition": ("most completions loop on a token or n-gram", "once earlier steps did not loop"),
}

ARG_FIELDS = ("init_from", "task", "steps", "prompts_per_step", "group_size", "max_tokens", "temperature", "reward",
              "max_slots", "max_seq_len", "variant", "beta", "eps_low", "eps_high", "loss_mode", "loss_max_len", "mu",
              "dynamic_sampling", "scale_adv_by_std", "overlong_max_len", "overlong_cache_len", "lr", "warmup_steps",
              "weight_decay", "grad_clip", "train_layers", "minibatches", "micro_batch_size", "bias_update_speed",
              "seed", "checkpoint_every", "keep_last", "eval_every", "eval_n", "samples_every", "device",
              "price_per_device_hour", "report")


def add_grpo_arguments(p: argparse.ArgumentParser) -> None:
    """The ``nanoseek grpo`` options; unset ones keep the GRPORunConfig defaults (the run's own on --resume)."""
    p.add_argument("--init-from", help="checkpoint directory of the policy (model + tokenizer), e.g. an SFT run's final/")
    p.add_argument("--task", help="task NAME or NAME:DIFFICULTY (arithmetic, countdown, linear, ...)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, samples, final/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g = p.add_argument_group("rollout")
    g.add_argument("--steps", type=int, help="GRPO steps (default 100)")
    g.add_argument("--prompts-per-step", type=int, help="P problems per step (default 16)")
    g.add_argument("--group-size", type=int, help="G samples per problem (default 8)")
    g.add_argument("--max-tokens", type=int, help="generation budget per sample (default 256)")
    g.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    g.add_argument("--reward", help="registered reward name (default combined: accuracy + 0.1 format)")
    g.add_argument("--max-slots", type=int, help="requests the engine decodes together (default 64)")
    g.add_argument("--max-seq-len", type=int, help="engine cache length, prompt + completion")
    g = p.add_argument_group("objective")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--dapo", dest="variant", action="store_const", const="dapo",
                   help="DAPO defaults: eps 0.2/0.28, dynamic sampling, token-mean loss, beta 0")
    v.add_argument("--dr-grpo", dest="variant", action="store_const", const="dr_grpo",
                   help="Dr. GRPO defaults: no std scaling, constant normaliser (= max tokens), beta 0")
    g.add_argument("--beta", type=float, help="KL weight (default 0.04; 0 keeps no reference model)")
    g.add_argument("--eps-low", type=float, help="lower clip (default 0.2)")
    g.add_argument("--eps-high", type=float, help="upper clip (default 0.2; DAPO 0.28)")
    g.add_argument("--loss-mode", choices=LOSS_MODES,
                   help="sequence_mean (GRPO), token_mean (DAPO) or constant (Dr. GRPO)")
    g.add_argument("--loss-max-len", type=int, help="normaliser of loss mode 'constant' (default max tokens)")
    g.add_argument("--mu", type=int, help="policy updates per batch of samples (default 1)")
    g.add_argument("--dynamic-sampling", action="store_true", default=None,
                   help="drop groups whose rewards are all equal (DAPO)")
    g.add_argument("--no-std-scaling", dest="scale_adv_by_std", action="store_false", default=None,
                   help="advantages r - mean(r), without dividing by the std (Dr. GRPO)")
    g.add_argument("--overlong-max-len", type=int, help="DAPO overlong reward shaping: L_max")
    g.add_argument("--overlong-cache-len", type=int, help="DAPO overlong reward shaping: L_cache")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0), then constant")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--grad-clip", type=float, help="gradient norm clip (default 1.0; <= 0 off)")
    g.add_argument("--train-layers", type=int, metavar="N",
                   help="update only the last N decoder layers + final norm + output head (default 0: all)")
    g.add_argument("--minibatches", type=int, help="optimizer steps per pass over a step's samples (default 1)")
    g.add_argument("--micro-batch-size", type=int, help="sequences per forward (memory only; default all)")
    g.add_argument("--bias-update-speed", type=float,
                   help="MoE router bias update speed during RL (default 0: the biases stay fixed)")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--seed", type=int, help="run seed: problems and sampling (default 0)")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    g.add_argument("--keep-last", type=int, help="checkpoints to keep (default 3)")
    g.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (default 0: off)")
    g.add_argument("--eval-n", type=int, help="held-out problems per evaluation (default 64)")
    g.add_argument("--samples-every", type=int, help="steps between sample logs in samples.jsonl (default 10)")
    g.add_argument("--device", help="auto, cuda, xpu, npu, mps or cpu")
    g.add_argument("--price-per-hour", dest="price_per_device_hour", type=float,
                   help="$ per device-hour for cost.json (default 2.0)")
    g.add_argument("--no-report", dest="report", action="store_false", default=None, help="do not write report.md")
    g = p.add_argument_group("RL guard", "what each detector does when it fires: warn (log and go on) or "
                                         "rollback (reload the last checkpoint, move on to new prompts)")
    g.add_argument("--guard-policy", choices=RL_POLICIES,
                   help="one response for every detector; the --on-KIND flags override it per detector")
    for kind in GUARD_KINDS:
        what, why = GUARD_HELP[kind]
        g.add_argument(f"--on-{kind}", choices=RL_POLICIES, help=f"{what} (default {GUARD_DEFAULTS[kind]}: {why})")


def grpo_main(args: argparse.Namespace) -> int:
    """``nanoseek grpo``."""
    from ..errors import NanoseekError
    from .grpo import grpo

    fields = {name: getattr(args, name, None) for name in ARG_FIELDS}
    fields = {k: v for k, v in fields.items() if v is not None}
    guard = {}
    if getattr(args, "guard_policy", None) is not None:
        guard = {f"on_{kind}": args.guard_policy for kind in GUARD_KINDS}
    for kind in GUARD_KINDS:
        value = getattr(args, f"on_{kind}", None)
        if value is not None:
            guard[f"on_{kind}"] = value
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
