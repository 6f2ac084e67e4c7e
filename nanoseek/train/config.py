"""The settings of a pretraining, SFT or distillation run, each declared once with its help and
valid range (:mod:`nanoseek.settings`): :class:`TrainConfig` (stored as ``RUN_DIR/train_config.json``),
:class:`SFTConfig` (SFT's defaults and the cold-start set) and :class:`GuardConfig` (the training guard).

Defaults follow the DeepSeek-V3 report (§4.2) where they carry over to small models: AdamW β
(0.9, 0.95), weight decay 0.1, gradient clipping 1.0, bias update speed γ = 0.001 switched off for
the last ~3.4% of training (V3: the last 500B of 14.8T tokens), MTP weight λ = 0.3 then 0.1 after
~68% (V3: 10T of 14.8T tokens), balance-loss α = 0.0001. The peak LR defaults to 3e-4 (V3 used
2.2e-4 at 671B; small models tolerate more), decaying by cosine to ``min_lr`` (default ``lr/10``,
as V3's 2.2e-4 → 2.2e-5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import PRECISIONS
from ..errors import ConfigError, NanoseekError
from ..settings import Settings, resumable, setting

POLICIES = ("warn", "skip", "rollback", "lr_down")  # on_nonfinite: never "warn" (the NaN update would reach the weights)
# Fields that only say where the data came from: a resumed run reads RUN_DIR's tokenizer and shards.
DATA_FIELDS = frozenset({"data", "tokenizer", "vocab_size", "text_field", "val_fraction"})


@dataclass
class GuardConfig(Settings):
    """The training guard's thresholds and responses (:mod:`nanoseek.train.guard`)."""

    window: int = setting(50, "accepted steps in the moving windows", min=1, cli=False)
    min_history: int = setting(10, "accepted steps before loss-spike / grad checks start", min=1, cli=False)
    spike_zscore: float = setting(6.0, "robust z-score of the loss that is a spike", min=0, min_inclusive=False,
                                  cli=False)
    grad_norm_factor: float = setting(10.0, "grad norm over this x the median is an explosion", min=1,
                                      min_inclusive=False, cli=False)
    dead_expert_fraction: float = setting(0.5, "share of a layer's experts without tokens that is a collapse",
                                          min=0, max=1, min_inclusive=False, cli=False)
    imbalance_ratio: float = setting(8.0, "busiest expert over mean load that is an imbalance", min=1,
                                     min_inclusive=False, cli=False)
    on_nonfinite: str = setting("rollback", "response to a NaN/inf loss or grad norm; 'warn' is refused: it "
                                "would apply the NaN update", flag="--on-nan", choices=POLICIES)
    on_spike: str = setting("skip", "response to a loss spike", choices=POLICIES)
    on_grad_explosion: str = setting("skip", "response to a grad-norm explosion", choices=POLICIES)
    on_collapse: str = setting("warn", "response to dead experts / imbalance", choices=POLICIES)
    lr_down_factor: float = setting(0.5, "LR scale per lr_down response", min=0, max=1, min_inclusive=False,
                                    cli=False)
    max_rollbacks: int = setting(3, "rollbacks before the run stops", min=0, cli=False)
    skip_batches_after_rollback: int = setting(1, "steps of data skipped past a rolled-back step", min=0, cli=False)
    mad_floor: float = setting(1e-3, "floor of the robust sigma, relative to |median loss|", min=0, cli=False)
    min_load_per_expert: float = setting(4.0, "expert checks need this x n_experts assignments per layer", min=0,
                                         cli=False)
    max_consecutive_skips: int = setting(10, "dropped updates in a row before a rollback; 0 = never", min=0, cli=False)

    def __post_init__(self) -> None:
        if self.on_nonfinite == "warn":
            raise ConfigError(f"GuardConfig.on_nonfinite (--on-nan) = {self.on_nonfinite!r} is refused: it would "
                              f"apply a NaN/inf loss or gradient to the weights and checkpoint them; choose "
                              f"skip, lr_down or rollback")
        self.check_settings()
        if self.min_history > self.window:
            raise ConfigError(f"GuardConfig.min_history = {self.min_history} must be <= window = {self.window}")


@dataclass
class TrainConfig(Settings):
    """Everything that defines a pretraining run, stored as ``RUN_DIR/train_config.json``."""

    # --- model: exactly one of preset / config / init_from
    preset: str | None = setting(None, "model preset: tiny, small (default), bench or v3")
    config: str | None = setting(None, "a model config.json (its vocab_size must cover the tokenizer)")
    init_from: str | None = setting(None, "a checkpoint directory to start from")
    # --- data
    data: list[str] = setting(help="txt/jsonl/parquet files, directories or globs, or a shard directory "
                              "(with manifest.json) to reuse", default_factory=list)
    tokenizer: str | None = setting(None, "tokenizer directory (default: train one on --data)")
    vocab_size: int | None = setting(None, "size of the tokenizer to train (default: the model's)", min=1)
    text_field: str = setting("text", "jsonl field / parquet column holding the text")
    val_fraction: float = setting(0.005, "share of the data held out for the validation loss", min=0, max=1)
    # --- shape of a step
    max_steps: int = setting(1000, "optimizer steps", min=1, resumable=True)
    batch_size: int = setting(8, "sequences per micro-batch (per process)", min=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", min=1)
    seq_len: int = setting(256, "tokens per sequence", min=1)
    # --- optimiser and schedules
    optimizer: str = setting("adamw", "adamw, or muon: Muon on the hidden matrices, AdamW on the rest, same "
                             "lr (nanoseek.train.muon)", choices=("adamw", "muon"))
    muon_momentum: float = setting(0.95, "Muon's momentum (with --optimizer muon)", min=0, max=0.999999)
    muon_ns_steps: int = setting(5, "Newton-Schulz iterations of Muon's orthogonalisation (with --optimizer muon; "
                                 "5 is its authors' choice; 3 is cheaper per step but cost the cpu preset 4-6 points of base "
                                 "accuracy in bf16)", min=1, resumable=True)
    lr: float = setting(3e-4, "peak learning rate", min=0, min_inclusive=False)
    min_lr: float | None = setting(None, "final learning rate of the cosine decay (unset: lr/10)", min=0)
    warmup_steps: int = setting(100, "linear warmup steps", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices", min=0)
    decay_embeddings: bool = setting(True, "weight-decay the embedding too (nanoseek.train.optim.param_groups)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas", min=0, max=0.999999, metavar="BETA")
    eps: float = setting(1e-8, "AdamW epsilon", min=0, min_inclusive=False)
    grad_clip: float = setting(1.0, "gradient-norm clip (<= 0: off; the norm still feeds the guard)")
    bias_update_speed: float = setting(0.001, "gamma of the auxiliary-loss-free balancing", min=0)
    bias_update_stop_fraction: float = setting(0.034, "gamma = 0 for this last share of the steps", min=0, max=1)
    mtp_loss_weight: float = setting(0.3, "MTP loss weight lambda", min=0)
    mtp_loss_weight_late: float = setting(0.1, "lambda after mtp_switch_fraction of the steps", min=0)
    mtp_switch_fraction: float = setting(0.68, "share of the steps at lambda before the late weight", min=0, max=1)
    aux_loss_alpha: float = setting(0.0001, "alpha of the sequence-wise balance loss", min=0)
    # --- bookkeeping
    seed: int = setting(0, "model init and data order", min=0)
    checkpoint_every: int = setting(500, "steps between checkpoints", min=1, resumable=True)
    keep_last: int = setting(3, "checkpoints to keep", min=1, resumable=True)
    eval_every: int = setting(250, "steps between validation losses", min=1, resumable=True)
    eval_batches: int = setting(20, "validation batches per evaluation", min=1, resumable=True)
    log_every: int = setting(1, "steps between metrics records", min=1, resumable=True)
    compile: bool = setting(False, "torch.compile the model", resumable=True)
    precision: str = setting("auto", "compute dtype: auto (bfloat16 autocast where the chip computes in it natively: "
                             "recent GPUs, CPUs with AVX512-BF16 or AMX; else float32), float32 or bfloat16; "
                             "weights and optimizer state stay float32", choices=PRECISIONS, resumable=True)
    fp8: bool = setting(False, "block-wise FP8 GEMMs (V3 report 3.3; pure-torch emulation, slower than bf16)")
    fp8_ue8m0: bool = setting(False, "power-of-two FP8 scales (DeepSeek-V3.1 UE8M0)")
    activation_checkpointing: bool = setting(False, "recompute block activations in backward to save memory",
                                             resumable=True)
    device: str = setting("auto", "auto, cuda, xpu, npu, mps or cpu", resumable=True)
    deterministic: bool = setting(False, "deterministic kernels on accelerators (slower; CPU runs are "
                                  "deterministic anyway)", resumable=True)
    price_per_device_hour: float = setting(2.0, "$ per device-hour for cost.json", min=0, flag="--price-per-hour",
                                           resumable=True)
    peak_tflops: float | None = setting(None, "bf16 peak TFLOP/s per device for MFU (unset: 790 on H100/H200, "
                                        "else no MFU)", min=0, min_inclusive=False, resumable=True)
    tensorboard: bool = setting(False, "also log to RUN_DIR/tensorboard", resumable=True)
    guard: GuardConfig = setting(help="the training guard", default_factory=GuardConfig, cli=False, resumable=True)

    def __post_init__(self) -> None:
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        self.betas = tuple(float(b) for b in self.betas)
        if isinstance(self.guard, dict):
            self.guard = GuardConfig.from_dict(self.guard)
        self.data = [str(d) for d in self.data]
        self.validate()

    def validate(self) -> None:
        """Each field's range (declared with it), then the checks across fields."""
        self.check_settings()
        sources = [s for s in (self.preset, self.config, self.init_from) if s is not None]
        if len(sources) > 1:
            raise ConfigError("invalid training config: give only one of preset, config and init_from")
        if not self.min_lr <= self.lr:
            raise ConfigError(f"invalid training config: min_lr must lie in [0, lr={self.lr}], got {self.min_lr}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimiser step on one rank (multiply by the world size for the global figure)."""
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class SFTConfig(TrainConfig):
    """An SFT (or cold-start, or distillation) run: pretraining's settings with SFT defaults, plus
    the generated cold-start set (R1's cold start: solver-written worked solutions in the chat form)."""

    val_fraction: float = setting(0.02, "share of the examples held out (by hash) for the validation loss",
                                  min=0, max=1)
    max_steps: int = setting(500, "optimizer steps", min=1, resumable=True)
    lr: float = setting(1e-4, "peak learning rate", min=0, min_inclusive=False)
    warmup_steps: int = setting(20, "linear warmup steps", min=0)
    checkpoint_every: int = setting(250, "steps between checkpoints", min=1, resumable=True)
    eval_every: int = setting(100, "steps between validation losses", min=1, resumable=True)
    cold_start: list[str] = setting(help="also (or instead) train on generated cold-start examples of these "
                                    "tasks", metavar="TASK[:DIFFICULTY]", default_factory=list)
    cold_start_n: int = setting(2000, "cold-start examples in total", min=1)
    cold_start_seed: int | None = setting(None, "problem seed of the cold-start set (unset: --seed)", min=0)
    cold_start_answer_only: float = setting(0.0, "share of cold-start examples that state the answer without "
                                            "the working", min=0, max=1, metavar="FRACTION")


@dataclass
class ExtendConfig(TrainConfig):
    """A context-extension run (:mod:`nanoseek.train.extend`): pretraining's settings with extension
    defaults, plus the YaRN factor and the original context."""

    factor: float | None = setting(None, "YaRN scale s: the new context is original × factor (V3: 40)", min=1,
                                   min_inclusive=False)
    original_max_position_embeddings: int | None = setting(
        None, "the context the model was pretrained at (default: the checkpoint's YaRN original, else its "
        "max_position_embeddings)", min=1, flag="--original-context")
    max_steps: int = setting(200, "optimizer steps", min=1, resumable=True)
    lr: float = setting(3e-4, "peak learning rate (V3 extends at its final pretraining rate)", min=0,
                        min_inclusive=False)
    warmup_steps: int = setting(10, "linear warmup steps", min=0)
    seq_len: int = setting(1024, "tokens per sequence: the longer context to train at", min=1)
    checkpoint_every: int = setting(100, "steps between checkpoints", min=1, resumable=True)
    eval_every: int = setting(100, "steps between validation losses", min=1, resumable=True)


@dataclass
class DistillConfig(SFTConfig):
    """A distillation run (R1 §2.4): rejection-sample the teacher on a task's training problems,
    keep the verified, well-formed, distinct completions, and SFT the student on them."""

    preset: str | None = setting(None, "a fresh student of this preset, with the teacher's tokenizer",
                                 flag="--student-preset")
    config: str | None = setting(None, "a student model config.json", cli=False)
    init_from: str | None = setting(None, "a student checkpoint to start from (its own tokenizer)",
                                    flag="--student-init")
    data: list[str] = setting(help="the kept samples (written by the run), then any extra chat JSONL",
                              default_factory=list, cli=False)
    tokenizer: str | None = setting(None, "the student's tokenizer (the teacher's for --student-preset)",
                                    cli=False)
    vocab_size: int | None = setting(None, "unused by distillation", min=1, cli=False)
    text_field: str = setting("text", "unused by distillation", cli=False)
    cold_start: list[str] = setting(help="unused by distillation", default_factory=list, cli=False)
    cold_start_n: int = setting(2000, "unused by distillation", min=1, cli=False)
    cold_start_seed: int | None = setting(None, "unused by distillation", min=0, cli=False)
    cold_start_answer_only: float = setting(0.0, "unused by distillation", min=0, max=1, cli=False)
    teacher: str | None = setting(None, "teacher checkpoint directory (model + tokenizer)")
    task: str | None = setting(None, "TASK[:DIFFICULTY] whose training problems the teacher solves",
                               metavar="TASK[:DIFFICULTY]")
    prompts: int = setting(256, "problems to sample", min=1)
    samples_per_prompt: int = setting(4, "teacher samples per problem", min=1)
    temperature: float = setting(1.0, "sampling temperature", min=0)
    max_tokens: int = setting(256, "tokens per teacher sample at most", min=1)
    max_length_chars: int | None = setting(None, "reject samples longer than this many characters (unset: "
                                           "no limit)", min=1)
    max_slots: int = setting(32, "teacher requests decoded together", min=1)


RESUME_CHANGEABLE = resumable(TrainConfig)


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
