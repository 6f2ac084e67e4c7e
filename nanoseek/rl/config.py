"""The settings of a GRPO run, each declared once (:mod:`nanoseek.settings`): the objective
(:class:`GRPOConfig`: GRPO and its DAPO / Dr. GRPO variants), the RL guard (:class:`RLGuardConfig`,
the detectors are in :mod:`nanoseek.rl.guard`) and the run (:class:`GRPORunConfig`, stored as
``RUN_DIR/grpo_config.json``). No torch here: the CLI derives its flags from these classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..settings import Settings, resumable, setting
from ..tasks.base import PROMPT_FORMATS, parse_task_spec

STAGE = "grpo"
CONFIG_FILE = "grpo_config.json"
VARIANTS = ("grpo", "dapo", "dr_grpo")
LOSS_MODES = ("sequence_mean", "token_mean", "constant")
RL_POLICIES = ("warn", "rollback")
POLICY_FIELDS = ("on_hacking", "on_length", "on_kl", "on_entropy", "on_repetition")


# --------------------------------------------------------------------------- the objective
@dataclass
class GRPOConfig(Settings):
    """Hyper-parameters of the GRPO objective (plus the sampling knobs it depends on).

    Defaults are plain GRPO as in DeepSeekMath §4.1 / R1 §2.2.1:

    - ``group_size`` G = 8 completions per prompt (DeepSeekMath used 64, R1 16; 8 fits small runs).
    - ``beta`` = 0.04: DeepSeekMath's GRPO value. R1 used 0.001 on a 671B model with long runs; at
      nanoseek's scale a small model drifts quickly from its reference, and the stronger anchor is
      the safer default. It is a field: set 0.001 to follow R1, 0 to drop the reference model.
    - ``eps_low`` = ``eps_high`` = 0.2: the symmetric PPO clip. ``loss_mode`` "sequence_mean".
    - ``scale_adv_by_std`` True: Â = (r − mean)/std with the unbiased std (see
      :func:`~nanoseek.rl.objective.group_advantages`).
    - ``dynamic_sampling``: drop zero-variance groups (DAPO). ``overlong_max_len`` /
      ``overlong_cache_len``: DAPO soft overlong penalty, both set or both None.
    - ``loss_max_len``: the constant divisor of loss mode "constant" (Dr. GRPO) — the generation
      budget (max new tokens); required in that mode.
    - ``mu``: policy updates per batch of samples (μ in DeepSeekMath Alg. 1). With μ = 1 the
      samples are on-policy and ρ ≡ 1. ``temperature``: sampling temperature; log-probs for the
      ratio must use the same temperature.
    """

    group_size: int = setting(8, "G samples per problem (advantages compare samples of one problem)", min=2)
    beta: float = setting(0.04, "KL weight (0 keeps no reference model)", min=0)
    eps_low: float = setting(0.2, "lower clip: the ratio floor is 1 - eps_low", min=0)
    eps_high: float = setting(0.2, "upper clip (DAPO 0.28)", min=0)
    loss_mode: str = setting("sequence_mean", "sequence_mean (GRPO), token_mean (DAPO) or constant (Dr. GRPO)",
                             choices=LOSS_MODES)
    scale_adv_by_std: bool = setting(True, "advantages (r - mean) / std; --no-std-scaling: r - mean (Dr. GRPO)",
                                     flag="--std-scaling")
    dynamic_sampling: bool = setting(False, "drop groups whose rewards are all equal (DAPO)")
    overlong_max_len: int | None = setting(None, "DAPO overlong reward shaping: L_max", min=1)
    overlong_cache_len: int | None = setting(None, "DAPO overlong reward shaping: L_cache", min=1)
    loss_max_len: int | None = setting(None, "normaliser of loss mode 'constant' (unset: --max-tokens)", min=1)
    mu: int = setting(1, "policy updates per batch of samples", min=1)
    temperature: float = setting(1.0, "sampling temperature", min=0, min_inclusive=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Each field's range (declared with it), then the checks across fields."""
        self.check_settings()

        def bad(msg: str) -> None:
            raise ConfigError(f"GRPOConfig: {msg}")

        if self.eps_low >= 1.0:
            bad(f"eps_low must be in [0, 1) (the ratio floor is 1 - eps_low), got {self.eps_low!r}")
        if self.loss_mode == "constant" and self.loss_max_len is None:
            bad('loss_mode "constant" (Dr. GRPO) needs loss_max_len, the generation budget')
        if (self.overlong_max_len is None) != (self.overlong_cache_len is None):
            bad("overlong_max_len and overlong_cache_len must be set together (or both None)")
        if self.overlong_max_len is not None and self.overlong_cache_len > self.overlong_max_len:
            bad(f"need 0 < overlong_cache_len <= overlong_max_len, got "
                f"{self.overlong_cache_len} and {self.overlong_max_len}")

    @property
    def uses_kl(self) -> bool:
        """Whether a reference model is needed (beta > 0)."""
        return self.beta > 0

    def objective(self) -> "GRPOConfig":
        """The objective fields alone (what :func:`~nanoseek.rl.objective.grpo_loss` and friends read)."""
        return GRPOConfig(**{name: getattr(self, name) for name in OBJECTIVE_FIELDS})

    def with_(self, **changes: Any) -> "GRPOConfig":
        """A checked copy with some fields changed (an unknown field is a :class:`ConfigError`)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"{type(self).__name__}: unknown field(s) {unknown}")
        return self.replace(**changes)

    @classmethod
    def dapo(cls, **overrides: Any) -> "GRPOConfig":
        """DAPO (arXiv 2503.14476): clip-higher ε_low 0.2 / ε_high 0.28, dynamic sampling, token-level
        loss, no KL term (beta 0, as in the paper). Overlong shaping stays off unless
        ``overlong_max_len`` / ``overlong_cache_len`` are given (DAPO used 20480 / 4096 — tie them to
        your generation budget)."""
        return GRPOConfig(**{**dict(eps_low=0.2, eps_high=0.28, dynamic_sampling=True, loss_mode="token_mean",
                                    beta=0.0), **overrides})

    @classmethod
    def dr_grpo(cls, loss_max_len: int, **overrides: Any) -> "GRPOConfig":
        """Dr. GRPO (arXiv 2503.20783): Â = r − mean(r) (no std), each response's token sum divided
        by the constant ``loss_max_len`` (the generation budget), no KL term (beta 0)."""
        return GRPOConfig(**{**dict(scale_adv_by_std=False, loss_mode="constant", loss_max_len=loss_max_len,
                                    beta=0.0), **overrides})


OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOConfig))


# --------------------------------------------------------------------------- the RL guard
@dataclass
class RLGuardConfig(Settings):
    """Thresholds and responses of the RL guard (the detectors and why each default is what it is:
    :mod:`nanoseek.rl.guard`)."""

    window: int = setting(20, "steps in the moving windows", min=2, cli=False)
    min_history: int = setting(5, "steps before the detectors start", min=2, cli=False)
    hacking_format_rise: float = setting(0.2, "fitted format-rate rise that, with an accuracy drop, is hacking",
                                         min=0, min_inclusive=False, cli=False)
    hacking_accuracy_drop: float = setting(0.1, "fitted accuracy drop of reward hacking", min=0,
                                           min_inclusive=False, cli=False)
    hacking_min_t: float = setting(4.0, "t-statistic both trends need", min=0, cli=False)
    hacking_min_history: int = setting(10, "steps before the hacking detector starts (capped at window)", min=2,
                                       cli=False)
    length_zscore: float = setting(6.0, "robust z-score of the mean length that is an explosion", min=0,
                                   min_inclusive=False, cli=False)
    length_min_ratio: float = setting(1.5, "the length must also grow by this factor", min=1, cli=False)
    truncation_fraction: float = setting(0.5, "share of completions hitting max_tokens that is an explosion",
                                         min=0, max=1, min_inclusive=False, cli=False)
    kl_max: float = setting(1.0, "KL to the reference above this is a blow-up", min=0, min_inclusive=False,
                            cli=False)
    kl_min: float = setting(0.05, "KL below this is never a blow-up", min=0, cli=False)
    kl_zscore: float = setting(8.0, "robust z-score of the KL that is a blow-up", min=0, min_inclusive=False,
                               cli=False)
    kl_jump_ratio: float = setting(2.0, "a blow-up must also jump by this factor over the last step", min=1,
                                   cli=False)
    entropy_floor: float = setting(0.03, "entropy (nats/token) below this is a collapse", min=0, cli=False)
    entropy_drop_ratio: float = setting(0.5, "entropy below this x its median is a collapse", min=0, max=0.999999,
                                        min_inclusive=False, cli=False)
    repeat_coverage: float = setting(0.5, "share of a completion covered by one repeated n-gram", min=0, max=1,
                                     min_inclusive=False, cli=False)
    repeat_ngram: int = setting(4, "longest n-gram checked for repetition", min=1, cli=False)
    repeat_min_tokens: int = setting(8, "completions shorter than this are not checked", min=2, cli=False)
    repeat_fraction: float = setting(0.5, "share of degenerate completions that is a collapse", min=0, max=1,
                                     min_inclusive=False, cli=False)
    on_hacking: str = setting("rollback", "format rate up while accuracy falls: the reward is being gamed",
                              choices=RL_POLICIES)
    on_length: str = setting("warn", "mean length jumps or most completions hit --max-tokens (longer reasoning "
                             "is what a healthy R1-style run learns)", choices=RL_POLICIES)
    on_kl: str = setting("rollback", "KL to the reference jumps above kl_max or far above its recent values "
                         "(only with --beta > 0; a KL that crept up only warns)", choices=RL_POLICIES)
    on_entropy: str = setting("warn", "policy entropy below the floor or halving (entropy falls as a policy "
                              "commits)", choices=RL_POLICIES)
    on_repetition: str = setting("rollback", "most completions loop on a token or n-gram (once earlier steps "
                                 "did not)", choices=RL_POLICIES)
    max_rollbacks: int = setting(3, "rollbacks before the run stops", min=0, cli=False)

    def __post_init__(self) -> None:
        self.check_settings()
        if self.min_history > self.window:
            raise ConfigError(f"RLGuardConfig.min_history = {self.min_history}: must be an integer in "
                              f"[2, window={self.window}]")


#: The default response of each detector (why: :mod:`nanoseek.rl.guard`).
DEFAULT_POLICIES = {name: getattr(RLGuardConfig(), name) for name in POLICY_FIELDS}


# --------------------------------------------------------------------------- the run
@dataclass
class GRPORunConfig(GRPOConfig):
    """Everything that defines a GRPO run; stored as ``RUN_DIR/grpo_config.json``.

    The objective fields are those of :class:`GRPOConfig` (defaults: plain GRPO; ``variant``
    "dapo" / "dr_grpo" take that preset's values for the fields not given). ``lr`` defaults to 1e-4,
    a value for nanoseek-scale models (millions of parameters); large models want 1e-6..1e-5.
    ``minibatches`` splits the kept groups of a step into that many optimizer steps per pass (μ
    passes); ``micro_batch_size`` (sequences per forward, 0 = the whole minibatch) only bounds
    memory: gradients accumulate to exactly the minibatch's loss. ``train_layers`` N > 0 updates
    only the last N decoder layers, the final norm and the output head
    (:func:`~nanoseek.train.optim.train_top_layers`); 0 updates every parameter.
    """

    init_from: str | None = setting(None, "checkpoint directory of the policy (model + tokenizer), e.g. an "
                                    "SFT run's final/")
    task: str = setting("arithmetic", "task NAME or NAME:DIFFICULTY (arithmetic, countdown, linear, ...)",
                        metavar="TASK[:DIFFICULTY]")
    difficulty: int = setting(1, "problem difficulty (also given as --task NAME:DIFFICULTY)", min=1, cli=False)
    reward: str = setting("combined", "registered reward name (combined: accuracy + 0.1 format)")
    prompt_format: str = setting("chat", "how problems are asked: chat (the checkpoint's chat template) or base "
                                 "(the question and a newline, as a speedrun pretraining document begins: RL "
                                 "straight from a base model, R1-Zero)", choices=PROMPT_FORMATS)
    variant: str = setting("grpo", "objective preset", choices=VARIANTS, cli=False)
    # rollout
    steps: int = setting(100, "GRPO steps", min=1, resumable=True)
    prompts_per_step: int = setting(16, "P problems per step, over all processes", min=1)
    screen_factor: int = setting(1, "draw N x P problems, answer each once greedily and train on the P whose "
                                 "greedy answer earns the least reward (1: off)", min=1, metavar="N")
    max_tokens: int = setting(256, "generation budget per sample", min=1)
    max_slots: int = setting(64, "requests the engine decodes together", min=1, resumable=True)
    max_seq_len: int | None = setting(None, "engine cache length, prompt + completion (unset: min(model "
                                      "positions, max_tokens + 1024))", min=1)
    # optimizer
    lr: float = setting(1e-4, "learning rate", min=0, min_inclusive=False)
    warmup_steps: int = setting(0, "linear warmup steps, then constant", min=0)
    weight_decay: float = setting(0.0, "AdamW weight decay on matrices", min=0)
    betas: tuple[float, float] = setting((0.9, 0.99), "AdamW betas", min=0, max=0.999999, metavar="BETA")
    eps: float = setting(1e-8, "AdamW epsilon", min=0, min_inclusive=False)
    grad_clip: float = setting(1.0, "gradient norm clip (<= 0: off)")
    train_layers: int = setting(0, "update only the last N decoder layers + final norm + output head (0: all)",
                                min=0, metavar="N")
    minibatches: int = setting(1, "optimizer steps per pass over a step's samples", min=1)
    micro_batch_size: int = setting(0, "sequences per forward (memory only; 0: all)", min=0)
    bias_update_speed: float = setting(0.0, "MoE router bias update speed during RL (0: the biases stay fixed)",
                                       min=0)
    compile: bool = setting(False, "torch.compile the policy's training forward and the rollout engine's decode step")
    fp8: bool = setting(False, "block-wise FP8 GEMMs for sampling and training (V3 report 3.3; pure-torch "
                        "emulation, slower than bf16)")
    fp8_ue8m0: bool = setting(False, "power-of-two FP8 scales (DeepSeek-V3.1 UE8M0)")
    # bookkeeping
    seed: int = setting(0, "run seed: problems and sampling", min=0)
    checkpoint_every: int = setting(50, "steps between checkpoints", min=1, resumable=True)
    keep_last: int = setting(3, "checkpoints to keep", min=1, resumable=True)
    eval_every: int = setting(0, "held-out evaluation every N steps (0: off)", min=0, resumable=True)
    eval_n: int = setting(64, "held-out problems per evaluation", min=1, resumable=True)
    eval_max_tokens: int | None = setting(None, "generation budget of the evaluation (unset: --max-tokens)", min=1,
                                          resumable=True)
    samples_every: int = setting(10, "steps between sample logs in samples.jsonl", min=1, resumable=True)
    samples_per_log: int = setting(4, "problems per sample log", min=0, resumable=True)
    device: str = setting("auto", "auto, cuda, xpu, npu, mps or cpu", resumable=True)
    price_per_device_hour: float = setting(2.0, "$ per device-hour for cost.json", min=0, flag="--price-per-hour",
                                           resumable=True)
    report: bool = setting(True, "write report.md and plots at the end", resumable=True)
    guard: RLGuardConfig = setting(help="the RL guard", default_factory=RLGuardConfig, cli=False, resumable=True)

    def __post_init__(self) -> None:
        if isinstance(self.guard, dict):
            self.guard = RLGuardConfig.from_dict(self.guard)
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()
        if not self.task:
            raise ConfigError("invalid GRPO config: task must be a task name")
        if self.minibatches > self.prompts_per_step:
            raise ConfigError(f"invalid GRPO config: minibatches ({self.minibatches}) cannot exceed "
                              f"prompts_per_step ({self.prompts_per_step})")


RESUME_CHANGEABLE = resumable(GRPORunConfig)


def build_run_config(fields: dict[str, Any]) -> GRPORunConfig:
    """A :class:`GRPORunConfig` from keyword fields: ``task`` may carry ``:DIFFICULTY``; ``variant``
    "dapo" / "dr_grpo" supply that preset's objective values for the objective fields not given
    (Dr. GRPO's ``loss_max_len`` defaults to ``max_tokens``); ``guard`` may be a dict."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if "task" in fields:
        name, diff = parse_task_spec(fields["task"], flag="--task")
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
        max_len = given.get("loss_max_len") or fields.get("max_tokens") or GRPORunConfig().max_tokens
        preset = GRPOConfig.dr_grpo(max_len)
    else:
        preset = None
    if preset is not None:
        for name in OBJECTIVE_FIELDS:
            if name not in given and name not in ("group_size", "temperature", "mu"):
                fields[name] = getattr(preset, name)
    return GRPORunConfig.from_dict(fields)
