"""Multi-process training: ranks, collectives, FSDP2 sharding and full (portable) checkpoint state.

``torchrun --nproc_per_node N -m nanoseek pretrain ...`` starts N processes; each calls
:func:`init_distributed` (which reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``) and :func:`parallelize`, which shards the model with FSDP2
(``fully_shard``): every decoder layer and every MTP block is one unit, the root (embedding, output
head, final norm, MTP projections and norms) another. Parameters, gradients and AdamW moments are
sharded over all ranks along dim 0; the router's ``e_score_correction_bias`` is a buffer, so every
rank holds a full copy, and the trainer keeps the copies identical by updating them from the
all-reduced (summed) expert load. Data parallelism comes from the sampler (each rank its slice of
the global batch); the gradient reduce-scatter averages over ranks, so N ranks with batch B train
exactly like one process with batch N·B, up to floating-point summation order.

Checkpoints hold FULL state, gathered to rank 0 (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``) and written in the
single-process format; on load, rank 0 reads the files and ``set_*_state_dict`` broadcasts and
re-shards them. A checkpoint therefore resumes under any world size, and ``nanoseek.load`` reads
its model unchanged.

In a single process (no torchrun, or ``--nproc_per_node 1``) every helper is a no-op or the plain
single-device operation, so the single-process trainer is unchanged bit for bit.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..device import autocast_dtype
from ..errors import NanoseekError

# Process group backend per device type; the CPU half serves CPU tensors (e.g. an all-reduce of a
# Python float) next to the accelerator's collective library.
_BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "xpu": "cpu:gloo,xpu:xccl", "npu": "cpu:gloo,npu:hccl"}
_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("NANOSEEK_DIST_TIMEOUT_MIN", "30")))
_STARTED_HERE = False  # whether init_distributed created the process group (then shutdown() ends it)


# ----------------------------------------------------------------------------- ranks
def _on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return torch.distributed.get_rank() if _on() else 0


def world_size() -> int:
    """Number of training processes (1 when not distributed)."""
    return torch.distributed.get_world_size() if _on() else 1


def is_main() -> bool:
    """Whether this process writes checkpoints, metrics and logs."""
    return rank() == 0


def launched_main() -> bool:
    """Like :func:`is_main`, but also right before :func:`init_distributed` (from torchrun's ``RANK``)."""
    return is_main() if _on() else int(os.environ.get("RANK", "0") or 0) == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise NanoseekError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


# ----------------------------------------------------------------------------- setup
def local_device(device: torch.device) -> torch.device:
    """``device`` for this rank: accelerator index ``LOCAL_RANK`` when distributed and none was given."""
    device = torch.device(device)
    if device.type == "cpu" or device.index is not None or _env_world_size() <= 1:
        return device
    return torch.device(device.type, local_rank())


def init_distributed(device: torch.device | str = "cpu") -> bool:
    """Join torchrun's process group; returns whether this process trains with others.

    A no-op returning ``False`` in a single process (``WORLD_SIZE`` unset or 1). ``device`` is the
    device the run trains on (``pick_device(cfg.device)``): NCCL on CUDA (ROCm included), XCCL on
    Intel XPU, HCCL on Ascend NPU, each next to gloo for CPU tensors; gloo alone on the CPU. On an
    accelerator this rank's device (index ``LOCAL_RANK``) becomes the current one, since the
    collective library and FSDP2's streams work on the current device.
    """
    global _STARTED_HERE
    if _on():
        return world_size() > 1
    if _env_world_size() <= 1:
        return False
    if not torch.distributed.is_available():
        raise NanoseekError("this torch build has no torch.distributed: multi-process training is not available")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise NanoseekError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                            f"start multi-process runs with torchrun")
    device = local_device(torch.device(device))
    kwargs = {}
    if device.type == "cpu":
        backend = "gloo"
    elif device.type in _BACKENDS:
        backend = _BACKENDS[device.type]
        kwargs["device_id"] = device
        _set_current_device(device)
    else:
        raise NanoseekError(f"multi-process training is not supported on {device.type} devices "
                            f"(use cuda, xpu, npu or cpu)")
    torch.distributed.init_process_group(backend=backend, timeout=_TIMEOUT, **kwargs)
    _STARTED_HERE = True
    atexit.register(shutdown)
    return True


def _set_current_device(device: torch.device) -> None:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "set_device_index"):
        accel.set_device_index(device)
    else:  # torch < 2.6: the backend module of the device type
        getattr(torch, device.type).set_device(device)


def shutdown() -> None:
    """Leave the process group that :func:`init_distributed` created (no-op otherwise)."""
    global _STARTED_HERE
    if _STARTED_HERE and _on():
        torch.distributed.destroy_process_group()
    _STARTED_HERE = False


# ----------------------------------------------------------------------------- collectives
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself in a single process; no copy, no sync)."""
    if world_size() == 1:
        return x
    y = x.detach().clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y / world_size()


def all_reduce_sum(x: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of ``x`` over ranks (``x`` itself in a single process, and for ``None``)."""
    if x is None or world_size() == 1:
        return x
    y = x.detach().clone()
    torch.distributed.all_reduce(y, op=torch.distributed.ReduceOp.SUM)
    return y


def gather_json(obj: Any) -> list[Any]:
    """``obj`` (JSON-serialisable) of every rank, in rank order (``[obj]`` in a single process).
    Sent as JSON bytes, never pickled."""
    if world_size() == 1:
        return [obj]
    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([data.numel()]))
    width = int(max(int(n) for n in sizes))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: data.numel()] = data
    chunks = [torch.zeros(width, dtype=torch.uint8) for _ in range(world_size())]
    torch.distributed.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(n)].tolist()).decode("utf-8")) for c, n in zip(chunks, sizes)]


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (e.g. writes the tokenizer and the shards), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# ----------------------------------------------------------------------------- FSDP2
def _fsdp():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            raise NanoseekError(f"multi-process training needs FSDP2 (torch >= 2.4); this is torch "
                                f"{torch.__version__}") from None
    return fully_shard, MixedPrecisionPolicy


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    if not _on():
        return False
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in model.parameters())


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: each decoder layer and each MTP block.

    An MTP module as a whole is not a unit: the model calls its ``combine`` and ``norm`` directly,
    not its ``forward`` (on which FSDP2 hooks), so those parts belong to the root unit.
    """
    units = list(model.model.layers)
    units += [module.block for module in getattr(model, "mtp", [])]
    return units


def _check_same_model(model: nn.Module) -> None:
    """Raise :class:`NanoseekError` on every rank unless all ranks built the same model: the same
    parameter and buffer names, shapes and dtypes, in the same order. Collective.

    The broadcasts and FSDP2 collectives that follow move tensors of these sizes; when they differ
    between ranks (ranks started with different configs, or importing different versions of the
    code), gloo does not raise but aborts the process from its I/O thread ("Received data size
    doesn't match expected size", SIGABRT), and NCCL hangs. The check itself exchanges two integers
    only, whatever the model, so it cannot mismatch.
    """
    layout = "\n".join(f"{name} {tuple(t.shape)} {t.dtype}"
                       for named in (model.named_parameters(), model.named_buffers()) for name, t in named)
    digest = int.from_bytes(hashlib.sha256(layout.encode()).digest()[:7], "big")  # < 2**56: exact in int64
    extremes = torch.tensor([digest, -digest], dtype=torch.int64)  # CPU: gloo serves it on every backend
    torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)  # [max, -min] over ranks
    if extremes[0].item() != -extremes[1].item():
        raise NanoseekError(f"the ranks built different models (rank {rank()} has {sum(1 for _ in model.parameters())} "
                            f"parameters, {sum(1 for _ in model.buffers())} buffers, layout digest {digest:014x}): "
                            f"every rank must run the same code with the same config")


@torch.no_grad()
def _broadcast_from_rank0(model: nn.Module) -> None:
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            torch.distributed.broadcast(t.data, src=0)


def parallelize(model: nn.Module, device: torch.device, precision: str = "auto") -> nn.Module:
    """Move ``model`` to ``device`` and, when distributed, shard it with FSDP2; returns the model.

    Every rank builds the model from the same seed; rank 0's weights and buffers are broadcast
    before sharding anyway, so all ranks start from identical weights whatever happened before.
    On accelerators the units compute in ``precision``'s dtype (:func:`~nanoseek.device.autocast_dtype`;
    bf16: parameters all-gathered in bf16) and reduce gradients in float32 into the float32 master
    shards; on the CPU parameters and collectives stay float32 (a trainer's CPU autocast, where
    chosen, still computes in bfloat16).
    """
    model = model.to(device)
    if world_size() == 1:
        return model
    fully_shard, MixedPrecisionPolicy = _fsdp()
    # torch.distributed's submodules load where they are used: some torch builds ship without them
    from torch.distributed.device_mesh import init_device_mesh

    _check_same_model(model)
    _broadcast_from_rank0(model)
    mesh = init_device_mesh(device.type, (world_size(),))
    kwargs: dict = {"mesh": mesh}
    amp = autocast_dtype(device, precision) if device.type != "cpu" else None
    if amp is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    for unit in fsdp_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    return model


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy the parameters and buffers of ``src`` (FSDP2-sharded or plain) into the plain, unsharded
    ``dst`` of the same architecture: every rank gets the full weights (collective when sharded;
    every rank must call it)."""
    DTensor = _dtensor_type()
    targets = dict(dst.named_parameters())
    targets.update(dst.named_buffers())
    for name, tensor in [*src.named_parameters(), *src.named_buffers()]:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        targets[name].copy_(full)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total 2-norm of ``max_norm``; returns the total norm before clipping.

    With FSDP2 the gradients are DTensor shards: the norm is reduced over all ranks (the GLOBAL
    norm, the same on every rank, equal to the norm of the unsharded gradient), then every shard
    is scaled by the same factor. In a single process this is ``torch.nn.utils.clip_grad_norm_``.
    """
    params = list(parameters)
    if not is_sharded_params(params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    DTensor = _dtensor_type()
    params = [p for p in params if p.grad is not None]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is None:  # torch < 2.6
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    norm = get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def is_sharded_params(params: list[torch.Tensor]) -> bool:
    if not _on():
        return False
    DTensor = _dtensor_type()
    return any(isinstance(p, DTensor) for p in params)


# ----------------------------------------------------------------------------- replicated state
@torch.no_grad()
def check_replicated_buffers(model: nn.Module) -> None:
    """Raise :class:`NanoseekError` on every rank if a persistent buffer (the router biases) differs
    between ranks. Collective; a no-op in a single process."""
    if world_size() == 1:
        return
    names = [name for name, _ in model.named_buffers()]
    persistent = set(model.state_dict().keys())
    bad = []
    for name, buf in model.named_buffers():
        if name not in persistent or not buf.is_floating_point():
            continue
        ref = buf.detach().clone()
        torch.distributed.broadcast(ref, src=0)
        if not torch.equal(ref, buf):
            bad.append(name)
    flag = torch.tensor([float(len(bad))], device=next(iter(model.buffers()), torch.empty(0)).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() > 0:
        mine = f"; on rank {rank()}: {', '.join(bad[:5])}" if bad else ""
        raise NanoseekError(f"replicated buffers differ between ranks{mine} (of {len(names)} buffers)")


# ----------------------------------------------------------------------------- full checkpoint state
def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers the parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise NanoseekError("the optimizer holds a parameter that is not one of the model's")
            order.append(names[id(p)])
    return order


def _state_dict_api():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    return (StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
            set_optimizer_state_dict)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """The unsharded model and optimizer state on rank 0's CPU, as ``model.state_dict()`` and
    ``optimizer.state_dict()`` of a single process would give them (parameters numbered in
    optimizer order), so the files on disk do not depend on the world size.

    Collective: every rank must call it. Returns ``(None, None)`` on other ranks and in a single
    process (there the caller saves ``model`` and ``optimizer`` directly). Checks first that the
    replicated buffers (router biases) agree on all ranks.
    """
    if not is_sharded(model):
        return None, None
    check_replicated_buffers(model)
    StateDictOptions, get_model_sd, get_optim_sd, _, _ = _state_dict_api()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_sd(model, options=options)
    # An optimizer that has not stepped yet has no state; get_optimizer_state_dict would create it
    # with a zero-gradient step (AdamW's step count 1), which changes the run: keep it empty.
    optim_sd = get_optim_sd(model, optimizer, options=options) if optimizer.state else {}
    if not is_main():
        return None, None
    by_name = optim_sd.get("state", {})
    state = {i: by_name[name] for i, name in enumerate(_param_names(model, optimizer)) if name in by_name}
    groups = optimizer.state_dict()["param_groups"]  # hyperparameters, params as optimizer indices
    return model_sd, {"state": state, "param_groups": groups}


def load_full_model_state(model: nn.Module, state_dict: dict | None) -> None:
    """Load a full state dict into the sharded ``model``: rank 0 passes it, the other ranks pass
    ``None`` and receive rank 0's tensors (broadcast, then sharded). Collective."""
    StateDictOptions, _, _, set_model_sd, _ = _state_dict_api()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_sd(model, state_dict if is_main() and state_dict is not None else {}, options=options)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict | None) -> None:
    """Load a full ``optimizer.state_dict()``-style dict (integer parameter ids, as checkpoints store
    it) into the optimizer of the sharded ``model``; rank 0 passes it, the others ``None``. Collective."""
    StateDictOptions, _, _, _, set_optim_sd = _state_dict_api()
    names = _param_names(model, optimizer)
    by_name: dict = {}
    if is_main() and state_dict is not None:
        try:
            by_name = {
                "state": {names[int(i)]: entries for i, entries in state_dict["state"].items()},
                "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]])
                                 for g in state_dict["param_groups"]],
            }
        except IndexError:
            raise NanoseekError("the checkpoint's optimizer state has more parameters than the model") from None
    # A checkpoint of an optimizer that never stepped (step 0) holds no state: then the state is
    # cleared, as load_state_dict does in one process (set_optimizer_state_dict would step once).
    empty = torch.tensor([1.0 if is_main() and not (by_name and by_name["state"]) else 0.0])
    torch.distributed.broadcast(empty, src=0)
    if empty.item() > 0:
        optimizer.state.clear()
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optim_sd(model, optimizer, optim_state_dict=by_name, options=options)
