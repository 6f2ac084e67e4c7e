"""Model configuration with the Hugging Face ``DeepseekV3Config`` field names, plus presets.

A ``config.json`` means the same thing here as in ``transformers``: :func:`ModelConfig.from_dict` reads
both the hub form (``rope_theta`` + ``rope_scaling``) and the newer ``rope_parameters`` form, and
:meth:`ModelConfig.to_hf_dict` writes a file that ``transformers.DeepseekV3Config`` accepts.
Fields that nanoseek does not use are kept in ``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# model_type values whose checkpoints use the DeepSeek-V3 architecture (Moonlight uses deepseek_v3).
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
#: a training run's compute dtype (``precision`` setting; resolved by :func:`nanoseek.device.autocast_dtype`)
PRECISIONS = ("auto", "float32", "bfloat16")
# Keys that only make sense for the source checkpoint and must not be written into ours:
# remote-code pointers (we are not that code) and the FP8 recipe (we save dequantised weights).
_DROP_ON_SAVE = ("auto_map", "quantization_config", "transformers_version", "torch_dtype", "dtype")
# Keys that describe the file rather than the model; rewritten on every save.
_NOT_EXTRA = ("architectures", "model_type", "num_mtp_layers", "extra")


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (names as in ``transformers.DeepseekV3Config``).

    nanoseek-only fields: ``mtp_loss_weight`` (λ of the MTP loss, V3 report §2.2) and
    ``aux_loss_alpha`` (α of the sequence-wise balance loss, V3 report eq. 17-20; the hub configs
    carry this field too).
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    aux_loss_alpha: float = 0.0
    mtp_loss_weight: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.rope_scaling = _normalise_rope_scaling(self.rope_scaling)
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from ``first_k_dense_replace`` on are MoE (MTP blocks count on from the last layer)."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def yarn_enabled(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling["rope_type"] == "yarn"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field for inconsistent values."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be a positive integer or null, got {self.q_lora_rank!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must lie in [0, num_hidden_layers="
             f"{self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        if self.n_routed_experts > 0:
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(per_group >= 2 or self.n_group == 1,
                 f"each of the n_group={self.n_group} groups needs >= 2 experts (group score = top-2 sum)")
            need(1 <= self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, topk_group * "
                 f"experts_per_group = {self.topk_group * per_group}]")

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a ``config.json`` dict (hub or ``rope_parameters`` form); unknown keys go to ``extra``."""
        data = dict(raw)
        model_type = data.get("model_type", "deepseek_v3")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a DeepSeek-V3 architecture "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        rope_parameters = data.pop("rope_parameters", None)
        if rope_parameters:
            rope_parameters = dict(rope_parameters)
            theta = rope_parameters.pop("rope_theta", None)
            if theta is not None:
                data.setdefault("rope_theta", theta)
            if rope_parameters.get("rope_type", rope_parameters.get("type", "default")) != "default":
                data["rope_scaling"] = rope_parameters
        if data.get("num_nextn_predict_layers") is None and "num_mtp_layers" in data:
            data["num_nextn_predict_layers"] = data.pop("num_mtp_layers")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in _NOT_EXTRA}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:  # wrong value types reach here from dataclass construction
            raise ConfigError(f"{source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON types (``extra`` nested), for nanoseek's own bookkeeping."""
        return dataclasses.asdict(self)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """A ``config.json`` in the hub form that ``transformers.DeepseekV3Config`` reads."""
        out = {k: v for k, v in self.extra.items() if k not in _DROP_ON_SAVE}
        out.update({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"})
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            scaling["type"] = scaling["rope_type"]  # older readers look for "type"
            out["rope_scaling"] = scaling
        if dtype is not None:
            out["torch_dtype"] = dtype
        return out

    def save(self, path: str | Path, dtype: str | None = None) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n",
                              encoding="utf-8")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _normalise_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accept ``{"type": "yarn", ...}`` or ``{"rope_type": "yarn", ...}``; ``default`` means none."""
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
    scaling = dict(scaling)
    rope_type = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_type"] = rope_type
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if "original_max_position_embeddings" not in scaling:
        raise ConfigError("rope_scaling (yarn) needs original_max_position_embeddings")
    if scaling.get("factor") is None:
        raise ConfigError("rope_scaling (yarn) needs factor")
    return scaling


# --------------------------------------------------------------------------- presets
def _preset_tiny() -> ModelConfig:
    """A few-thousand-parameter model for unit tests: every feature on (q-LoRA, groups, MTP)."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=256, initializer_range=0.02, num_nextn_predict_layers=1)


def _preset_small() -> ModelConfig:
    """CPU demo model (~20M parameters) for the speedrun."""
    return ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=192,
        num_hidden_layers=6, num_attention_heads=4, n_shared_experts=1, n_routed_experts=16,
        kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=1024, initializer_range=0.02, num_nextn_predict_layers=1)


def _preset_bench() -> ModelConfig:
    """The GPU benchmark model of the design notes (1.69B total, 0.29B active)."""
    return ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
        num_hidden_layers=16, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64,
        kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32, v_head_dim=64, qk_nope_head_dim=64,
        n_group=8, topk_group=4, num_experts_per_tok=6, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=4096, initializer_range=0.02,
        num_nextn_predict_layers=0)


def _preset_v3() -> ModelConfig:
    """DeepSeek-V3 671B (hub config.json); build it on the meta device for counting and planning."""
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        routed_scaling_factor=2.5, max_position_embeddings=163840, initializer_range=0.006,
        rope_theta=10000.0, num_nextn_predict_layers=1, aux_loss_alpha=0.0001,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "bench": _preset_bench, "v3": _preset_v3}


def get_preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` for a preset name (``tiny``, ``small``, ``bench``, ``v3``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature term: ``0.1·mscale·ln(factor) + 1`` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
