"""Import and export of Hugging Face DeepSeek-V3 checkpoints (safetensors only).

Hub layout (what ``deepseek-ai/DeepSeek-V3`` ships and what ``transformers`` 5 writes by default):

* routed experts one tensor per expert: ``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``;
  nanoseek stacks them into ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and
  ``mlp.experts.down_proj`` ``[E, H, I]``. The fused 3-D form (what ``save_pretrained(...,
  save_original_format=False)`` writes) is read as well.
* the multi-token-prediction module ``k`` lives at ``model.layers.{num_hidden_layers + k}`` with
  ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, copies of the embedding (``embed_tokens``)
  and of the output head (``shared_head.head``), and a full decoder block; nanoseek keeps it under
  ``mtp.{k}`` and shares the embedding and head with the main model.
* FP8 checkpoints store ``float8_e4m3fn`` weights next to ``<key>_scale_inv`` (one multiplier per
  ``weight_block_size`` block); they are dequantised on load, so the loaded model is dense.

Loading streams the files one at a time through ``safetensors.safe_open`` into a model that was
built on the meta device and then materialised, so peak memory is the model plus one tensor.
Pickle-based weights (``.bin``/``.pt``/...) are never opened. Saving writes into a temporary
directory next to the target and renames it into place, so ``path`` never holds half a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .data.tokenizer import load_tokenizer
from .device import pick_device
from .errors import CheckpointError
from .fp8 import dequantize_weight_blockwise
from .fsutil import fsync_path, write_json_durable
from .model import DeepSeekV3

__all__ = ["load", "save", "parse_size"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}
_MAX_LISTED = 8  # how many key names an error message lists

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_ROUTER_BIAS = "e_score_correction_bias"


# =============================================================================== small helpers
def _dtype_from(value: Any, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise CheckpointError(f"{what}: unsupported floating dtype {value!r} "
                              f"(use one of float32, bfloat16, float16)")
    return _DTYPES[name]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"500MB"``, ``"2GB"``, ``"1.5GiB"``, ``"4096"``.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024.
    """
    if isinstance(size, bool):
        raise CheckpointError(f"max_shard_size must be a size such as '5GB' or a byte count, got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"max_shard_size {size!r} is not a size such as '500MB', '2GB' or 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower()
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    base = 1024 if "i" in unit else 1000
    out = int(number * base**power)
    if out <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return out


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return f"{shown}{more}"


# =============================================================================== key mapping
def _hub_key_to_ours(key: str, n_layers: int, n_mtp: int) -> tuple:
    """Classify one hub key.

    Returns one of
    ``("tensor", our_key)`` — a tensor of ours, same layout;
    ``("expert", our_3d_key, j, "gate"|"up"|"down")`` — one expert's slice of a stacked tensor;
    ``("mtp_copy", "embed"|"head", hub_key)`` — a copy of the shared embedding / head: check, drop;
    ``("ignore", why)`` — deliberately skipped.
    """
    if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
        return ("ignore", "rotary buffer")
    ours = key
    m = _LAYER_RE.match(key)
    if m and int(m.group(1)) >= n_layers:
        k, rest = int(m.group(1)) - n_layers, m.group(2)
        if k >= n_mtp:
            return ("ignore", "MTP layer beyond num_nextn_predict_layers")
        if rest == "embed_tokens.weight":
            return ("mtp_copy", "embed", key)
        if rest == "shared_head.head.weight":
            return ("mtp_copy", "head", key)
        if rest == "shared_head.norm.weight":
            return ("tensor", f"mtp.{k}.norm.weight")
        if rest.split(".", 1)[0] in ("enorm", "hnorm", "eh_proj"):
            return ("tensor", f"mtp.{k}.{rest}")
        ours = f"mtp.{k}.block.{rest}"
    e = _EXPERT_RE.match(ours)
    if e:
        prefix, j, proj = e.group(1), int(e.group(2)), e.group(3)
        target = f"{prefix}.down_proj" if proj == "down" else f"{prefix}.gate_up_proj"
        return ("expert", target, j, proj)
    return ("tensor", ours)


def _our_key_to_hub(name: str, n_layers: int) -> str:
    """Hub name of one of our (non-expert) state-dict keys."""
    m = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if not m:
        return name
    layer, rest = n_layers + int(m.group(1)), m.group(2)
    if rest == "norm.weight":
        return f"model.layers.{layer}.shared_head.norm.weight"
    if rest.startswith("block."):
        rest = rest[len("block."):]
    return f"model.layers.{layer}.{rest}"


def _hub_expert_key(stacked_hub_name: str, j: int, proj: str) -> str:
    prefix = stacked_hub_name.rsplit(".", 1)[0]  # ...mlp.experts
    return f"{prefix}.{j}.{proj}_proj.weight"


# =============================================================================== checkpoint files
def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory, and the index's weight_map if there is one."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from None
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                keys = [k for k, v in weight_map.items() if v == name]
                raise CheckpointError(f"{index_path} lists shard file {name!r} (for {_listing(sorted(keys))}) "
                                      f"but {path / name} does not exist")
        return [path / name for name in names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if shards:
        return shards, None
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle-based weights ({', '.join(pickles)}): pickle-based weights are not "
            f"loaded for safety; convert them to safetensors")
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE} "
                          f"with model-*.safetensors shards)")


def _key_locations(files: list[Path], weight_map: dict[str, str] | None, root: Path) -> dict[str, Path]:
    """key -> file holding it. Reads only the file headers."""
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None
        for key in keys:
            if key in where:
                raise CheckpointError(f"tensor {key!r} is stored twice: in {where[key].name} and {file.name}")
            where[key] = file
    if weight_map is not None:
        for key, name in weight_map.items():
            if where.get(key) != root / name:
                raise CheckpointError(f"{root / INDEX_FILE} maps {key!r} to {name!r} but that file does not "
                                      f"hold it")
    return where


def _checkpoint_dtype(cfg: ModelConfig, config_path: Path) -> torch.dtype:
    raw = cfg.extra.get("torch_dtype") or cfg.extra.get("dtype")
    if raw is None or raw == "auto":
        return torch.float32
    return _dtype_from(raw, f"{config_path}: torch_dtype")


# =============================================================================== load
def _dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], key: str) -> torch.Tensor:
    try:
        if q.dim() == 2:
            return dequantize_weight_blockwise(q, scale_inv, block=block, dtype=torch.float32)
        if q.dim() == 3 and scale_inv.dim() == 3 and scale_inv.shape[0] == q.shape[0]:  # fused experts
            return torch.stack([dequantize_weight_blockwise(q[e], scale_inv[e], block=block, dtype=torch.float32)
                                for e in range(q.shape[0])])
        raise ValueError(f"cannot dequantise a {q.dim()}-D weight of shape {tuple(q.shape)} with scales "
                         f"of shape {tuple(scale_inv.shape)}")
    except ValueError as exc:
        raise CheckpointError(f"FP8 weight {key!r}: {exc}") from None


def _block_size(cfg: ModelConfig, config_path: Path) -> tuple[int, int]:
    qc = cfg.extra.get("quantization_config") or {}
    block = qc.get("weight_block_size") or [128, 128]
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{config_path}: quantization_config.weight_block_size must be two positive "
                              f"integers, got {block!r}")
    return int(block[0]), int(block[1])


class _Reader:
    """Reads tensors from a checkpoint's files, dequantising FP8 weights; one file open at a time
    (plus, rarely, the file of a scale that lives in another shard)."""

    def __init__(self, where: dict[str, Path], block: tuple[int, int]):
        self.where = where
        self.block = block

    def shape(self, handle, key: str) -> tuple[int, ...]:
        return tuple(handle.get_slice(key).get_shape())

    def tensor(self, handle, file: Path, key: str) -> torch.Tensor:
        t = handle.get_tensor(key)
        if t.dtype not in FP8_DTYPES:
            return t
        skey = key + "_scale_inv"
        sfile = self.where.get(skey)
        if sfile is None:
            raise CheckpointError(f"{file.name}: {key!r} is stored as {_dtype_name(t.dtype)} but has no "
                                  f"{skey!r} scale to dequantise it with")
        if sfile == file:
            scale = handle.get_tensor(skey)
        else:
            with safe_open(str(sfile), framework="pt") as other:
                scale = other.get_tensor(skey)
        return _dequantize(t, scale.float(), self.block, key)


def _peek_mtp_layers(keys: list[str], n_layers: int) -> set[int]:
    out = set()
    for key in keys:
        m = _LAYER_RE.match(key)
        if m and int(m.group(1)) >= n_layers:
            out.add(int(m.group(1)) - n_layers)
    return out


def _build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build on the meta device, cast, materialise on ``device`` (values are garbage until loaded)."""
    can_reinit = any(hasattr(DeepSeekV3, n) for n in ("init_non_persistent_buffers", "reset_buffers"))
    if can_reinit:
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
    else:  # no way to recompute non-persistent buffers: build for real (slower, always correct)
        with torch.device(device):
            model = DeepSeekV3(cfg)
    model.to(dtype=dtype)
    _router_bias_to_fp32(model)
    if can_reinit:
        model.to_empty(device=device)
        _retie(model, cfg)
        if hasattr(model, "init_non_persistent_buffers"):
            model.init_non_persistent_buffers()
        else:
            model.reset_buffers()
    return model


def _router_bias_to_fp32(model: nn.Module) -> None:
    for module in model.modules():
        b = module._buffers.get(_ROUTER_BIAS)
        if b is not None and b.dtype != torch.float32:
            module._buffers[_ROUTER_BIAS] = b.float()


def _retie(model: nn.Module, cfg: ModelConfig) -> None:
    """Make sure ``lm_head`` still shares the embedding after ``to_empty`` when tied."""
    if not cfg.tie_word_embeddings:
        return
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        return
    head, emb = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and emb is not None and head.weight is not emb.weight:
        head.weight = emb.weight


def _init_missing(name: str, t: torch.Tensor, std: float) -> None:
    """DeepSeek-style init for tensors a non-strict load did not find (they would be garbage)."""
    with torch.no_grad():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == _ROUTER_BIAS or leaf == "bias":
            t.zero_()
        elif t.dim() == 1:  # RMSNorm weights
            t.fill_(1.0)
        else:
            t.normal_(0.0, std)


def _expert_slot(t: torch.Tensor, j: int, proj: str) -> torch.Tensor:
    """Expert ``j``'s ``proj`` weight as a view into a stacked tensor ([E, 2I, H] or [E, H, I])."""
    if proj == "down":
        return t[j]
    inter = t.shape[1] // 2
    return t[j, :inter] if proj == "gate" else t[j, inter:]


def _find_missing(targets: dict[str, torch.Tensor], filled: dict[int, set], n_layers: int
                  ) -> tuple[list[str], list[tuple[str, torch.Tensor]]]:
    """Hub names of what the checkpoint did not provide, and (our name, tensor or expert view) of it.

    Tied / shared tensors appear under several names in the state dict: any one of them counts."""
    missing: list[str] = []
    missing_tensors: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, t in targets.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        slots = filled.get(id(t), set())
        if "all" in slots:
            continue
        if t.dim() == 3 and name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            projs = ("down",) if name.endswith(".down_proj") else ("gate", "up")
            hub = _our_key_to_hub(name, n_layers)
            for j in range(t.shape[0]):
                for p in projs:
                    if (j, p) not in slots:
                        missing.append(_hub_expert_key(hub, j, p))
                        missing_tensors.append((name, _expert_slot(t, j, p)))
        else:
            missing.append(_our_key_to_hub(name, n_layers))
            missing_tensors.append((name, t))
    return missing, missing_tensors


def load(path: str | os.PathLike, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, strict: bool = True) -> nn.Module:
    """Load a DeepSeek-V3-architecture checkpoint directory as a :class:`~nanoseek.model.DeepSeekV3`.

    ``path`` holds ``config.json`` and ``model.safetensors`` (or ``model-*.safetensors`` shards with
    ``model.safetensors.index.json``). ``dtype`` defaults to the checkpoint's (``torch_dtype`` /
    ``dtype`` in config.json, float32 if absent); the router bias stays float32. FP8 weights are
    dequantised. With ``strict`` (default) any missing or unexpected tensor is an error; otherwise
    they are reported with a warning and missing ones get a fresh init. Returns the model in eval mode.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint path {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {root} is not a directory (expected config.json + "
                              f"*.safetensors inside)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in checkpoint directory {root}")
    cfg = ModelConfig.from_json(config_path)  # ConfigError (unknown model_type, ...) passes through
    files, weight_map = _checkpoint_files(root)
    where = _key_locations(files, weight_map, root)

    target_dtype = _dtype_from(dtype, "dtype") if dtype is not None else _checkpoint_dtype(cfg, config_path)
    block = _block_size(cfg, config_path)
    cfg.extra.pop("quantization_config", None)  # the loaded weights are dense
    cfg.extra.pop("torch_dtype", None)
    cfg.extra.pop("dtype", None)

    n_layers = cfg.num_hidden_layers
    present_mtp = _peek_mtp_layers(list(where), n_layers)
    if cfg.num_nextn_predict_layers > 0 and not present_mtp:
        warnings.warn(f"{config_path} sets num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      f"checkpoint holds no MTP weights (model.layers.{n_layers}.*): loading without MTP "
                      f"modules", stacklevel=2)
        cfg.num_nextn_predict_layers = 0
    n_mtp = cfg.num_nextn_predict_layers

    device = torch.device(device) if device is not None else torch.device("cpu")
    model = _build_model(cfg, device, target_dtype)
    targets = model.state_dict(keep_vars=True)
    reader = _Reader(where, block)
    filled: dict[int, set] = {}  # id(tensor) -> filled slots ("all" or (j, proj))
    unexpected: list[str] = []
    embed_shape = tuple(targets["model.embed_tokens.weight"].shape) if "model.embed_tokens.weight" in targets \
        else None
    tied = cfg.tie_word_embeddings and "model.embed_tokens.weight" in where

    def check_shape(key: str, file: Path, got: tuple, want: tuple, ours: str) -> None:
        if got != want:
            raise CheckpointError(f"{file.name}: tensor {key!r} has shape {list(got)} but the model's "
                                  f"{ours!r} needs {list(want)} (config {config_path})")

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in sorted(fh.keys()):
                if key.endswith("_scale_inv") and key[: -len("_scale_inv")] in where:
                    continue  # consumed together with its weight
                kind = _hub_key_to_ours(key, n_layers, n_mtp)
                if kind[0] == "ignore":
                    continue
                if kind[0] == "mtp_copy":
                    if embed_shape is not None:
                        check_shape(key, file, reader.shape(fh, key), embed_shape,
                                    "model.embed_tokens.weight" if kind[1] == "embed" else "lm_head.weight")
                    continue
                if kind[0] == "tensor":
                    ours = kind[1]
                    if ours == "lm_head.weight" and tied:
                        continue  # the embedding (also in the file) is the shared tensor
                    t = targets.get(ours)
                    if t is None:
                        unexpected.append(key)
                        continue
                    shape, want = reader.shape(fh, key), tuple(t.shape)
                    transpose = False
                    if shape != want and t.dim() == 3 and ours.endswith((".gate_up_proj", ".down_proj")) \
                            and shape == (want[0], want[2], want[1]):
                        transpose = True  # fused experts stored as [E, in, out]
                    else:
                        check_shape(key, file, shape, want, ours)
                    src = reader.tensor(fh, file, key)
                    with torch.no_grad():
                        t.copy_(src.transpose(1, 2) if transpose else src)
                    filled[id(t)] = {"all"}
                    continue
                # one expert's slice of a stacked tensor
                _, ours, j, proj = kind
                t = targets.get(ours)
                if t is None or t.dim() != 3 or j >= t.shape[0]:
                    unexpected.append(key)
                    continue
                view = _expert_slot(t, j, proj)
                check_shape(key, file, reader.shape(fh, key), tuple(view.shape), f"{ours}[{j}] ({proj}_proj)")
                src = reader.tensor(fh, file, key)
                with torch.no_grad():
                    view.copy_(src)
                filled.setdefault(id(t), set()).add((j, proj))

    missing, missing_tensors = _find_missing(targets, filled, n_layers)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
        msg = f"checkpoint {root} does not match its config: " + "; ".join(parts)
        if strict:
            raise CheckpointError(msg + " (pass strict=False to load anyway)")
        warnings.warn(msg + " — missing tensors get a fresh init, unexpected ones are ignored", stacklevel=2)
        for name, t in missing_tensors:
            _init_missing(name, t, cfg.initializer_range)

    if getattr(model, "config", None) is not None:  # the weights are dense now
        model.config.extra.pop("quantization_config", None)
    model.eval()
    return model


# =============================================================================== save
def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # DDP / FSDP-style wrappers
    return model


def _hub_entries(model: nn.Module, cfg: ModelConfig, dtype: torch.dtype | None,
                 state: dict[str, torch.Tensor] | None = None) -> list[tuple[str, int, Callable[[], torch.Tensor]]]:
    """(hub key, byte size, producer) for every tensor the hub checkpoint holds, in a stable order."""
    n_layers, n_mtp = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    state = model.state_dict() if state is None else state
    for name, t in state.items():
        if t.is_meta:
            raise CheckpointError(f"cannot save: tensor {name!r} is on the meta device (not materialised)")

    def out_dtype(name: str, t: torch.Tensor) -> torch.dtype:
        if name.endswith(_ROUTER_BIAS):
            return torch.float32  # the routing bias stays float32 whatever the weights' dtype
        return t.dtype if dtype is None or not t.is_floating_point() else dtype

    def producer(t: torch.Tensor, to: torch.dtype) -> Callable[[], torch.Tensor]:
        # clone: contiguous, and never sharing storage with another saved tensor
        return lambda: t.detach().to(device="cpu", dtype=to).clone(memory_format=torch.contiguous_format)

    def nbytes(shape, to: torch.dtype) -> int:
        return math.prod(shape) * torch.empty((), dtype=to).element_size()

    entries: list[tuple[str, int, Callable[[], torch.Tensor]]] = []
    tied = cfg.tie_word_embeddings
    for name, t in state.items():
        if name == "lm_head.weight" and tied:
            continue
        to = out_dtype(name, t)
        hub = _our_key_to_hub(name, n_layers)
        if t.dim() == 3 and hub.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            if hub.endswith(".down_proj"):
                for j in range(t.shape[0]):
                    entries.append((_hub_expert_key(hub, j, "down"), nbytes(t.shape[1:], to), producer(t[j], to)))
            else:
                inter = t.shape[1] // 2
                for j in range(t.shape[0]):
                    for proj, part in (("gate", t[j, :inter]), ("up", t[j, inter:])):
                        entries.append((_hub_expert_key(hub, j, proj), nbytes(part.shape, to), producer(part, to)))
            continue
        entries.append((hub, nbytes(t.shape, to), producer(t, to)))

    emb = state.get("model.embed_tokens.weight")
    head = state.get("lm_head.weight", emb)
    for k in range(n_mtp):  # hub checkpoints carry copies of the shared embedding and head
        layer = n_layers + k
        if emb is not None:
            to = out_dtype("model.embed_tokens.weight", emb)
            entries.append((f"model.layers.{layer}.embed_tokens.weight", nbytes(emb.shape, to), producer(emb, to)))
        if head is not None:
            to = out_dtype("lm_head.weight", head)
            entries.append((f"model.layers.{layer}.shared_head.head.weight", nbytes(head.shape, to),
                            producer(head, to)))

    counts = Counter(e[0] for e in entries)
    if len(counts) != len(entries):
        dup = sorted(n for n, c in counts.items() if c > 1)
        raise CheckpointError(f"cannot save: several tensors map to the same hub key: {_listing(dup)}")

    def order(key: str) -> tuple:
        m = _LAYER_RE.match(key)
        if key.startswith("model.embed_tokens"):
            return (0, 0, key)
        if m:
            return (1, int(m.group(1)), _natural(m.group(2)))
        return (2, 0, key)

    entries.sort(key=lambda e: order(e[0]))
    return entries


def _natural(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


def _plan_shards(entries, max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[1] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[1]
    return shards


_CHECKPOINT_FILES = ("config.json", "generation_config.json", INDEX_FILE)


def _is_checkpoint_file(name: str) -> bool:
    return (name in _CHECKPOINT_FILES or name.endswith(".safetensors")
            or name.lower().endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json"))


def save(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB",
         dtype: str | torch.dtype | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` as a Hugging Face DeepSeek-V3 checkpoint directory that ``transformers`` loads.

    Per-expert tensors, MTP modules at ``model.layers.{num_hidden_layers + k}`` (with copies of the
    embedding and head, as hub checkpoints have), ``config.json``, ``generation_config.json`` and
    either one ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_size``. ``dtype`` casts
    floating tensors (the router bias stays float32). The directory is written next to ``path`` and
    renamed into place; other files already at ``path`` (tokenizer, ...) are kept. Returns the path.

    ``state_dict`` replaces ``model.state_dict()`` as the source of the tensors (same keys): the
    full state of a model whose parameters are sharded over several processes (FSDP2).
    """
    model = _unwrap(model)
    cfg: ModelConfig = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise CheckpointError(f"cannot save {type(model).__name__}: it has no nanoseek ModelConfig at .config")
    out_dtype = _dtype_from(dtype, "dtype") if dtype is not None else None
    max_bytes = parse_size(max_shard_size)
    entries = _hub_entries(model, cfg, out_dtype, state_dict)
    if out_dtype is None:
        emb = (state_dict if state_dict is not None else dict(model.named_parameters())).get("model.embed_tokens.weight")
        out_dtype = emb.dtype if emb is not None else next(model.parameters()).dtype

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it exists and is not a directory")
    if target.is_dir():
        names = [p.name for p in target.iterdir()]
        if names and not any(_is_checkpoint_file(n) for n in names):
            raise CheckpointError(f"refusing to replace {target}: it is a non-empty directory that holds no "
                                  f"checkpoint (no config.json or *.safetensors)")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        shards = _plan_shards(entries, max_bytes)
        n = len(shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            fname = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            tensors = {key: make() for key, _, make in shard}
            # module attribute lookup (not a from-import) so that tests can patch it
            safetensors.torch.save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            fsync_path(tmp / fname)
            for key, size, _ in shard:
                weight_map[key] = fname
                total += size
            del tensors
        if n > 1:
            write_json_durable(tmp / INDEX_FILE, {"metadata": {"total_size": total},
                                           "weight_map": dict(sorted(weight_map.items()))})
        cfg.save(tmp / "config.json", dtype=_dtype_name(out_dtype))
        fsync_path(tmp / "config.json")
        gen = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        write_json_durable(tmp / "generation_config.json", gen)
        if target.is_dir():  # keep the side files (tokenizer, README, ...) of the old checkpoint
            for item in target.iterdir():
                if _is_checkpoint_file(item.name) or (tmp / item.name).exists():
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.copytree(item, tmp / item.name, symlinks=True)
                else:
                    shutil.copy2(item, tmp / item.name, follow_symlinks=False)
        fsync_path(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted last."""
    parent = target.parent
    old = None
    if target.exists():
        old = parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)  # put the previous checkpoint back
        raise
    fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_with_tokenizer(path: str | os.PathLike, device: str | torch.device | None = "auto",
                        dtype: str | torch.dtype | None = "auto") -> tuple[nn.Module, Any]:
    """A checkpoint directory's model (eval mode, on ``device`` as :func:`~nanoseek.device.pick_device`
    resolves it) and its tokenizer: ``(model, tokenizer)``. ``dtype`` "auto" keeps the checkpoint's."""
    where = device if isinstance(device, torch.device) else pick_device(device)
    model = load(path, device=where, dtype=None if dtype == "auto" else dtype)
    return model, load_tokenizer(path)
