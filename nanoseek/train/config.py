"""``TrainConfig``: everything that defines a pretraining run, stored as ``RUN_DIR/train_config.json``.

Defaults follow the DeepSeek-V3 report (§4.2) where they carry over to small models: AdamW β
(0.9, 0.95), weight decay 0.1, gradient clipping 1.0, bias update speed γ = 0.001 switched off for
the last ~3.4% of training (V3: the last 500B of 14.8T tokens), MTP weight λ = 0.3 then 0.1 after
~68% (V3: 10T of 14.8T tokens), balance-loss α = 0.0001. The peak LR defaults to 3e-4 (V3 used
2.2e-4 at 671B; small models tolerate more), decaying by cosine to ``min_lr`` (default ``lr/10``,
as V3's 2.2e-4 → 2.2e-5).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, NanoseekError
from .guard import GuardConfig

GUARD_ACTIONS = ("warn", "skip", "rollback", "lr_down")

# Fields that may change when a run is resumed (--resume): they do not alter the weights of the
# steps already taken. ``max_steps`` moves the LR/γ/λ schedules of the remaining steps (noted).
RESUME_CHANGEABLE = frozenset({
    "max_steps", "checkpoint_every", "keep_last", "eval_every", "eval_batches", "log_every", "device",
    "compile", "activation_checkpointing", "tensorboard", "price_per_device_hour", "peak_tflops",
    "guard", "deterministic",
})
# Fields that only say where the data came from: a resumed run reads RUN_DIR's tokenizer and shards.
DATA_FIELDS = frozenset({"data", "tokenizer", "vocab_size", "text_field", "val_fraction"})


@dataclass
class TrainConfig:
    # --- model: exactly one of preset / config / init_from
    preset: str | None = None
    config: str | None = None  # a config.json (or a directory holding one)
    init_from: str | None = None  # a checkpoint directory to continue pretraining from
    # --- data
    data: list[str] = field(default_factory=list)  # files/dirs/globs of txt/jsonl/parquet, or a shard dir
    tokenizer: str | None = None  # tokenizer directory; trained on the data when None
    vocab_size: int | None = None  # tokenizer size to train (default: the preset's vocab_size)
    text_field: str = "text"
    val_fraction: float = 0.005
    # --- shape of a step
    max_steps: int = 1000
    batch_size: int = 8  # micro-batch (sequences per forward)
    grad_accum: int = 1
    seq_len: int = 256
    # --- optimiser and schedules
    lr: float = 3e-4
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # see nanoseek.train.optim.param_groups
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # <= 0 disables clipping (the norm is still computed for the guard)
    bias_update_speed: float = 0.001  # γ of the auxiliary-loss-free balancing
    bias_update_stop_fraction: float = 0.034  # γ = 0 for this last fraction of steps
    mtp_loss_weight: float = 0.3  # λ
    mtp_loss_weight_late: float = 0.1  # λ after mtp_switch_fraction of the steps
    mtp_switch_fraction: float = 0.68
    aux_loss_alpha: float = 0.0001  # α of the sequence-wise balance loss
    # --- bookkeeping
    seed: int = 0
    checkpoint_every: int = 500
    keep_last: int = 3
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 1
    compile: bool = False
    fp8: bool = False  # block-wise FP8 GEMMs applied from outside (nanoseek.fp8_training)
    fp8_ue8m0: bool = False  # power-of-two FP8 scales (DeepSeek-V3.1 UE8M0)
    activation_checkpointing: bool = False
    device: str = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms (accelerators; CPU is deterministic anyway)
    price_per_device_hour: float = 2.0
    peak_tflops: float | None = None  # bf16 peak for MFU; None: known cards only (H100/H200 790)
    tensorboard: bool = False
    guard: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.betas = tuple(float(b) for b in self.betas)
        if isinstance(self.guard, dict):
            self.guard = GuardConfig(**self.guard)
        self.data = [str(d) for d in self.data]
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid training config: {msg}")

        sources = [s for s in (self.preset, self.config, self.init_from) if s is not None]
        need(len(sources) <= 1, "give only one of preset, config and init_from")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "keep_last",
                     "eval_every", "eval_batches", "log_every"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.min_lr <= self.lr, f"min_lr must lie in [0, lr={self.lr}], got {self.min_lr}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("bias_update_stop_fraction", "mtp_switch_fraction", "val_fraction"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"{name} must lie in [0, 1], got {value}")
        need(self.vocab_size is None or self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        need(self.peak_tflops is None or self.peak_tflops > 0, f"peak_tflops must be positive, got {self.peak_tflops}")
        need(self.price_per_device_hour >= 0, f"price_per_device_hour must be >= 0, got {self.price_per_device_hour}")
        for name in ("on_nonfinite", "on_spike", "on_grad_explosion", "on_collapse"):
            value = getattr(self.guard, name, None)
            need(value is None or value in GUARD_ACTIONS,
                 f"guard.{name}={value!r} (choose from {', '.join(GUARD_ACTIONS)})")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimiser step on one rank (multiply by the world size for the global figure)."""
        return self.batch_size * self.grad_accum * self.seq_len

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("guard"), dict):
            guard_known = {f.name for f in dataclasses.fields(GuardConfig)}
            bad = sorted(set(data["guard"]) - guard_known)
            if bad:
                raise ConfigError(f"{source}: unknown guard field(s) {', '.join(bad)}")
            data["guard"] = GuardConfig(**data["guard"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read training config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """``{field: (self value, other value)}`` for the fields that differ (guard as one field)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def merge_resume_settings(stored: dict[str, Any], overrides: dict[str, Any], guard_overrides: dict[str, Any],
                          changeable: Iterable[str], run_dir: Path, log: Callable[[str], None] = print,
                          ignore: Iterable[str] = ()) -> dict[str, Any]:
    """A stored run config with ``--resume`` overrides applied (pretrain, SFT and GRPO share this).

    Settings in ``changeable`` may change (each change is logged); any other difference is refused
    with one error naming all of them, since it would alter steps already taken. ``ignore`` keys
    (e.g. data paths) and ``None`` values are skipped; tuples compare as the lists JSON stores.
    """
    data = dict(stored)
    data["guard"] = dict(stored.get("guard") or {})
    changeable, ignore = frozenset(changeable), frozenset(ignore)
    changed, refused = [], []
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = list(value)
        if key in ignore or value is None or data.get(key) == value:
            continue
        if key not in data:
            raise ConfigError(f"unknown setting {key!r}")
        if key in changeable:
            changed.append(f"{key}: {data[key]!r} -> {value!r}")
            data[key] = value
        else:
            refused.append(f"{key} (run: {data[key]!r}, given: {value!r})")
    if refused:
        raise NanoseekError(f"--resume: these settings differ from the run in {run_dir} and cannot change "
                            f"mid-run: {'; '.join(refused)}")
    for key, value in guard_overrides.items():
        if data["guard"].get(key) != value:
            changed.append(f"guard.{key}: {data['guard'].get(key)!r} -> {value!r}")
            data["guard"][key] = value
    if changed:
        log(f"note: resuming with changed settings: {'; '.join(changed)}")
    return data
