"""What a configuration costs: parameters (total, active per token, MTP), weight bytes in bf16 and
FP8, the MLA latent KV cache against plain multi-head attention, and training FLOPs per token.

Counts come from the real model built on the ``meta`` device (no memory is allocated), so they are
the numbers of the code that trains and serves, not of a separate formula. For the ``v3`` preset
they reproduce the published figures: 671B total, 37B activated, 14B MTP module on the hub of which
about 11.5B are its own (the embedding and output head are shared with the main model), and
576 cached values per token per layer (DeepSeek-V3 report, arXiv 2412.19437).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .model import DeepSeekV3

FP8_BLOCK = 128  # weights are quantised per 128×128 block (V3 report §3.3.2)
SCALE_BYTES = 4  # one float32 scale (``weight_scale_inv``) per block
BF16_BYTES = 2

# A parameter name inside one transformer block, after "model.layers.{i}." or "mtp.{k}.block.".
_BLOCK_PREFIX = re.compile(r"^(?:model\.layers\.\d+|mtp\.\d+\.block)\.")
# Linear weights that DeepSeek's FP8 checkpoints store as float8_e4m3fn with block scales.
_FP8_LINEARS = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight",
    "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
)


@dataclass
class _Param:
    name: str
    shape: tuple[int, ...]
    numel: int
    kind: str  # embedding | head | norm | router | routed | linear | other
    mtp: bool
    fp8: bool


def _classify(name: str, shape: tuple[int, ...]) -> tuple[str, bool]:
    """(kind, stored-as-FP8) for a parameter name of :class:`~nanoseek.model.DeepSeekV3`."""
    if name.endswith("embed_tokens.weight"):
        return "embedding", False
    if name == "lm_head.weight" or name.endswith("shared_head.head.weight"):
        return "head", False
    local = _BLOCK_PREFIX.sub("", name)
    if local.endswith("norm.weight") or len(shape) == 1:
        return "norm", False
    if local == "mlp.gate.weight":
        return "router", False
    if local.startswith("mlp.experts."):
        return "routed", True
    if local in _FP8_LINEARS:
        return "linear", True
    if re.fullmatch(r"mtp\.\d+\.eh_proj\.weight", name):
        return "linear", True
    return "other", False


def _fp8_bytes(p: _Param) -> int:
    """One byte per weight plus a float32 scale per (partial) 128×128 block, as in hub checkpoints.

    Stacked routed experts are counted as the hub stores them: per expert, separate gate, up and
    down matrices, each with its own scale grid.
    """
    if p.kind == "routed" and len(p.shape) == 3:
        experts, rows, cols = p.shape
        matrices = [(rows // 2, cols)] * 2 if "gate_up" in p.name else [(rows, cols)]
        blocks = experts * sum(math.ceil(r / FP8_BLOCK) * math.ceil(c / FP8_BLOCK) for r, c in matrices)
    else:
        rows, cols = p.shape[0], math.prod(p.shape[1:])
        blocks = math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK)
    return p.numel + SCALE_BYTES * blocks


def _build_meta(config: ModelConfig):
    with torch.device("meta"):
        return DeepSeekV3(config)


def _parameters(config: ModelConfig, model=None) -> list[_Param]:
    """Unique parameters of the model; a tensor shared by the MTP module counts for the main model."""
    if model is None:
        model = _build_meta(config)
    named = list(model.named_parameters(remove_duplicate=False))
    owner: dict[int, str] = {}
    for name, tensor in named:  # prefer the main model's name for shared tensors
        key = id(tensor)
        if key not in owner or (owner[key].startswith("mtp.") and not name.startswith("mtp.")):
            owner[key] = name
    tensors = {id(t): t for _, t in named}
    out = []
    for key, name in owner.items():
        shape = tuple(tensors[key].shape)
        kind, fp8 = _classify(name, shape)
        out.append(_Param(name, shape, math.prod(shape), kind, name.startswith("mtp."), fp8))
    return out


def _active_numel(p: _Param, config: ModelConfig) -> float:
    if p.kind == "routed":
        return p.numel * config.num_experts_per_tok / config.n_routed_experts
    return float(p.numel)


def _matmul_active(params: list[_Param], config: ModelConfig, mtp: bool) -> float:
    """Matmul weights touched per token (routed experts at top-k/E), LM head in, embedding out."""
    total = sum(_active_numel(p, config) for p in params
                if p.mtp == mtp and p.kind not in ("embedding", "norm"))
    if mtp:  # every MTP depth also runs the shared output head
        total += config.num_nextn_predict_layers * config.vocab_size * config.hidden_size
    elif not any(p.kind == "head" for p in params):  # tied embeddings: the head is the embedding
        total += config.vocab_size * config.hidden_size
    return total


def _attention_flops(config: ModelConfig, seq_len: int, layers: int) -> float:
    """6·L·H·T·(qk_head_dim + v_head_dim): score and value matmuls over the full T×T square."""
    return 6.0 * layers * config.num_attention_heads * seq_len * (config.qk_head_dim + config.v_head_dim)


def training_flops_per_token(config: ModelConfig, seq_len: int, include_mtp: bool = False,
                             model=None) -> float:
    """Forward + backward FLOPs per trained token, the MFU numerator of the design notes.

    ``6 × (matmul parameters touched per token, LM head included, embedding lookup excluded)
    + 6 × layers × heads × seq_len × (qk_head_dim + v_head_dim)`` (PaLM / nanoGPT convention:
    attention counted as the full square). ``include_mtp`` adds the MTP modules' blocks and their
    pass through the shared head.
    """
    params = _parameters(config, model)
    flops = 6.0 * _matmul_active(params, config, mtp=False)
    flops += _attention_flops(config, seq_len, config.num_hidden_layers)
    if include_mtp and config.num_nextn_predict_layers:
        flops += 6.0 * _matmul_active(params, config, mtp=True)
        flops += _attention_flops(config, seq_len, config.num_nextn_predict_layers)
    return flops


def describe(config: ModelConfig, model=None, seq_len: int | None = None) -> dict[str, Any]:
    """Sizes and costs of ``config`` as a flat, JSON-ready dict (see :func:`format_info`).

    ``model`` may be given to count an existing model instead of building one on ``meta``.
    ``seq_len`` (default: ``min(4096, max_position_embeddings)``) is the sequence length of the
    training FLOPs figure.
    """
    params = _parameters(config, model)
    main = [p for p in params if not p.mtp]
    mtp = [p for p in params if p.mtp]

    def total(ps, kinds=None):
        return sum(p.numel for p in ps if kinds is None or p.kind in kinds)

    embedding = total(main, ("embedding",))
    head = total(main, ("head",))
    active = sum(_active_numel(p, config) for p in main)
    fp8_main = sum(_fp8_bytes(p) if p.fp8 else BF16_BYTES * p.numel for p in main)
    fp8_mtp = sum(_fp8_bytes(p) if p.fp8 else BF16_BYTES * p.numel for p in mtp)

    heads = config.num_attention_heads
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    mha = heads * config.qk_head_dim + heads * config.v_head_dim
    layers = config.num_hidden_layers
    if seq_len is None:
        seq_len = min(4096, config.max_position_embeddings)
    flops_matmul = 6.0 * _matmul_active(params, config, mtp=False)

    return {
        "num_hidden_layers": layers,
        "num_moe_layers": sum(config.is_moe_layer(i) for i in range(layers)),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "n_routed_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "num_nextn_predict_layers": config.num_nextn_predict_layers,
        "total_params": total(main),
        "active_params": int(round(active)),
        "active_params_no_embedding": int(round(active - embedding)),
        "embedding_params": embedding,
        "lm_head_params": head,
        "routed_expert_params": total(main, ("routed",)),
        "mtp_params": total(mtp),
        "bf16_bytes": BF16_BYTES * total(main),
        "fp8_bytes": fp8_main,
        "mtp_bf16_bytes": BF16_BYTES * total(mtp),
        "mtp_fp8_bytes": fp8_mtp,
        "kv_latent_values_per_token_per_layer": latent,
        "kv_latent_bytes_per_token_per_layer": BF16_BYTES * latent,
        "kv_mha_values_per_token_per_layer": mha,
        "kv_mha_bytes_per_token_per_layer": BF16_BYTES * mha,
        "kv_latent_values_per_token": latent * layers,
        "kv_latent_bytes_per_token": BF16_BYTES * latent * layers,
        "kv_mha_values_per_token": mha * layers,
        "kv_mha_bytes_per_token": BF16_BYTES * mha * layers,
        "kv_cache_ratio": mha / latent,
        "flops_seq_len": seq_len,
        "training_flops_per_token": flops_matmul + _attention_flops(config, seq_len, layers),
    }


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_info(d: dict[str, Any], title: str | None = None) -> str:
    """A plain-text table of :func:`describe`'s dict (aligned columns, no extra dependency)."""
    layers = d["num_hidden_layers"]
    rows: list[tuple[str, str] | None] = [
        ("layers", f"{layers} ({d['num_moe_layers']} MoE, {d['n_routed_experts']} routed experts, "
                   f"top-{d['num_experts_per_tok']})"),
        ("hidden / vocab", f"{d['hidden_size']} / {d['vocab_size']}"),
        None,
        ("total parameters", f"{_count(d['total_params'])} ({d['total_params']:,}; MTP excluded)"),
        ("active per token", f"{_count(d['active_params'])} (embedding and head included)"),
        ("active, no embedding", _count(d["active_params_no_embedding"])),
        ("routed experts", _count(d["routed_expert_params"])),
        ("MTP modules", f"{d['num_nextn_predict_layers']} x, {_count(d['mtp_params'])} own parameters "
                        "(embedding and head shared)"),
        None,
        ("weights bf16", _bytes(d["bf16_bytes"]) + f" (+ MTP {_bytes(d['mtp_bf16_bytes'])})"),
        ("weights fp8", _bytes(d["fp8_bytes"]) + f" (+ MTP {_bytes(d['mtp_fp8_bytes'])}; "
                        "128x128 block scales)"),
        None,
        ("KV cache / token / layer", f"{d['kv_latent_values_per_token_per_layer']} values "
                                     f"({_bytes(d['kv_latent_bytes_per_token_per_layer'])} bf16) "
                                     f"vs MHA {d['kv_mha_values_per_token_per_layer']}"),
        ("KV cache / token", f"{_bytes(d['kv_latent_bytes_per_token'])} vs MHA "
                             f"{_bytes(d['kv_mha_bytes_per_token'])} "
                             f"({d['kv_cache_ratio']:.1f}x smaller)"),
        ("train FLOPs / token", f"{d['training_flops_per_token']:.3e} at seq {d['flops_seq_len']}"),
    ]
    width = max(len(r[0]) for r in rows if r is not None)
    lines = [title] if title else []
    for row in rows:
        lines.append("" if row is None else f"  {row[0]:<{width}}  {row[1]}")
    return "\n".join(lines)
