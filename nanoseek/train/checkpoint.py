"""Atomic, pickle-free, verified training checkpoints.

Layout of one checkpoint (``RUN_DIR/checkpoints/step_{step:08d}/``)::

    model/                     nanoseek.save(): config.json, model.safetensors (training dtype, so
                               float32 master weights stay float32), generation_config.json, plus
                               the tokenizer files — a self-contained HF checkpoint directory
    optimizer.safetensors      every tensor of optimizer.state_dict()["state"] as "{param}.{key}"
    optimizer.json             param_groups and the non-tensor state entries
    rng.safetensors            torch CPU (and CUDA) generator states
    rng.json                   python ``random`` and numpy global states
    trainer_state.json         step, tokens, sampler / guard / cost states, train config, ...
    manifest.json              every file above with its size and SHA-256 (written last)

Everything is written into ``step_X.tmp-<pid>``; files and the directory are fsynced, the directory
is renamed to ``step_X`` and the parent is fsynced. A ``step_X`` directory therefore is always
complete when written; ``*.tmp-*`` directories are leftovers of a crash and are deleted by
:func:`latest_checkpoint`. Nothing here is unpickled: tensors come from safetensors, the rest from
JSON.

Only finite state is written: :func:`save_checkpoint` refuses weights, buffers or optimizer
moments holding a NaN or an infinity (a :class:`CheckpointError` naming how many values in which
tensors), and :func:`publish_final` refuses such weights too, so neither a resume nor a rollback
nor ``final/`` can pick them up.

Integrity. What happens to the files later (a bad disk, a copy cut short, a stray write) is caught
by the manifest: :func:`verify_checkpoint` compares every file's size and SHA-256 with it, the
readers (:func:`load_model`, :func:`restore_optimizer`, :func:`restore_rng`,
:func:`read_trainer_state`) check the files they read, and every damaged, truncated or missing file
is one :class:`CheckpointError` that names it. :func:`latest_checkpoint` returns the newest
checkpoint that verifies, saying which newer ones it skipped and why, and raises when checkpoints
exist but none verifies (a run is never silently restarted from step 0). SHA-256 costs about
1.5-2 ms per MB on one CPU core (0.4 s for the 234 MB checkpoint of the ``small`` preset, measured
on a shared 2-core machine), paid once when a checkpoint is written and once when it is resumed or
rolled back to; ``sha256sum`` checks a file by hand. Checkpoints written before manifests existed
still load (nothing to compare; their weights are checked to be finite).

A multi-process (FSDP2) run writes the same files: rank 0 writes the full state gathered from all
ranks, and loading re-shards it for the current world size (:mod:`nanoseek.train.distributed`), so
a checkpoint resumes under any number of processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from .. import hf
from ..errors import CheckpointError
from ..fsutil import fsync_path, sha256_file, write_json_durable
from . import distributed as dist
from .faults import maybe_fault

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: the key save_checkpoint adds to trainer_state.json: a checkpoint that has it must have its manifest
MANIFEST_KEY = "checkpoint_manifest"
#: files every checkpoint holds (its manifest must list them)
REQUIRED_FILES = (TRAINER_STATE, "optimizer.safetensors", "optimizer.json", "rng.safetensors", "rng.json",
                  f"{MODEL_DIR}/config.json")
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_RE = re.compile(r"^step_\d{8}\.(tmp|old)-")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")



def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike, durable: bool = False) -> None:
    """Copy the tokenizer files (:data:`TOKENIZER_FILES`, those present) of directory ``src`` into
    ``dst`` (created); ``durable`` fsyncs each copy."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
            if durable:
                fsync_path(dst / name)


def install_tokenizer(src: str | os.PathLike, tok_dir: str | os.PathLike) -> None:
    """Make ``tok_dir`` a copy of the tokenizer in ``src``, swapped in whole (a crash leaves the old
    directory or the new one, never a mix)."""
    tok_dir = Path(tok_dir)
    tmp = tok_dir.with_name(f"{tok_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy_tokenizer(src, tmp)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    m = _STEP_RE.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected step_XXXXXXXX)")
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``step_XXXXXXXX`` directory of ``run_dir``, oldest first, intact or not (``*.tmp-*``
    leftovers are not listed): a damaged checkpoint still shows that the run got that far.
    :func:`latest_checkpoint` picks the newest one that verifies."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def latest_checkpoint(run_dir: str | os.PathLike, cleanup: bool = True, *, verify: bool = True,
                      log: Callable[[str], Any] | None = None) -> Path | None:
    """The newest checkpoint that verifies (:func:`verify_checkpoint`), or ``None`` when there is none
    at all. Each newer checkpoint that does not verify is skipped with a line to ``log`` (default:
    stderr) naming it and the reason; when checkpoints exist but none verifies, raises
    :class:`CheckpointError` listing why. ``verify=False``: the newest directory, unchecked. With
    ``cleanup``, deletes ``*.tmp-*`` leftovers first."""
    root = Path(run_dir) / CHECKPOINTS
    if cleanup and root.is_dir():
        for p in root.iterdir():
            if _TMP_RE.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
    found = list_checkpoints(run_dir)
    if not verify or not found:
        return found[-1] if found else None
    log = log or _stderr
    skipped: list[str] = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc}")
            log(f"checkpoint: skipping {path.name}, it does not verify: {exc}")
            continue
        if skipped:
            log(f"checkpoint: using {path.name}, the newest checkpoint that verifies "
                f"({len(skipped)} newer one(s) skipped)")
        return path
    raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(skipped)}")


# ----------------------------------------------------------------------------- non-finite values
def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values on this process (a DTensor's shard), in a dtype torch can sum and test."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.float() if local.element_size() == 1 else local  # float8: no isfinite/sum everywhere


def describe_nonfinite(named: Iterable[tuple[str, Any]],
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[int, str | None]:
    """``(n, text)``: how many values of the floating tensors in ``named`` are NaN or infinite, and a
    sentence naming the worst tensors (``None`` when all are finite). ``reduce`` sums over processes
    (e.g. :func:`nanoseek.train.distributed.all_reduce_sum` for sharded tensors; every rank must pass
    the same names): the call is then collective.

    One pass: each tensor's float32 sum is non-finite whenever one of its values is (a NaN or an
    infinity never leaves an IEEE sum), about 0.2 ms per MB on one CPU core; only the tensors whose
    sum is not finite (or overflowed) are counted value by value."""
    rows = [(name, t) for name, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not rows:
        return 0, None
    device = _local(rows[0][1]).device
    sums = torch.stack([_local(t).sum(dtype=torch.float32).to(device) for _, t in rows])
    if reduce is not None:
        sums = reduce(sums)
    suspects = [i for i, ok in enumerate(torch.isfinite(sums).tolist()) if not ok]
    if not suspects:
        return 0, None
    counts = torch.stack([torch.isfinite(_local(rows[i][1])).logical_not_().sum().to(device) for i in suspects])
    if reduce is not None:
        counts = reduce(counts)
    bad = [(rows[i][0], n, rows[i][1].numel()) for i, n in zip(suspects, counts.tolist()) if n]
    if not bad:  # a finite sum that overflowed float32, not a NaN
        return 0, None
    total = sum(n for _, n, _ in bad)
    bad.sort(key=lambda row: -row[1])
    shown = ", ".join(f"{name} ({n:,} of {size:,})" for name, n, size in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return total, (f"{total:,} of {sum(t.numel() for _, t in rows):,} values are NaN or infinite, in {len(bad)} "
                   f"tensor(s): {shown}{more}")


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state index (as in ``optimizer.state_dict()``) -> parameter name, where known."""
    target = getattr(model, "_orig_mod", model)
    by_id = {id(p): n for n, p in target.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: by_id[id(p)] for i, p in enumerate(params) if id(p) in by_id}


# ----------------------------------------------------------------------------- writing
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def _optimizer_files(optimizer: torch.optim.Optimizer, sd: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                other.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _rng_states(device: torch.device | None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(state), gauss],
                     "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _write_manifest(directory: Path, step: int) -> None:
    """``manifest.json``: the size and SHA-256 of every file under ``directory`` (fsynced)."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = file.relative_to(directory).as_posix()
        if rel != MANIFEST:
            files[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    write_json_durable(directory / MANIFEST, {"format": MANIFEST_FORMAT, "step": step, "hash": "sha256",
                                              "finite": True, "files": files})


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, tokenizer_dir: str | os.PathLike | None, keep_last: int = 3,
                    device: torch.device | None = None, model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically, then keep only the last ``keep_last``.

    ``model_state`` / ``optimizer_state``, when given, are written instead of ``model.state_dict()``
    / ``optimizer.state_dict()`` (same layout): the full state of a sharded multi-process run, see
    :func:`nanoseek.train.distributed.full_state_dicts`.

    Refuses (:class:`CheckpointError`, nothing written, nothing pruned) when a weight, buffer or
    optimizer moment holds a NaN or an infinity, naming how many values in which tensors. Any
    ``OSError`` (ENOSPC, EIO, ...) removes the partial directory and raises :class:`CheckpointError`
    naming the path, the error and the last good checkpoint, which is intact.
    """
    final = checkpoint_dir(run_dir, step)
    previous = [p for p in list_checkpoints(run_dir) if p != final]
    good = (f"the last good checkpoint {previous[-1]} is intact" if previous
            else "no earlier checkpoint exists")
    tensors, meta = _optimizer_files(optimizer, optimizer_state)
    state = model_state if model_state is not None else model.state_dict()
    index_names = _optimizer_names(model, optimizer)

    def moment_name(key: str) -> str:
        index, entry = key.split(".", 1)
        return f"optimizer {entry} of {index_names.get(int(index), f'parameter {index}')}"

    _, bad = describe_nonfinite([*state.items(), *((moment_name(k), v) for k, v in tensors.items())])
    if bad is not None:
        raise CheckpointError(f"refusing to write checkpoint {final}: {bad}; {good}")

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        hf.save(model, tmp / MODEL_DIR, max_shard_size="10GB", state_dict=model_state)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / MODEL_DIR, durable=True)
        fsync_path(tmp / MODEL_DIR)
        _save_tensors(tmp / "optimizer.safetensors", tensors)
        write_json_durable(tmp / "optimizer.json", meta)
        maybe_fault("kill_in_checkpoint", step)  # TEST-ONLY: SIGKILL with half a checkpoint written
        rng_tensors, rng_meta = _rng_states(device)
        _save_tensors(tmp / "rng.safetensors", rng_tensors)
        write_json_durable(tmp / "rng.json", rng_meta)
        write_json_durable(tmp / TRAINER_STATE, dict(trainer_state, step=step, **{MANIFEST_KEY: MANIFEST}))
        _write_manifest(tmp, step)
        fsync_path(tmp)
        old = None
        if final.exists():  # only when a step is re-checkpointed; keep it until the new one is in place
            old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {reason} ({exc}); {good}") from exc
    prune_checkpoints(run_dir, keep_last, keep=final)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the newest, never ``keep``).

    :func:`save_checkpoint` prunes only after writing a checkpoint, which is finite and complete,
    and passes it as ``keep``: pruning never leaves a run without a good checkpoint."""
    found = list_checkpoints(run_dir)
    for p in found[: max(0, len(found) - max(1, keep_last))]:
        if keep is not None and p == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- verifying
def _damaged(path: Path, rel: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path.name} is damaged: {path / rel} {why}")


def _read_json(file: Path, path: Path) -> Any:
    """JSON of checkpoint file ``file``; a missing or unreadable file is a CheckpointError naming it."""
    rel = file.relative_to(path).as_posix()
    if not file.is_file():
        raise _damaged(path, rel, "is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, rel, f"cannot be read ({exc})") from None


def read_manifest(path: str | os.PathLike) -> dict | None:
    """Checkpoint ``path``'s manifest (``{"files": {relpath: {"bytes", "sha256"}}, ...}``), or ``None``
    for a checkpoint written before manifests existed. A missing manifest of a checkpoint whose
    trainer_state.json says it has one, a missing trainer_state.json, or an unreadable manifest
    raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / MANIFEST).is_file():
        if not (path / TRAINER_STATE).is_file():
            raise _damaged(path, TRAINER_STATE, f"is missing (and so is {MANIFEST}): the checkpoint was deleted "
                                                "or damaged after it was written")
        state = _read_json(path / TRAINER_STATE, path)
        if isinstance(state, dict) and MANIFEST_KEY in state:
            raise _damaged(path, MANIFEST, "is missing: the checkpoint cannot be verified")
        return None
    manifest = _read_json(path / MANIFEST, path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict)
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                       for e in files.values())):
        raise _damaged(path, MANIFEST, "is malformed (no file list with bytes and sha256)")
    outside = [rel for rel in files if rel.startswith("/") or "\\" in rel or ".." in rel.split("/")]
    if outside:
        raise _damaged(path, MANIFEST, f"is malformed (it lists {outside[0]!r}, outside the checkpoint)")
    return manifest


def _legacy_model_check(path: Path) -> None:
    """A checkpoint without manifest: its weights must at least load and be finite."""
    for file in sorted((path / MODEL_DIR).glob("*.safetensors")):
        rel = file.relative_to(path).as_posix()
        try:
            tensors = safetensors.torch.load_file(str(file))
        except (OSError, safetensors.SafetensorError) as exc:
            raise _damaged(path, rel, f"cannot be read ({exc})") from None
        _, bad = describe_nonfinite(tensors.items())
        if bad is not None:
            raise CheckpointError(f"checkpoint {path.name} holds non-finite weights: {bad} ({file})")


def verify_checkpoint(path: str | os.PathLike, only: str | Sequence[str] | None = None) -> bool:
    """Check checkpoint ``path`` against its manifest: each file is there, with the size and SHA-256
    recorded when the checkpoint was written. ``only``: just these files, or the files under these
    folders (``"model/"``); default all, and the manifest must then list :data:`REQUIRED_FILES`.

    Returns True when verified; False for a checkpoint written before manifests existed (nothing to
    compare; a full check then makes sure its weights load and are finite). Raises
    :class:`CheckpointError` naming the first damaged, truncated or missing file.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        if only is None:
            for rel in REQUIRED_FILES:
                if not (path / rel).is_file():
                    raise _damaged(path, rel, "is missing")
            _legacy_model_check(path)
        return False
    files = manifest["files"]
    if only is None:
        for rel in REQUIRED_FILES:
            if rel not in files:
                raise _damaged(path, MANIFEST, f"does not list {rel}")
        selected = sorted(files)
    else:
        wanted = [only] if isinstance(only, str) else list(only)
        selected = sorted(rel for rel in files if any(rel == w or (w.endswith("/") and rel.startswith(w))
                                                      for w in wanted))
        selected += [w for w in wanted if not w.endswith("/") and w not in files]
    for rel in selected:
        file = path / rel
        if rel not in files:
            raise _damaged(path, MANIFEST, f"does not list {rel}")
        if not file.is_file():
            raise _damaged(path, rel, "is missing")
        size, want = file.stat().st_size, files[rel]["bytes"]
        if size != want:
            what = "truncated" if size < want else "longer than written"
            raise _damaged(path, rel, f"is {what}: {size:,} bytes, {want:,} when written")
        try:
            digest = sha256_file(file)
        except OSError as exc:
            raise _damaged(path, rel, f"cannot be read ({exc})") from None
        if digest != files[rel]["sha256"]:
            raise _damaged(path, rel, f"does not match its SHA-256 in {MANIFEST}: its content changed on disk "
                                      f"after it was written")
    return True


# ----------------------------------------------------------------------------- reading
def read_trainer_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of checkpoint ``path``, checked against the manifest."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise _damaged(path, TRAINER_STATE, "is missing: the checkpoint was damaged after it was written")
    verify_checkpoint(path, only=[TRAINER_STATE])
    state = _read_json(path / TRAINER_STATE, path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(path, TRAINER_STATE, "holds no trainer state (an object with an integer 'step')")
    return state


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", verify: bool = True) -> nn.Module:
    """The checkpoint's model in its stored dtype (float32 master weights), in train mode.

    ``verify``: check the ``model/`` files against the manifest first (pass False only right after
    :func:`verify_checkpoint` or :func:`latest_checkpoint` checked the whole checkpoint). Weights
    that are NaN or infinite are refused either way."""
    path = Path(path)
    if verify:
        verify_checkpoint(path, only=f"{MODEL_DIR}/")
    try:
        model = hf.load(path / MODEL_DIR, device="cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {path.name}: {exc}") from None
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path.name}: cannot load {path / MODEL_DIR}: {exc}") from None
    _, bad = describe_nonfinite(model.state_dict().items())
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights: {bad}")
    return model.to(device).train()


def restore_model(model: nn.Module, path: str | os.PathLike, verify: bool = True) -> None:
    """Copy the checkpoint's weights and buffers into ``model`` in place (optimizer refs stay valid).

    For a model sharded over several processes this is collective: rank 0 reads the files, every
    rank receives its shards (and the full buffers). ``verify``: as for :func:`load_model`.
    """
    if dist.is_sharded(model):
        dist.load_full_model_state(model, load_model(path, "cpu", verify).state_dict() if dist.is_main() else None)
        return
    loaded = load_model(path, "cpu", verify)
    target = getattr(model, "_orig_mod", model)
    missing, unexpected = target.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def restore_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike, model: nn.Module | None = None,
                      verify: bool = True) -> None:
    """Load the checkpoint's optimizer state. Pass ``model`` when it is sharded over several
    processes: the load is collective then (rank 0 reads the files, every rank gets its shards).
    ``verify``: check the optimizer files against the manifest first (as for :func:`load_model`)."""
    path = Path(path)
    if model is not None and dist.is_sharded(model):
        dist.load_full_optimizer_state(model, optimizer, _read_optimizer(path, verify) if dist.is_main() else None)
        return
    sd = _read_optimizer(path, verify)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"the optimizer state in {path / 'optimizer.safetensors'} and "
                              f"{path / 'optimizer.json'} does not fit this optimizer: {exc}") from None


def _load_tensors(path: Path, rel: str) -> dict[str, torch.Tensor]:
    file = path / rel
    if not file.is_file():
        raise _damaged(path, rel, "is missing")
    try:
        return safetensors.torch.load_file(str(file))
    except (OSError, safetensors.SafetensorError) as exc:
        raise _damaged(path, rel, f"cannot be read ({exc})") from None


def _read_optimizer(path: Path, verify: bool = True) -> dict:
    """``optimizer.state_dict()`` as :func:`_optimizer_files` wrote it."""
    if verify:
        verify_checkpoint(path, only=["optimizer.json", "optimizer.safetensors"])
    meta = _read_json(path / "optimizer.json", path)
    tensors = _load_tensors(path, "optimizer.safetensors")
    try:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
    except ValueError:
        raise _damaged(path, "optimizer.safetensors", f"holds a tensor named {key!r} (expected 'INDEX.NAME')") from None
    try:
        for index, entries in meta["state"].items():
            state.setdefault(int(index), {}).update(entries)
        groups = meta["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(path, "optimizer.json", f"is malformed ({type(exc).__name__}: {exc})") from None
    state = dict(sorted(state.items()))  # parameter order, as the optimizer created it
    return {"state": state, "param_groups": groups}


def restore_rng(path: str | os.PathLike, device: torch.device | None = None, verify: bool = True) -> None:
    """Set the torch (CPU, CUDA), python and numpy generators from the checkpoint. ``verify``: check
    the RNG files against the manifest first (as for :func:`load_model`)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path, only=["rng.json", "rng.safetensors"])
    tensors = _load_tensors(path, "rng.safetensors")
    meta = _read_json(path / "rng.json", path)
    try:
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise _damaged(path, "rng.safetensors", f"holds no usable torch_cpu state ({type(exc).__name__}: {exc})") from None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                             key=lambda k: int(k.split(".")[1]))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    try:
        version, state, gauss = meta["python"]
        random.setstate((version, tuple(state), gauss))
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, "rng.json", f"is malformed ({type(exc).__name__}: {exc})") from None


FINAL_DIR = "final"


def publish_final(run_dir: str | os.PathLike, ckpt: str | os.PathLike) -> Path:
    """Copy checkpoint ``ckpt``'s ``model/`` (config, weights, tokenizer) to ``RUN_DIR/final``: the run's
    model as one self-contained directory that ``nanoseek.load``, ``eval``, ``serve`` and the next stage
    take. Replaced atomically (copy to ``final.tmp-<pid>``, rename), so a crash leaves the old one.

    The ``model/`` files are verified against the checkpoint's manifest first, and weights that are
    NaN or infinite are refused: a damaged or non-finite model is never published
    (:class:`CheckpointError` naming the file or the tensors; the old ``final/`` stays)."""
    run_dir = Path(run_dir)
    ckpt = Path(ckpt)
    if not verify_checkpoint(ckpt, only=f"{MODEL_DIR}/"):
        _legacy_model_check(ckpt)  # written before manifests: at least finite
    final = run_dir / FINAL_DIR
    tmp = run_dir / f"{FINAL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ckpt / MODEL_DIR, tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        old = None
        if final.exists():
            old = run_dir / f"{FINAL_DIR}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(run_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {final} from {ckpt}: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
