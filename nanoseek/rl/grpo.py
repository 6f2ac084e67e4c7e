"""The GRPO loop (DeepSeekMath arXiv 2402.03300 §4, Alg. 1; DeepSeek-R1 arXiv 2501.12948 eq. 1-3).

One step::

    1. P problems from the task generator, problem seeds < EVAL_SEED_BASE (a pure function of the
       run seed and the step's batch number), each asked in the chat form of ``chat_prompt``;
    2. G samples per prompt from the CURRENT policy through the shared :class:`Engine` (the model
       object being trained, in eval mode), each sample with its own seed (run seed, batch, prompt,
       sample); the engine returns every token's log-prob under the sampling distribution: π_old;
    3. rewards from the configured rule-based reward (default ``combined``: accuracy + 0.1·format),
       plus DAPO's overlong penalty when configured; group advantages (R1 eq. 3). A completion on
       which the reward (or the accuracy / format check) raises gets :data:`REWARD_ON_ERROR` and is
       counted (``reward_errors``) and reported (a ``reward_error`` incident naming the exception
       and the start of the completion): one bad completion does not stop the run. If the reward
       raises on every completion of a step, it is broken itself and the run stops with that error;
    4. dynamic sampling (DAPO): groups whose G rewards are all equal carry no signal and are dropped
       (counted; if none remains, the update is skipped and logged);
    5. μ passes over the kept groups, split into ``minibatches`` optimizer steps each: a full forward
       of prompt + completion recomputes the completion tokens' log-probs at the sampling
       temperature (:func:`completion_logprobs`, the same ``token_logprobs`` the sampler uses), the
       frozen reference gives π_ref (only when β > 0; β = 0 keeps no copy), :func:`grpo_loss`,
       backward (micro-batches accumulate exactly for every loss mode), clip, AdamW.

No train/inference mismatch correction is applied or needed: the engine and the trainer run one
model definition in float32, so the engine's log-probs equal the recomputed ones up to float
rounding (``tests/test_grpo.py`` checks ≤ 1e-5); with μ = 1 the ratio starts at 1.

MoE routing during RL: the routers' ``e_score_correction_bias`` (V3's auxiliary-loss-free balancing)
stays FIXED unless ``bias_update_speed`` > 0. Balancing is a pretraining concern (it keeps experts
busy across trillions of tokens); RL runs few, narrow prompts, and moving the biases on that skewed
load would re-route tokens under the policy's feet and change log-probs outside the gradient.

Run directory (``--out``), the same machinery as pretraining::

    grpo_config.json    the GRPORunConfig of the run
    tokenizer/          a copy of the initial checkpoint's tokenizer
    checkpoints/        step_XXXXXXXX/ (nanoseek.train.checkpoint; step 0 = the initial policy)
    metrics.jsonl       one record per step (stage "grpo")
    samples.jsonl       a few (prompt, completion, reward) every ``samples_every`` steps
    incidents.jsonl     what the RL guard saw (nanoseek.rl.guard)
    cost.json           device-hours and $ (stage "grpo")
    final/              the last checkpoint's model + tokenizer, self-contained
                        (:func:`~nanoseek.train.checkpoint.publish_final`, as pretraining)

A metrics.jsonl record (stage "grpo"): ``reward`` (mean, shaped) / ``reward_std``, ``accuracy`` and
``format_rate`` (the accuracy and format rewards whatever reward trains), ``response_length`` (mean
generated tokens) / ``response_length_max``, ``truncation_rate`` (finish_reason "length"),
``zero_variance_frac``, ``groups_kept`` / ``groups_dropped`` / ``update_skipped`` (dynamic sampling),
``kl`` (k3 to the reference; null when β = 0), ``clip_low`` / ``clip_high`` / ``ratio_mean``,
``entropy`` (mean token entropy of the sampling distribution on every sampled completion),
``repetition_frac``, ``reward_errors`` (completions whose reward raised), ``loss``, ``grad_norm``,
``lr``, ``samples`` / ``tokens`` / ``samples_per_s`` / ``tokens_per_s`` (whole step), ``rollout_s``,
``step_s``, ``action`` (the RL guard's), ``batch``, and
``eval_accuracy`` (+ format rate, length) every ``eval_every`` steps. The cost meter counts samples and
prompt + completion tokens (what the training forward processes).

Exact resume: the problems and sampling seeds are functions of (seed, batch), the weights, AdamW
state, guard and cost states come from the checkpoint, the reference model is reloaded from
``init_from``, and metrics/samples records after the checkpoint are truncated, so ``--resume``
reproduces the metrics of an uninterrupted run (same machine and thread count).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, NanoseekError
from ..train.config import merge_resume_settings
from .guard import RLGuard, RLGuardConfig
from .objective import (GRPOConfig, dynamic_sampling_mask, group_advantages, grpo_loss,
                        overlong_penalty, zero_variance_fraction)

STAGE = "grpo"
STATE_VERSION = 1
CONFIG_FILE = "grpo_config.json"
OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOConfig))
VARIANTS = ("grpo", "dapo", "dr_grpo")
# Settings a resumed run may change: none alters the steps already taken.
RESUME_CHANGEABLE = frozenset({
    "steps", "checkpoint_every", "keep_last", "eval_every", "eval_n", "eval_max_tokens", "samples_every",
    "samples_per_log", "device", "price_per_device_hour", "guard", "report", "max_slots",
})
_U63 = (1 << 63) - 1
#: The reward of a completion on which the reward function raised: the lowest the built-in rewards
#: pay (no answer), so a crash never pays more than a plain failure.
REWARD_ON_ERROR = 0.0
_ERROR_TEXT_CHARS = 200  # how much of a failing completion (and of the error) the incident keeps


# ----------------------------------------------------------------------------- configuration
@dataclass
class GRPORunConfig:
    """Everything that defines a GRPO run; stored as ``RUN_DIR/grpo_config.json``.

    The objective fields are those of :class:`~nanoseek.rl.objective.GRPOConfig` (defaults: plain
    GRPO; ``variant`` "dapo" / "dr_grpo" take that preset's values for the fields not given).
    ``lr`` defaults to 1e-4, a value for nanoseek-scale models (millions of parameters); large models
    want 1e-6..1e-5. ``minibatches`` splits the kept groups of a step into that many optimizer
    steps per pass (μ passes); ``micro_batch_size`` (sequences per forward, 0 = the whole minibatch)
    only bounds memory: gradients accumulate to exactly the minibatch's loss. ``train_layers`` N > 0
    updates only the last N decoder layers, the final norm and the output head
    (:func:`~nanoseek.train.optim.train_top_layers`); 0 updates every parameter.
    """

    init_from: str | None = None
    task: str = "arithmetic"
    difficulty: int = 1
    reward: str = "combined"
    variant: str = "grpo"
    # objective (GRPOConfig)
    group_size: int = 8
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_mode: str = "sequence_mean"
    scale_adv_by_std: bool = True
    dynamic_sampling: bool = False
    overlong_max_len: int | None = None
    overlong_cache_len: int | None = None
    loss_max_len: int | None = None
    mu: int = 1
    temperature: float = 1.0
    # rollout
    steps: int = 100
    prompts_per_step: int = 16
    max_tokens: int = 256
    max_slots: int = 64
    max_seq_len: int | None = None  # engine cache length; default min(model positions, max_tokens + 1024)
    # optimizer
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    grad_clip: float = 1.0
    train_layers: int = 0
    minibatches: int = 1
    micro_batch_size: int = 0
    bias_update_speed: float = 0.0
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 50
    keep_last: int = 3
    eval_every: int = 0  # 0: no held-out evaluation during the run
    eval_n: int = 64
    eval_max_tokens: int | None = None  # default max_tokens
    samples_every: int = 10
    samples_per_log: int = 4
    device: str = "auto"
    price_per_device_hour: float = 2.0
    report: bool = True
    guard: RLGuardConfig = field(default_factory=RLGuardConfig)

    def __post_init__(self) -> None:
        if isinstance(self.guard, dict):
            self.guard = RLGuardConfig.from_dict(self.guard)
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid GRPO config: {msg}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        need(isinstance(self.task, str) and bool(self.task), "task must be a task name")
        need(isinstance(self.reward, str) and bool(self.reward), "reward must be a reward name")
        for name in ("difficulty", "steps", "prompts_per_step", "max_tokens", "max_slots", "minibatches",
                     "checkpoint_every", "keep_last", "eval_n", "samples_every"):
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "micro_batch_size", "eval_every", "samples_per_log", "seed", "train_layers"):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("max_seq_len", "eval_max_tokens"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 1), f"{name} must be a positive integer, got {v!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must lie in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(math.isfinite(self.grad_clip), f"grad_clip must be finite (<= 0 disables), got {self.grad_clip}")
        need(self.bias_update_speed >= 0, f"bias_update_speed must be >= 0, got {self.bias_update_speed}")
        need(self.price_per_device_hour >= 0, f"price_per_device_hour must be >= 0, got {self.price_per_device_hour}")
        need(self.minibatches <= self.prompts_per_step,
             f"minibatches ({self.minibatches}) cannot exceed prompts_per_step ({self.prompts_per_step})")
        self.objective()  # GRPOConfig checks its own fields (ConfigError)

    def objective(self) -> GRPOConfig:
        return GRPOConfig(**{name: getattr(self, name) for name in OBJECTIVE_FIELDS})

    # -- JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "GRPO config") -> "GRPORunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "GRPORunConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read GRPO config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def differences(self, other: "GRPORunConfig") -> dict[str, tuple[Any, Any]]:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def parse_task_spec(spec: str) -> tuple[str, int | None]:
    """``"countdown:3"`` → ``("countdown", 3)``; ``"countdown"`` → ``("countdown", None)`` (the
    cold start's parser, :func:`nanoseek.tasks.coldstart.parse_task_spec`, naming ``--task``)."""
    from ..tasks.coldstart import parse_task_spec as parse

    return parse(spec, flag="--task")


def build_run_config(fields: dict[str, Any]) -> GRPORunConfig:
    """A :class:`GRPORunConfig` from keyword fields: ``task`` may carry ``:DIFFICULTY``; ``variant``
    "dapo" / "dr_grpo" supply that preset's objective values for the objective fields not given
    (Dr. GRPO's ``loss_max_len`` defaults to ``max_tokens``); ``guard`` may be a dict."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if "task" in fields:
        name, diff = parse_task_spec(fields["task"])
        fields["task"] = name
        if diff is not None:
            if fields.get("difficulty") not in (None, diff):
                raise ConfigError(f"task {name}:{diff} and difficulty={fields['difficulty']} disagree")
            fields["difficulty"] = diff
    variant = fields.get("variant", "grpo")
    given = {k: fields[k] for k in OBJECTIVE_FIELDS if k in fields}
    if variant == "dapo":
        preset = GRPOConfig.dapo()
    elif variant == "dr_grpo":
        max_len = given.get("loss_max_len") or fields.get("max_tokens") or GRPORunConfig.max_tokens
        preset = GRPOConfig.dr_grpo(loss_max_len=max_len)
    else:
        preset = None
    if preset is not None:
        for name in OBJECTIVE_FIELDS:
            if name not in given and name not in ("group_size", "temperature", "mu"):
                fields[name] = getattr(preset, name)
    if isinstance(fields.get("guard"), dict):
        fields["guard"] = RLGuardConfig.from_dict(fields["guard"])
    known = {f.name for f in dataclasses.fields(GRPORunConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"unknown GRPO setting(s): {', '.join(unknown)}")
    return GRPORunConfig(**fields)


def _abs(p: str | None) -> str | None:
    return None if p is None else os.path.abspath(os.path.expanduser(str(p)))


def resolve_run_config(run_dir: Path, overrides: dict[str, Any], resume: bool,
                       log: Callable = print) -> GRPORunConfig:
    """The run's config: built from ``overrides`` (fresh) or read from ``grpo_config.json`` (resume,
    where only :data:`RESUME_CHANGEABLE` settings may differ)."""
    from ..train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "init_from" in overrides:
        overrides["init_from"] = _abs(overrides["init_from"])
    cfg_path = run_dir / CONFIG_FILE
    if resume:
        if not cfg_path.is_file() or latest_checkpoint(run_dir, cleanup=False) is None:
            raise NanoseekError(f"--resume: no GRPO checkpoint in {run_dir} to resume from "
                                f"(run without --resume to start a new run there)")
        data = GRPORunConfig.load(cfg_path).to_dict()
        guard_over = overrides.pop("guard", None) or {}
        if isinstance(guard_over, RLGuardConfig):
            guard_over = guard_over.to_dict()
        if "task" in overrides:
            name, diff = parse_task_spec(overrides["task"])
            overrides["task"] = name
            if diff is not None:
                overrides["difficulty"] = diff
        data = merge_resume_settings(data, overrides, guard_over, RESUME_CHANGEABLE, run_dir, log)
        return GRPORunConfig.from_dict(data, source=str(cfg_path))

    cfg = build_run_config(overrides)
    if cfg.init_from is None:
        raise NanoseekError("--init-from is required: the checkpoint directory of the policy to train "
                            "(an SFT or pretraining checkpoint with its tokenizer)")
    if run_dir.exists() and not run_dir.is_dir():
        raise NanoseekError(f"--out {run_dir} exists and is not a directory")
    if cfg_path.is_file():
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            raise NanoseekError(f"--out {run_dir} already holds a GRPO run with checkpoints up to step "
                                f"{checkpoint_step(ckpts[-1])}; pass --resume to continue it, or choose another --out")
        log(f"note: {run_dir} holds a GRPO run that never reached its first checkpoint: starting over there")
    elif run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise NanoseekError(f"--out {run_dir} is a non-empty directory that holds no GRPO run; "
                            f"choose an empty or new directory")
    return cfg


def check_inputs(cfg: GRPORunConfig) -> None:
    """Fail fast, with one clear line, on a bad task, reward or initial checkpoint."""
    from ..tasks import get_reward, get_task

    get_task(cfg.task)  # RegistryError names the known ones
    get_reward(cfg.reward)
    if cfg.init_from is None:
        raise NanoseekError("--init-from is required")
    src = Path(cfg.init_from)
    if not (src / "config.json").is_file():
        raise NanoseekError(f"--init-from {src}: not a checkpoint directory (no config.json there)")
    if not (src / "tokenizer.json").is_file():
        raise NanoseekError(f"--init-from {src}: no tokenizer.json there (GRPO needs the checkpoint's tokenizer)")


# ----------------------------------------------------------------------------- seeds
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (order matters; no Python ``hash``, so stable across processes)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h & _U63


def problem_seed(run_seed: int, batch: int) -> int:
    """The task-generator seed of batch ``batch``: always below ``EVAL_SEED_BASE`` (held-out problems
    are generated from EVAL_SEED_BASE + seed, so training never sees them)."""
    from ..tasks.evaluate import EVAL_SEED_BASE

    return mix_seed(run_seed, batch, 0x7A5C) % EVAL_SEED_BASE


def sample_seed(run_seed: int, batch: int, prompt: int, sample: int) -> int:
    """The sampling seed of sample ``sample`` of prompt ``prompt`` in batch ``batch``."""
    return mix_seed(run_seed, batch, prompt, sample)


# ----------------------------------------------------------------------------- log-probs
def completion_logprobs(model, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                        temperature: float, n_usable: int | None = None, with_entropy: bool = False,
                        pad_id: int = 0, return_expert_load: bool = False):
    """Per-token log-probs of each completion under ``model``, exactly as the engine reports them.

    One forward of ``prompt + completion[:-1]`` per row (right-padded; causal attention makes the
    padding invisible to real positions); completion token j is scored by the logits at position
    ``len(prompt) - 1 + j`` as ``log_softmax(logits.float() / temperature)[token]``
    (:func:`~nanoseek.infer.sampling.token_logprobs`), after masking ids ``>= n_usable`` (model
    vocabulary padding past the tokenizer's) to −inf as the engine does.

    Returns ``(logp [B, T] float32 with grad, mask [B, T] bool, entropy [B, T] or None)``;
    ``entropy`` (no grad) is that of the same temperature-scaled distribution, in nats. With
    ``return_expert_load`` a fourth value is the forward's ``expert_load`` (or None).
    """
    from ..infer.sampling import token_logprobs

    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError("need one completion per prompt, at least one")
    device = next(model.parameters()).device
    rows = [list(p) + list(c[:-1]) for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    n_comp = [len(c) for c in completion_ids]
    if min(n_comp) < 1 or min(len(p) for p in prompt_ids) < 1:
        raise ValueError("empty prompt or completion")
    t_max = max(n_comp)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    pos = torch.zeros(len(rows), t_max, dtype=torch.long)
    targets = torch.zeros(len(rows), t_max, dtype=torch.long)
    mask = torch.zeros(len(rows), t_max, dtype=torch.bool)
    for i, (row, p, c) in enumerate(zip(rows, prompt_ids, completion_ids)):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        n = len(c)
        pos[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        targets[i, :n] = torch.tensor(list(c), dtype=torch.long)
        mask[i, :n] = True
    ids, pos, targets, mask = ids.to(device), pos.to(device), targets.to(device), mask.to(device)
    fwd = model(ids)
    logits = fwd.logits  # [B, W, V]
    vocab = logits.shape[-1]
    picked = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, vocab))  # [B, T, V]
    if n_usable is not None and n_usable < vocab:
        picked = picked.index_fill(-1, torch.arange(n_usable, vocab, device=device), float("-inf"))
    logp = token_logprobs(picked.reshape(-1, vocab), targets.reshape(-1), temperature).view(targets.shape)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            lp = (picked.detach().float() / (temperature if temperature > 0 else 1.0)).log_softmax(dim=-1)
            entropy = torch.special.entr(lp.exp()).sum(dim=-1)
            entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    if return_expert_load:
        load = fwd.expert_load.detach() if fwd.expert_load is not None else None
        return logp, mask, entropy, load
    return logp, mask, entropy


# ----------------------------------------------------------------------------- one rollout
@dataclass
class Rollout:
    """What one step sampled: P problems × G completions (prompt-major)."""

    batch: int
    problems: list
    prompt_texts: list[str]
    prompt_ids: list[list[int]]  # per problem
    completions: list  # [P·G] Completion
    rewards: torch.Tensor  # [P·G] float32 (shaped: task reward + overlong penalty)
    accuracy: float | None
    format_rate: float
    reward_none: int
    seconds: float
    #: one entry per completion whose reward raised: index, check, error type, message, completion start
    reward_errors: list[dict] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(c.token_ids) for c in self.completions]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _judge(what: str, fn: Callable, args: tuple, on_error: float, failed: list) -> float | None:
    """``fn(*args)`` as a float (``None`` stays ``None``); when it raises, ``on_error``, and
    ``(what, exception)`` is appended to ``failed``: a verifier that breaks on one completion
    must not end the run."""
    try:
        value = fn(*args)
        return None if value is None else float(value)
    except Exception as exc:
        failed.append((what, exc))
        return on_error


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------- the trainer
class GRPOTrainer:
    """Holds one GRPO run; :meth:`train` runs it to ``cfg.steps``."""

    def __init__(self, cfg: GRPORunConfig, run_dir: Path, resume: bool, log: Callable = print):
        from ..data.tokenizer import check_vocab, load_tokenizer
        from ..device import device_name, pick_device
        from ..hf import load_with_tokenizer
        from ..infer.engine import Engine
        from ..tasks import get_reward, get_task
        from ..train.checkpoint import TOKENIZER_FILES, latest_checkpoint, load_model, read_trainer_state
        from ..train.cost import CostMeter
        from ..train.optim import param_groups, train_top_layers

        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.objective = cfg.objective()
        self.task = get_task(cfg.task)
        self.reward_fn = get_reward(cfg.reward)
        self.device = pick_device(cfg.device)
        self.tok_dir = run_dir / "tokenizer"
        self.ckpt = latest_checkpoint(run_dir) if resume else None
        state = read_trainer_state(self.ckpt) if self.ckpt is not None else None

        if state is None:
            tmp = run_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in TOKENIZER_FILES:
                src = Path(cfg.init_from) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
            shutil.rmtree(self.tok_dir, ignore_errors=True)
            os.replace(tmp, self.tok_dir)
            model, _ = load_with_tokenizer(cfg.init_from, str(self.device), "float32")
        else:
            model = load_model(self.ckpt, self.device)
        self.tokenizer = load_tokenizer(self.tok_dir)
        try:
            check_vocab(self.tokenizer.vocab_size, model.config.vocab_size)
        except ValueError as exc:
            raise ConfigError(f"{cfg.init_from}: vocabulary mismatch: {exc}") from None
        self.model = model.to(self.device).train()
        self.ref_model = None
        if self.objective.uses_kl:  # the frozen initial policy (beta = 0 keeps none)
            if state is None:
                ref = copy.deepcopy(self.model)
            else:
                if not (Path(cfg.init_from) / "config.json").is_file():
                    raise NanoseekError(f"cannot resume: the reference policy {cfg.init_from} (init_from) is gone")
                ref, _ = load_with_tokenizer(cfg.init_from, str(self.device), "float32")
            self.ref_model = ref.eval().requires_grad_(False)
        try:
            self.n_trainable = train_top_layers(self.model, cfg.train_layers)
        except ValueError as exc:
            raise ConfigError(f"{cfg.init_from}: {exc}") from None
        groups = [g for g in param_groups(self.model, cfg.weight_decay) if g["params"]]
        for g in groups:
            g.pop("names")
        kwargs = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr_at(0), betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)
        self.routers = self.model.moe_routers()

        tok_vocab = self.tokenizer.vocab_size
        self.n_usable = tok_vocab if tok_vocab < self.model.config.vocab_size else None
        max_seq = cfg.max_seq_len or min(self.model.config.max_position_embeddings, cfg.max_tokens + 1024)
        n = cfg.prompts_per_step * cfg.group_size
        self.engine = Engine(self.model, self.tokenizer, max_slots=min(cfg.max_slots, n), max_seq_len=max_seq)
        self.guard = RLGuard(cfg.guard, run_dir / "incidents.jsonl", log=log)
        self.cost = CostMeter(run_dir, STAGE, self.device, price_per_device_hour=cfg.price_per_device_hour)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.step = 0
        self.batch = 0  # prompts batches drawn so far: never rewound (a rollback moves on to new prompts)
        self.elapsed_before = 0.0
        self._t_start = time.perf_counter()
        if state is not None:
            self._restore(state)
        log(f"grpo: device {self.device} ({device_name(self.device)}); policy {cfg.init_from} "
            f"({self.model.num_parameters() / 1e6:.2f}M parameters, {self.n_trainable / 1e6:.2f}M trained); "
            f"task {cfg.task}:{cfg.difficulty}, reward {cfg.reward}; {cfg.prompts_per_step} prompts x "
            f"{cfg.group_size} samples, max_tokens {cfg.max_tokens}, T={cfg.temperature}; {cfg.variant}: "
            f"beta {self.objective.beta}, eps {self.objective.eps_low}/{self.objective.eps_high}, "
            f"loss {self.objective.loss_mode}, mu {self.objective.mu}, "
            f"dynamic sampling {'on' if self.objective.dynamic_sampling else 'off'}")

    # ------------------------------------------------------------------ schedule
    def lr_at(self, step_index: int) -> float:
        """Linear warmup over ``warmup_steps`` (step 0 gets lr/warmup), then constant."""
        cfg = self.cfg
        if cfg.warmup_steps > 0 and step_index < cfg.warmup_steps:
            return cfg.lr * (step_index + 1) / cfg.warmup_steps
        return cfg.lr

    # ------------------------------------------------------------------ state
    def _trainer_state(self) -> dict:
        def size(p: Path) -> int:
            return p.stat().st_size if p.exists() else 0

        return {
            "version": STATE_VERSION, "stage": STAGE, "step": self.step, "batch": self.batch,
            "guard": self.guard.state_dict(), "cost": self.cost.state_dict(), "grpo_config": self.cfg.to_dict(),
            "metrics_bytes": size(self.metrics_path), "samples_bytes": size(self.samples_path),
            "elapsed": self.elapsed_before + (time.perf_counter() - self._t_start),
            "tokenizer_sha256": self.tokenizer.fingerprint, "init_from": self.cfg.init_from,
            "torch_version": torch.__version__, "num_threads": torch.get_num_threads(),
            "device": str(self.device), "saved_at": time.time(),
        }

    def _restore(self, state: dict) -> None:
        from ..train.checkpoint import restore_optimizer, restore_rng

        if state.get("version") != STATE_VERSION or state.get("stage") != STAGE:
            raise NanoseekError(f"{self.ckpt}: not a GRPO checkpoint of a supported version")
        if state.get("tokenizer_sha256") != self.tokenizer.fingerprint:
            raise NanoseekError(f"{self.ckpt} was trained with another tokenizer than {self.tok_dir}")
        restore_optimizer(self.optimizer, self.ckpt)
        restore_rng(self.ckpt, self.device)
        self.guard.load_state_dict(state["guard"])
        self.cost.load_state_dict(state["cost"])
        self.step, self.batch = int(state["step"]), int(state["batch"])
        self.elapsed_before = float(state["elapsed"])
        if self.device.type == "cpu" and state.get("num_threads") not in (None, torch.get_num_threads()):
            self.log(f"note: the checkpoint was written with {state['num_threads']} CPU threads and this process "
                     f"has {torch.get_num_threads()}: the continuation may differ bitwise from an uninterrupted run")
        for path, key in ((self.metrics_path, "metrics_bytes"), (self.samples_path, "samples_bytes")):
            if path.exists():  # drop the records of steps the interrupted run took after the checkpoint
                with open(path, "r+b") as fh:
                    fh.truncate(min(int(state[key]), path.stat().st_size))
        self.log(f"resumed from {self.ckpt} at step {self.step}")

    def save(self) -> Path:
        from ..train.checkpoint import save_checkpoint

        self.cost.save()
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                               self.tok_dir, keep_last=self.cfg.keep_last, device=self.device)

    def rollback(self, bad_step: int) -> bool:
        """Reload the latest checkpoint (weights, optimizer, guard windows); the prompt stream goes on."""
        from ..train.checkpoint import (checkpoint_step, latest_checkpoint, read_trainer_state,
                                        restore_model, restore_optimizer)

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            self.log(f"guard: step {bad_step}: rollback requested but there is no checkpoint; keeping the step")
            return False
        to_step = checkpoint_step(ckpt)
        self.guard.note_rollback(bad_step, to_step)  # raises past max_rollbacks
        restore_model(self.model, ckpt)
        restore_optimizer(self.optimizer, ckpt)
        state = read_trainer_state(ckpt)
        self.guard.load_state_dict(state["guard"])
        self.step = int(state["step"])
        self.log(f"guard: step {bad_step}: rolled back to {ckpt.name}; continuing with new prompts "
                 f"(batch {self.batch})")
        return True

    def publish_final(self) -> Path:
        """``RUN_DIR/final`` from the checkpoint of the current step (saved first if there is none),
        through :func:`~nanoseek.train.checkpoint.publish_final`, as pretraining does: the same
        files, fsynced, swapped in atomically."""
        from ..train.checkpoint import TRAINER_STATE, checkpoint_dir, publish_final

        ckpt = checkpoint_dir(self.run_dir, self.step)
        if not (ckpt / TRAINER_STATE).is_file():  # train() checkpoints its last step; others may not
            ckpt = self.save()
        return publish_final(self.run_dir, ckpt)

    # ------------------------------------------------------------------ rollout
    def rollout(self, batch: int) -> Rollout:
        from ..infer.sampling import SamplingParams
        from ..tasks import accuracy_reward, format_reward
        from ..tasks.evaluate import chat_prompt

        cfg, obj = self.cfg, self.objective
        t0 = time.perf_counter()
        problems = self.task.generate(problem_seed(cfg.seed, batch), cfg.prompts_per_step, cfg.difficulty)
        texts = [chat_prompt(self.tokenizer, p) for p in problems]
        ids = [self.tokenizer.encode(t) for t in texts]
        prompts, params = [], []
        for i, pid in enumerate(ids):
            for j in range(obj.group_size):
                prompts.append(pid)
                params.append(SamplingParams(temperature=obj.temperature, max_tokens=cfg.max_tokens,
                                             seed=sample_seed(cfg.seed, batch, i, j)))
        self.model.eval()
        try:
            completions = self.engine.generate(prompts, params)
        finally:
            self.model.train()
        rewards, accs, fmts, none, errors = [], [], [], 0, []
        for n, comp in enumerate(completions):
            problem, text = problems[n // obj.group_size], texts[n // obj.group_size]
            failed: list[tuple[str, Exception]] = []
            args = (text, comp.text, problem.fields)
            r = _judge("reward", self.reward_fn, args, REWARD_ON_ERROR, failed)
            if r is None or not math.isfinite(r):
                none += 1
                r = 0.0
            rewards.append(r)
            a = _judge("accuracy", accuracy_reward, args, 0.0, failed)
            if a is not None:
                accs.append(a)
            fmts.append(_judge("format", format_reward, args, 0.0, failed))
            if failed:
                what, exc = failed[0]
                try:
                    message = str(exc)[:_ERROR_TEXT_CHARS]
                except Exception:  # an exception that cannot even describe itself
                    message = "(no message)"
                errors.append({"index": n, "check": what, "error": type(exc).__name__, "message": message,
                               "completion": comp.text[:_ERROR_TEXT_CHARS]})
        if errors and sum(e["check"] == "reward" for e in errors) == len(completions):
            e = errors[0]
            raise NanoseekError(f"the reward {cfg.reward!r} raised on all {len(completions)} completions of batch "
                                f"{batch} ({e['error']}: {e['message']}): the reward is broken, not a completion")
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        if obj.overlong_max_len is not None:
            lengths = torch.tensor([len(c.token_ids) for c in completions])
            rewards_t = rewards_t + overlong_penalty(lengths, obj.overlong_max_len, obj.overlong_cache_len)
        return Rollout(batch, problems, texts, ids, completions, rewards_t, _mean(accs), _mean(fmts), none,
                       time.perf_counter() - t0, errors)

    # ------------------------------------------------------------------ update
    def _micro_batches(self, seqs: list[int]) -> list[list[int]]:
        size = self.cfg.micro_batch_size or len(seqs)
        return [seqs[i:i + size] for i in range(0, len(seqs), size)]

    def _forward(self, model, roll: Rollout, seqs: list[int], with_entropy: bool):
        """``(logp, mask, entropy, expert_load)`` of completions ``seqs`` under ``model``."""
        g = self.objective.group_size
        return completion_logprobs(model, [roll.prompt_ids[n // g] for n in seqs],
                                   [roll.completions[n].token_ids for n in seqs], self.objective.temperature,
                                   self.n_usable, with_entropy, pad_id=self.tokenizer.pad_id or 0,
                                   return_expert_load=True)

    @torch.no_grad()
    def _entropy_only(self, roll: Rollout, seqs: list[int]) -> tuple[float, int]:
        total, count = 0.0, 0
        for micro in self._micro_batches(seqs):
            _, mask, ent, _ = self._forward(self.model, roll, micro, True)
            total += float(ent.sum())
            count += int(mask.sum())
        return total, count

    def update(self, roll: Rollout, step_index: int) -> dict:
        """Advantages, dynamic sampling and the μ × minibatches optimizer steps of one GRPO step."""
        cfg, obj = self.cfg, self.objective
        g = obj.group_size
        n_groups = len(roll.problems)
        adv = group_advantages(roll.rewards, g, scale_by_std=obj.scale_adv_by_std)
        keep = (dynamic_sampling_mask(roll.rewards, g) if obj.dynamic_sampling
                else torch.ones(n_groups, dtype=torch.bool))
        kept = [i for i in range(n_groups) if bool(keep[i])]
        dropped = [i for i in range(n_groups) if not bool(keep[i])]
        out: dict[str, Any] = {"groups_kept": len(kept), "groups_dropped": len(dropped)}
        lr = self.lr_at(step_index)
        out["lr"] = lr
        ent_sum, ent_count = 0.0, 0
        if dropped:  # entropy covers every sampled completion, not only the ones trained on
            s, c = self._entropy_only(roll, [i * g + j for i in dropped for j in range(g)])
            ent_sum, ent_count = ent_sum + s, ent_count + c
        if not kept:
            out.update(update_skipped=True, entropy=ent_sum / ent_count if ent_count else None)
            return out
        n_mb = min(cfg.minibatches, len(kept))
        bounds = [round(k * len(kept) / n_mb) for k in range(n_mb + 1)]
        minibatches = [[i * g + j for i in kept[bounds[k]:bounds[k + 1]] for j in range(g)] for k in range(n_mb)]
        ref_cache: dict[tuple, torch.Tensor] = {}
        stat_sums = {"kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio_mean": 0.0}
        stat_tokens, losses, norms, skipped = 0, [], [], 0
        for epoch in range(obj.mu):
            for mb in minibatches:
                mb_tokens = sum(len(roll.completions[n].token_ids) for n in mb)
                mb_loss = 0.0
                load = None
                for micro in self._micro_batches(mb):
                    logp, mask, ent, micro_load = self._forward(self.model, roll, micro, epoch == 0)
                    if epoch == 0:
                        ent_sum += float(ent.sum())
                        ent_count += int(mask.sum())
                    old = torch.zeros(logp.shape, dtype=torch.float32)  # π_old: the engine's log-probs
                    for r, n in enumerate(micro):
                        lps = roll.completions[n].logprobs
                        old[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
                    old = old.to(logp.device)
                    ref = None
                    if self.ref_model is not None:
                        key = tuple(micro)
                        if key not in ref_cache:
                            with torch.no_grad():
                                ref_cache[key] = self._forward(self.ref_model, roll, micro, False)[0]
                        ref = ref_cache[key]
                    loss, stats = grpo_loss(logp, old, ref, adv[micro].to(logp.device), mask, beta=obj.beta,
                                            eps_low=obj.eps_low, eps_high=obj.eps_high,
                                            loss_mode=obj.loss_mode, max_len=obj.loss_max_len)
                    n_tok = int(mask.sum())
                    weight = n_tok / mb_tokens if obj.loss_mode == "token_mean" else len(micro) / len(mb)
                    (loss * weight).backward()
                    mb_loss += float(loss.detach()) * weight
                    for k in stat_sums:
                        stat_sums[k] += float(stats[k]) * n_tok
                    stat_tokens += n_tok
                    if cfg.bias_update_speed > 0 and micro_load is not None:
                        load = micro_load if load is None else load + micro_load
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
                if math.isfinite(norm) and math.isfinite(mb_loss):
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.optimizer.step()
                    if cfg.bias_update_speed > 0 and load is not None:
                        from ..model.moe import update_routing_bias

                        for router, layer_load in zip(self.routers, load):
                            update_routing_bias(router, layer_load, cfg.bias_update_speed)
                else:
                    skipped += 1
                    self.log(f"warning: step {step_index + 1}: non-finite loss/grad norm ({mb_loss}, {norm}); "
                             f"optimizer step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(mb_loss)
                norms.append(norm)
        out.update(update_skipped=False, optimizer_steps=len(losses) - skipped, loss=_finite(_mean(losses)),
                   grad_norm=_finite(max(norms)), entropy=ent_sum / ent_count if ent_count else None)
        for k, v in stat_sums.items():
            out[k] = v / max(stat_tokens, 1)
        if self.ref_model is None:
            out["kl"] = None
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        from ..tasks.evaluate import evaluate

        cfg = self.cfg
        self.model.eval()
        try:
            res = evaluate(self.engine, self.tokenizer, self.task, n_problems=cfg.eval_n, difficulty=cfg.difficulty,
                           max_tokens=cfg.eval_max_tokens or cfg.max_tokens, seed=cfg.seed)
        finally:
            self.model.train()
        return {"eval_accuracy": res.accuracy, "eval_format_rate": res.format_rate,
                "eval_response_length": res.mean_length}

    # ------------------------------------------------------------------ the loop
    def _record(self, step: int, action: str, roll: Rollout, upd: dict, t_step: float) -> dict:
        from ..train.pretrain import peak_memory_bytes

        obj = self.objective
        lengths = roll.lengths
        n = len(lengths)
        gen_tokens = sum(lengths)
        rec: dict[str, Any] = {
            "stage": STAGE, "step": step, "action": action, "batch": roll.batch,
            "reward": float(roll.rewards.mean()), "reward_std": float(roll.rewards.std()) if n > 1 else 0.0,
            "accuracy": roll.accuracy, "format_rate": roll.format_rate,
            "response_length": gen_tokens / n, "response_length_max": max(lengths),
            "truncation_rate": sum(c.finish_reason == "length" for c in roll.completions) / n,
            "zero_variance_frac": float(zero_variance_fraction(roll.rewards, obj.group_size)),
            "groups_kept": upd["groups_kept"], "groups_dropped": upd["groups_dropped"],
            "update_skipped": upd["update_skipped"], "kl": _finite(upd.get("kl")),
            "clip_low": upd.get("clip_low"), "clip_high": upd.get("clip_high"),
            "ratio_mean": upd.get("ratio_mean"), "entropy": _finite(upd.get("entropy")),
            "loss": upd.get("loss"), "grad_norm": upd.get("grad_norm"), "lr": upd["lr"],
            "repetition_frac": self.guard.last_repetition, "reward_none": roll.reward_none,
            "reward_errors": len(roll.reward_errors),
            "samples": n, "tokens": gen_tokens,
            "samples_per_s": n / t_step if t_step > 0 else None,
            "tokens_per_s": gen_tokens / t_step if t_step > 0 else None,
            "rollout_s": roll.seconds, "step_s": t_step,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "elapsed": self.elapsed_before + (time.perf_counter() - self._t_start),
        }
        return rec

    def _write_samples(self, step: int, roll: Rollout) -> None:
        g = self.objective.group_size
        with open(self.samples_path, "a", encoding="utf-8") as fh:
            for i in range(min(self.cfg.samples_per_log, len(roll.problems))):
                c = roll.completions[i * g]
                fh.write(json.dumps({"step": step, "prompt": roll.problems[i].prompt, "answer": roll.problems[i].answer,
                                     "completion": c.text, "reward": float(roll.rewards[i * g]),
                                     "length": len(c.token_ids), "finish_reason": c.finish_reason}) + "\n")

    def train(self) -> dict:
        cfg = self.cfg
        self._t_start = time.perf_counter()
        if self.ckpt is None:
            self.log(f"checkpoint: {self.save()} (initial policy)")
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc="grpo", unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty(), file=sys.stderr)
        say = bar.write if not bar.disable else self.log
        self.guard.log = say
        self.cost.start()
        metrics = open(self.metrics_path, "a", encoding="utf-8")
        last_eval: dict = {}
        try:
            while self.step < cfg.steps:
                step_no = self.step + 1
                t0 = time.perf_counter()
                roll = self.rollout(self.batch)
                self.batch += 1
                if roll.reward_errors:
                    self.guard.note_reward_errors(step_no, roll.reward_errors, len(roll.completions),
                                                  REWARD_ON_ERROR)
                upd = self.update(roll, self.step)
                n_samples = len(roll.completions)
                self.cost.add_samples(n_samples)
                self.cost.add_tokens(sum(len(roll.prompt_ids[i // self.objective.group_size]) + len(c.token_ids)
                                         for i, c in enumerate(roll.completions)))
                t_step = time.perf_counter() - t0
                signals = {"accuracy": roll.accuracy, "format_rate": roll.format_rate,
                           "response_length": sum(roll.lengths) / n_samples,
                           "truncation_rate": sum(c.finish_reason == "length" for c in roll.completions) / n_samples,
                           "kl": upd.get("kl"), "entropy": upd.get("entropy")}
                decision = self.guard.check(step_no, signals, [c.token_ids for c in roll.completions])
                action = decision.action
                if action == "rollback":
                    # the offending step's record first: the rollback may stop the run (max_rollbacks)
                    metrics.write(json.dumps(self._record(step_no, action, roll, upd, t_step)) + "\n")
                    metrics.flush()
                    if self.rollback(step_no):
                        bar.n = self.step
                        bar.refresh()
                        continue
                self.guard.accept(signals)
                self.step += 1
                rec = self._record(self.step, action, roll, upd, t_step)
                if upd["update_skipped"]:
                    say(f"step {self.step}: all {len(roll.problems)} groups have zero reward variance: "
                        f"update skipped")
                elif upd["groups_dropped"]:
                    rec["note"] = f"dynamic sampling dropped {upd['groups_dropped']} zero-variance groups"
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    last_eval = self.evaluate()
                    rec.update(last_eval)
                if self.step == 1 or self.step % cfg.samples_every == 0 or self.step == cfg.steps:
                    self._write_samples(self.step, roll)
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                say(self._line(rec))
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    say(f"checkpoint: {self.save()}")
        finally:
            bar.close()
            metrics.close()
            self.cost.stop()
            self.cost.save()
        final = self.publish_final()
        report = None
        if cfg.report:
            try:
                from ..report import write_report

                report = write_report(self.run_dir)
            except Exception as exc:  # the run succeeded; a report problem must not hide that
                self.log(f"warning: could not write the report: {type(exc).__name__}: {exc}")
        self.log(f"done: {self.step} GRPO steps; final policy {final}")
        return {"step": self.step, "final": final, "run_dir": self.run_dir, "report": report,
                "eval_accuracy": last_eval.get("eval_accuracy"), "incidents": dict(self.guard.counts)}

    def _line(self, r: dict) -> str:
        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if r.get(key) is not None else "-"

        parts = [f"step {r['step']}/{self.cfg.steps}", f"reward {f('reward', '.3f')}", f"acc {f('accuracy', '.3f')}",
                 f"fmt {f('format_rate', '.2f')}", f"len {f('response_length', '.1f')}", f"kl {f('kl', '.4f')}",
                 f"ent {f('entropy', '.3f')}", f"kept {r['groups_kept']}/{r['groups_kept'] + r['groups_dropped']}",
                 f"{f('samples_per_s', '.1f')} samples/s"]
        if r.get("eval_accuracy") is not None:
            parts.append(f"eval acc {r['eval_accuracy']:.3f}")
        if r["action"] != "ok":
            parts.append(f"[{r['action']}]")
        return " | ".join(parts)


# ----------------------------------------------------------------------------- entry points
def grpo(out: str | os.PathLike, *, resume: bool = False, log: Callable = print, **fields: Any) -> dict:
    """Run (or ``resume``) GRPO into run directory ``out``; ``fields`` are :class:`GRPORunConfig`
    fields (``task`` may be ``"name:difficulty"``, ``guard`` a dict of RLGuardConfig fields,
    ``variant`` "grpo" | "dapo" | "dr_grpo"). Returns a summary dict (step, final, run_dir, report,
    eval_accuracy, incidents)."""
    from ..train.pretrain import _run_lock

    run_dir = Path(out).expanduser().resolve()
    cfg = resolve_run_config(run_dir, fields, resume, log)
    check_inputs(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        if not resume:
            for name in ("metrics.jsonl", "samples.jsonl", "incidents.jsonl"):
                (run_dir / name).unlink(missing_ok=True)
        cfg.save(run_dir / CONFIG_FILE)
        trainer = GRPOTrainer(cfg, run_dir, resume, log)
        return trainer.train()
