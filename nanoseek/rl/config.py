"""The settings of a GRPO run (:class:`GRPORunConfig`, stored as ``RUN_DIR/grpo_config.json``), how a
fresh run builds them and a resumed one reads them back, and the checks before any work starts."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, NanoseekError
from ..tasks import get_reward, get_task
from ..tasks.coldstart import parse_task_spec as parse_spec
from ..train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
from ..train.config import merge_resume_settings
from ..train.run import absolute_path
from .guard import RLGuardConfig
from .objective import GRPOConfig

STAGE = "grpo"
CONFIG_FILE = "grpo_config.json"
OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOConfig))
VARIANTS = ("grpo", "dapo", "dr_grpo")
# Settings a resumed run may change: none alters the steps already taken.
RESUME_CHANGEABLE = frozenset({
    "steps", "checkpoint_every", "keep_last", "eval_every", "eval_n", "eval_max_tokens", "samples_every",
    "samples_per_log", "device", "price_per_device_hour", "guard", "report", "max_slots",
})


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
    return parse_spec(spec, flag="--task")


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


def resolve_run_config(run_dir: Path, overrides: dict[str, Any], resume: bool,
                       log: Callable = print) -> GRPORunConfig:
    """The run's config: built from ``overrides`` (fresh) or read from ``grpo_config.json`` (resume,
    where only :data:`RESUME_CHANGEABLE` settings may differ)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "init_from" in overrides:
        overrides["init_from"] = absolute_path(overrides["init_from"])
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
    get_task(cfg.task)  # RegistryError names the known ones
    get_reward(cfg.reward)
    if cfg.init_from is None:
        raise NanoseekError("--init-from is required")
    src = Path(cfg.init_from)
    if not (src / "config.json").is_file():
        raise NanoseekError(f"--init-from {src}: not a checkpoint directory (no config.json there)")
    if not (src / "tokenizer.json").is_file():
        raise NanoseekError(f"--init-from {src}: no tokenizer.json there (GRPO needs the checkpoint's tokenizer)")
