"""The pretraining loop: data → tokenizer → shards → DeepSeek-V3 → AdamW, guarded, checkpointed, resumable.

Run directory (``--out``)::

    train_config.json   the TrainConfig that defines the run
    tokenizer/          the tokenizer (trained on the data, or a copy of --tokenizer)
    data/               token shards (unless --data named an existing shard directory)
    checkpoints/        step_XXXXXXXX/ (see nanoseek.train.checkpoint), the last keep_last kept
    final/              the last checkpoint's model + tokenizer, self-contained (written at the end)
    metrics.jsonl       one record per logged step (stage "pretrain")
    incidents.jsonl     what the training guard saw (nanoseek.train.guard)
    cost.json           device-hours and $ per stage (nanoseek.train.cost)
    report.md + *.png   the report card (nanoseek.report), written at the end
    tensorboard/        with --tensorboard

One step: ``grad_accum`` micro-batches, forward under the ``precision`` setting's autocast (``auto``:
bf16 where the chip computes in it natively, :func:`nanoseek.device.autocast_dtype`), ``loss = lm_loss + λ(step)·mtp_loss + α·balance_loss``, backward, gradient
clipping (its total norm is the guard's ``grad_norm``), then the guard decides: ``ok``/``warn`` →
AdamW step + auxiliary-loss-free bias update with γ(step); ``skip`` → drop the gradients;
``lr_down`` → scale the LR down (``guard.lr_scale``) and skip; ``rollback`` → reload the latest
checkpoint and skip the offending data window. A NaN/inf loss or gradient is never applied (the
guard refuses ``warn`` for it). When a checkpoint is due, the weights, buffers and AdamW moments are
checked first: non-finite values are never checkpointed (nor published as ``final/``); they are a
guard incident, answered with a rollback to the last good checkpoint. Checkpoints carry a manifest
of content hashes: resume and rollback take the newest checkpoint that verifies, saying which newer
ones were skipped and why (:mod:`nanoseek.train.checkpoint`).

Exact resume. A checkpoint holds the float32 master weights, the router biases, the full AdamW
state, the RNG states, the sampler position, the guard and cost states and the byte length of
``metrics.jsonl`` (a resumed run truncates the records of steps it redoes). The LR, γ and λ are
pure functions of the step; the data order is a pure function of (seed, epoch, position). The MoE
dispatch is order-stable (stable argsort; bincount; index_add and the backward's accumulating
index_put run serially on the CPU), and CPU kernels are deterministic for a fixed thread count, so
on the CPU a run killed at any point and resumed with ``--resume`` (same machine, same
``torch.get_num_threads()``) ends with weights bit-identical to an uninterrupted run of the same
length. ``deterministic=True`` additionally turns on ``torch.use_deterministic_algorithms`` (and
``CUBLAS_WORKSPACE_CONFIG``) for accelerators, where index_add and friends otherwise use atomics;
it is off by default there (speed), and on the CPU it is not needed (it would only NaN-fill every
``torch.empty``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import nanoseek
from ..config import ModelConfig, get_preset
from ..data import (DeterministicSampler, PackedDataset, build_shards, check_vocab, load_tokenizer, open_shards,
                    padded_vocab_size, read_manifest, train_tokenizer)
from ..data.sources import DataError
from ..device import autocast_dtype, device_name, pick_device
from ..errors import ConfigError, NanoseekError
from ..info import training_flops_per_token
from ..model import DeepSeekV3, causal_lm_loss, update_routing_bias
from ..fp8_training import convert_to_fp8
from . import distributed as dist
from .checkpoint import copy_tokenizer, load_model, read_trainer_state
from .config import DATA_FIELDS, TrainConfig
from .cost import CostMeter
from .faults import inject_nan
from .guard import TrainingGuard
from .optim import bias_speed_at, build_optimizer, lr_at, mtp_weight_at
from .run import (RunTrainer, absolute_path, finite, format_line, peak_memory_bytes, resolve_settings, run_lock,
                  silent, start_run_dir)

STAGE = "pretrain"
CONFIG_FILE = "train_config.json"
STATE_VERSION = 1
# bf16 dense 8192³ matmul as measured on one H100 SXM, 2026-11-23 (benchmarks/RESULTS.md)
KNOWN_PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


# ----------------------------------------------------------------------------- helpers
def default_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak used for MFU on known cards; ``None`` (MFU omitted) elsewhere."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


@contextlib.contextmanager
def _deterministic(enabled: bool):
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only for --tensorboard
    except ImportError:
        raise NanoseekError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter


def _is_shard_dir(paths: list[str]) -> bool:
    return len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "manifest.json").is_file()


# ----------------------------------------------------------------------------- configuration
def resolve_config(run_dir: Path, overrides: dict[str, Any], resume: bool, log: Callable = print,
                   config_cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The run's settings (``config_cls``: TrainConfig, or SFTConfig for SFT and distillation): from
    ``overrides`` (fresh run) or ``run_dir/train_config.json`` (resume; see
    :func:`~nanoseek.train.run.resolve_settings`)."""
    overrides = dict(overrides)
    for key in ("config", "init_from", "tokenizer"):
        if overrides.get(key) is not None:
            overrides[key] = absolute_path(overrides[key])
    if overrides.get("data"):
        overrides["data"] = [absolute_path(p) for p in overrides["data"]]
    if resume and overrides.get("precision") is None:
        overrides["precision"] = precision_of_older_run(run_dir / CONFIG_FILE, overrides.get("device"))

    def build(fields: dict[str, Any]) -> TrainConfig:
        sources = [k for k in ("preset", "config", "init_from") if fields.get(k) is not None]
        if len(sources) > 1:
            raise ConfigError(f"give only one of --preset, --config and --init-from (got {', '.join(sources)})")
        if not sources:
            fields["preset"] = "small"
        init_from = fields.get("init_from")
        if init_from is not None and fields.get("tokenizer") is None and (Path(init_from) / "tokenizer.json").is_file():
            fields["tokenizer"] = init_from  # the checkpoint's own ids, not a new tokenizer trained on --data
        if not fields.get("data"):
            raise NanoseekError("--data is required: text files, directories or globs (txt/jsonl/parquet), "
                                "or a shard directory with a manifest.json")
        return config_cls.from_dict(fields)

    return resolve_settings(run_dir, CONFIG_FILE, config_cls, overrides, resume, build, log, ignore=DATA_FIELDS)


def precision_of_older_run(cfg_path: Path, device: str | None) -> str | None:
    """``float32`` for a CPU run whose config predates the ``precision`` setting (CPU training was
    always float32 then, and ``auto`` may now choose bf16), so that resuming it keeps its arithmetic;
    ``None`` (the saved value, or ``auto``: what accelerators ran before too) otherwise."""
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # resolve_settings reports an unreadable config
    if not isinstance(saved, dict) or "precision" in saved:
        return None
    return "float32" if pick_device(device or saved.get("device", "auto")).type == "cpu" else None


# ----------------------------------------------------------------------------- data
def prepare_data(cfg: TrainConfig, run_dir: Path, fresh: bool, log: Callable = print, default_vocab: int = 4096):
    """Tokenizer and shards for the run. Returns ``(tokenizer, tokenizer_dir, data_dir)``."""
    tok_dir = run_dir / "tokenizer"
    shard_mode = _is_shard_dir(cfg.data)
    data_dir = Path(cfg.data[0]) if shard_mode else run_dir / "data"
    if not fresh:  # resume: everything is in place already
        if not (tok_dir / "tokenizer.json").is_file():
            raise NanoseekError(f"cannot resume: {tok_dir} holds no tokenizer.json")
        tokenizer = load_tokenizer(tok_dir)
        read_manifest(data_dir).check_tokenizer(tokenizer)
        return tokenizer, tok_dir, data_dir

    tmp_tok = run_dir / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    if cfg.tokenizer is not None or shard_mode:
        src = Path(cfg.tokenizer) if cfg.tokenizer is not None else None
        if src is None:
            for cand in (data_dir / "tokenizer", data_dir.parent / "tokenizer"):
                if (cand / "tokenizer.json").is_file():
                    src = cand
                    break
            if src is None:
                raise NanoseekError(f"--data {data_dir} is a shard directory: give the tokenizer it was built "
                                    f"with (--tokenizer DIR)")
        if not (src / "tokenizer.json").is_file():
            raise NanoseekError(f"--tokenizer {src}: no tokenizer.json there")
        tokenizer = load_tokenizer(src)
        if src.resolve() != tok_dir.resolve():
            copy_tokenizer(src, tmp_tok)
        log(f"tokenizer: {src} ({tokenizer.vocab_size} ids)")
    else:
        vocab = cfg.vocab_size or default_vocab
        log(f"tokenizer: training a byte-level BPE with up to {vocab} ids on {', '.join(cfg.data)}")
        try:
            tokenizer = train_tokenizer(list(cfg.data), vocab, tmp_tok, text_field=cfg.text_field)
        except ValueError as exc:
            raise NanoseekError(f"cannot train the tokenizer: {exc}") from None
        log(f"tokenizer: {tokenizer.vocab_size} ids")
    if tmp_tok.exists():
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp_tok, tok_dir)

    if shard_mode:
        manifest = read_manifest(data_dir)
        manifest.check_tokenizer(tokenizer)
        log(f"data: reusing shards in {data_dir} "
            f"({manifest.n_train_tokens} train / {manifest.n_val_tokens} val tokens)")
        return tokenizer, tok_dir, data_dir
    try:
        manifest = build_shards(cfg.data, tokenizer, data_dir, val_fraction=cfg.val_fraction,
                                min_val_tokens=cfg.seq_len + 1, text_field=cfg.text_field, overwrite=True)
    except DataError as exc:
        if "too small" not in str(exc):
            raise
        # Too few documents to hold some out whole (e.g. one big .txt file): shard without the
        # top-up; load_datasets() then holds out the tail of the training stream instead.
        manifest = build_shards(cfg.data, tokenizer, data_dir, val_fraction=cfg.val_fraction,
                                min_val_tokens=0, text_field=cfg.text_field, overwrite=True)
    log(f"data: {manifest.n_train_tokens} train / {manifest.n_val_tokens} val tokens in {data_dir}")
    return tokenizer, tok_dir, data_dir


def split_tail(arrays: list, n_tail: int) -> tuple[list, list]:
    """Split a token stream given as arrays into (all but the last ``n_tail`` tokens, the last ``n_tail``)."""
    head, tail, remaining = list(arrays), [], n_tail
    while remaining > 0 and head:
        last = head.pop()
        if last.size <= remaining:
            tail.insert(0, last)
            remaining -= last.size
        else:
            head.append(last[: last.size - remaining])
            tail.insert(0, last[last.size - remaining:])
            remaining = 0
    return head, tail


def load_datasets(data_dir: Path, cfg: TrainConfig, log: Callable = print):
    """``(train, val or None)`` :class:`PackedDataset` of the shards.

    The validation split is the shards' held-out documents; when those are fewer than one sequence
    (a corpus of very few documents), the last ``max(seq_len + 1, val_fraction × tokens)`` tokens of
    the training stream are held out instead. Deterministic, so a resumed run sees the same split.
    """
    need = cfg.seq_len + 1
    train, val = open_shards(data_dir, "train"), open_shards(data_dir, "val")
    n_train, n_val = sum(a.size for a in train), sum(a.size for a in val)
    if n_val < need:
        hold = max(need, int(cfg.val_fraction * n_train))
        if n_train - hold < need:
            raise DataError(f"the corpus is too small for seq_len={cfg.seq_len}: it has {n_train + n_val} tokens, "
                            f"and pretraining needs at least {need} for one training sequence plus {need} held "
                            f"out for validation; add data or lower --seq-len")
        train, val = split_tail(train, hold)
        log(f"note: too few documents for a held-out split: the last {hold} tokens of the training stream "
            f"are the validation data")
    return PackedDataset(train, cfg.seq_len, "train"), PackedDataset(val, cfg.seq_len, "val")


# ----------------------------------------------------------------------------- model
def build_model_config(cfg: TrainConfig, tokenizer, log: Callable = print):
    """The ModelConfig of a fresh run, its vocabulary checked against the tokenizer."""
    if cfg.init_from is not None:
        model_cfg = ModelConfig.from_json(cfg.init_from)
        where = f"--init-from {cfg.init_from}"
    elif cfg.config is not None:
        model_cfg = ModelConfig.from_json(cfg.config)
        where = f"--config {cfg.config}"
    else:
        base = get_preset(cfg.preset)
        vocab = padded_vocab_size(tokenizer.vocab_size)
        if vocab != base.vocab_size:
            log(f"note: preset {cfg.preset}: vocab_size {base.vocab_size} -> {vocab} "
                f"(the tokenizer's {tokenizer.vocab_size} ids padded to a multiple of 64)")
        return base.replace(vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, extra=dict(base.extra))
    try:
        check_vocab(tokenizer.vocab_size, model_cfg.vocab_size)
    except ValueError as exc:
        raise ConfigError(f"{where}: vocabulary mismatch: {exc}") from None
    return model_cfg


def default_vocab_size(cfg: TrainConfig) -> int:
    """The vocabulary size a fresh run's tokenizer is trained to: the model's."""
    if cfg.init_from is not None:
        return ModelConfig.from_json(cfg.init_from).vocab_size
    if cfg.config is not None:
        return ModelConfig.from_json(cfg.config).vocab_size
    return get_preset(cfg.preset).vocab_size


# ----------------------------------------------------------------------------- the trainer
@dataclass
class StepMetrics:
    """What one pretraining/SFT step measured, averaged over micro-batches and ranks."""

    loss: float
    lm_loss: float
    mtp_loss: float
    aux_loss: float
    grad_norm: float
    load_max_over_mean: float | None = None  # busiest expert / mean load, worst MoE layer
    dead_experts: int | None = None          # routed experts that got no token, all layers
    #: per MoE layer, max load / mean load − 1 over the step's batch: MaxVio_batch (V3 report §4.5.3)
    max_violation: list[float] | None = None


class Trainer(RunTrainer):
    """Holds the state of one training run; :meth:`train` runs it to ``max_steps``.

    Pretraining as is. Another stage (``nanoseek.train.sft.SFTTrainer``: SFT, distillation) subclasses
    it, sets :attr:`stage` and overrides the two data hooks :meth:`prepare_data` and
    :meth:`load_datasets`. Checkpoints, resume, rollback, cost, metrics and report come from
    :class:`~nanoseek.train.run.RunTrainer`.
    """

    stage = STAGE  # the name in metrics.jsonl, cost.json, trainer_state.json, tensorboard and the progress bar

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool, log: Callable = print):
        super().__init__()
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.keep_last = cfg.keep_last
        self.metrics_path = run_dir / "metrics.jsonl"
        self.logs = {"metrics_bytes": self.metrics_path}
        self.device = dist.local_device(pick_device(cfg.device))  # cuda:LOCAL_RANK etc. under torchrun
        self.amp = autocast_dtype(self.device, cfg.precision)
        self.ckpt = self.pick_checkpoint() if resume else None  # the newest that verifies
        state = read_trainer_state(self.ckpt) if self.ckpt is not None else None

        # data
        default_vocab = default_vocab_size(cfg) if state is None else 0
        with dist.main_first():  # rank 0 trains the tokenizer and writes the shards; the others then read them
            self.tokenizer, self.tok_dir, self.data_dir = self.prepare_data(
                fresh=state is None and dist.is_main(), default_vocab=default_vocab)
        self.train_ds, self.val_ds = self.load_datasets()
        self.sampler = DeterministicSampler(len(self.train_ds), cfg.seed, dist.rank(), dist.world_size(),
                                            batch_size=cfg.batch_size)

        # model (float32 master weights; built on the CPU so the init does not depend on the device)
        if state is None:
            model = self.initial_model(build_model_config(cfg, self.tokenizer, log))
        else:
            model = load_model(self.ckpt, "cpu", verify=False)  # verified by pick_checkpoint
        try:
            check_vocab(self.tokenizer.vocab_size, model.config.vocab_size)
        except ValueError as exc:
            raise ConfigError(f"vocabulary mismatch: {exc}") from None
        if cfg.seq_len > model.config.max_position_embeddings:
            log(f"note: seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                f"{model.config.max_position_embeddings}")
        if cfg.fp8:  # before FSDP2, the optimizer and torch.compile: it swaps modules, keeping parameters
            convert_to_fp8(model, ue8m0=cfg.fp8_ue8m0)
        self.model = dist.parallelize(model, self.device, cfg.precision).train()  # FSDP2 shards when distributed
        self.model.set_activation_checkpointing(cfg.activation_checkpointing)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.routers = self.model.moe_routers()
        self.optimizer = build_optimizer(self.model, cfg, self.device)

        # bookkeeping
        self.guard = TrainingGuard(cfg.guard, run_dir / "incidents.jsonl" if dist.is_main() else None, log=log)
        self.cost = CostMeter(run_dir, self.stage, self.device, n_devices=dist.world_size(),
                              price_per_device_hour=cfg.price_per_device_hour)
        # MFU numerator (PaLM / nanoGPT convention, see training_flops_per_token); the MTP modules are
        # trained too, so their FLOPs count
        self.flops_per_token = training_flops_per_token(model.config, cfg.seq_len, include_mtp=True)
        self.peak_tflops = cfg.peak_tflops if cfg.peak_tflops is not None else default_peak_tflops(self.device)
        self.tokens_per_step = cfg.tokens_per_step * dist.world_size()
        self.tokens = 0
        self.tb = None
        if state is not None:
            self.restore(self.ckpt, state)
        n_params = model.num_parameters()
        log(f"device: {self.device} ({device_name(self.device)}), autocast {self.amp or 'off (float32)'}; "
            f"model {n_params / 1e6:.2f}M parameters (+MTP {model.num_parameters(True) - n_params:,}); "
            f"{self.tokens_per_step} tokens/step; {self.flops_per_token / 1e6:.1f} MFLOP/token")

    def initial_model(self, model_cfg) -> DeepSeekV3:
        """The model a fresh run starts from: ``init_from``'s weights, or a seeded init of ``model_cfg``."""
        if self.cfg.init_from is not None:
            return nanoseek.load(self.cfg.init_from, device="cpu", dtype=torch.float32)
        torch.manual_seed(self.cfg.seed)
        return DeepSeekV3(model_cfg)

    # ------------------------------------------------------------------ data hooks (overridden per stage)
    def prepare_data(self, fresh: bool, default_vocab: int):
        """``(tokenizer, tokenizer_dir, data_dir)``: built when ``fresh`` (rank 0 of a new run), else read."""
        return prepare_data(self.cfg, self.run_dir, fresh=fresh, log=self.log, default_vocab=default_vocab)

    def load_datasets(self):
        """``(train, val or None)``: datasets with ``len()`` and ``get_batch(indices) -> (x, y)``."""
        return load_datasets(self.data_dir, self.cfg, self.log)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"tokens": self.tokens, "sampler": self.sampler.state_dict(), "train_config": self.cfg.to_dict(),
                "data_dir": str(self.data_dir)}

    def load_extra_state(self, state: dict) -> None:
        self.tokens = int(state["tokens"])
        self.sampler.load_state_dict(state["sampler"])

    def rollback(self, bad_step: int, sampler_before: dict, required: bool = False) -> None:
        """Reload the newest good checkpoint, then move the data stream past the offending step's window.

        The guard keeps its history (and counts the rollback); data between the checkpoint and the
        bad step is not replayed: the sampler continues ``skip_batches_after_rollback`` steps after
        the start of the bad step's window (PaLM-style skipping of the data around a spike).
        ``required``: the current state is unusable (non-finite), so having no checkpoint is an error
        rather than a skipped step.
        """
        state = self.load_checkpoint(bad_step, with_rng=True)
        if state is None:
            if required:
                raise NanoseekError(f"step {bad_step}: the weights or optimizer state are not finite and "
                                    f"{self.run_dir} holds no checkpoint to roll back to")
            self.log(f"guard: step {bad_step}: rollback requested but there is no checkpoint; skipping the step")
            return
        self.tokens = int(state["tokens"])
        self.sampler.load_state_dict(sampler_before)
        self.sampler.skip(self.cfg.guard.skip_batches_after_rollback * self.cfg.grad_accum)
        self.log(f"guard: skipped {self.cfg.guard.skip_batches_after_rollback} step(s) of data past the "
                 f"offending window")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss of the main LM head over the first ``eval_batches`` val batches (fixed)."""
        if self.val_ds is None:
            return None
        self.model.eval()
        n = min(len(self.val_ds), self.cfg.eval_batches * self.cfg.batch_size)
        total, count = 0.0, 0
        for begin in range(0, n, self.cfg.batch_size):
            idx = list(range(begin, min(n, begin + self.cfg.batch_size)))
            x, y = self.val_ds.get_batch(idx)
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.forward(x).logits
            total += causal_lm_loss(logits, y).item() * len(idx)
            count += len(idx)
        self.model.train()
        return dist.all_reduce_mean(torch.tensor(total / count)).item()

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, step_index: int) -> tuple[StepMetrics, torch.Tensor | None]:
        cfg = self.cfg
        lam = mtp_weight_at(step_index, cfg)
        sums = torch.zeros(4, device=self.device)
        load = None
        for micro in range(cfg.grad_accum):
            x, y = self.train_ds.get_batch(self.sampler.next_batch())
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out = self.forward(x, labels=y, mtp_loss_weight=lam, aux_loss_alpha=cfg.aux_loss_alpha)
            loss = out.loss
            if micro == 0 and inject_nan(step_index + 1):  # the guard drill (nanoseek.train.faults)
                loss = loss * float("nan")
            (loss / cfg.grad_accum).backward()
            zero = loss.new_zeros(())
            parts = [loss, out.lm_loss, out.mtp_loss if out.mtp_loss is not None else zero,
                     out.aux_loss if out.aux_loss is not None else zero]
            sums += torch.stack([p.detach().float() for p in parts]) / cfg.grad_accum
            if out.expert_load is not None:
                load = out.expert_load.detach() if load is None else load + out.expert_load.detach()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = dist.clip_grad_norm_(self.model.parameters(), max_norm)  # the global norm under FSDP2
        load = dist.all_reduce_sum(load)  # every rank applies the same bias update and guard decision
        extra = [grad_norm.reshape(1).float().to(self.device)]
        if load is not None:
            lf = load.float()
            per_layer = lf.max(dim=1).values / lf.mean(dim=1).clamp_min(1e-9)
            extra += [per_layer.max().reshape(1), (load == 0).sum().reshape(1).float(), per_layer]
        values = dist.all_reduce_mean(torch.cat([sums] + extra)).tolist()  # the one host sync of the step
        metrics = StepMetrics(*values[:5])
        if load is not None:
            metrics.load_max_over_mean, metrics.dead_experts = values[5], int(values[6])
            metrics.max_violation = [v - 1.0 for v in values[7:]]
        return metrics, load

    def _apply(self, step_index: int, load: torch.Tensor | None) -> tuple[float, float]:
        lr = lr_at(step_index, self.cfg) * self.guard.lr_scale
        gamma = bias_speed_at(step_index, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if gamma > 0 and load is not None:
            for router, layer_load in zip(self.routers, load):
                update_routing_bias(router, layer_load, gamma)
        return lr, gamma

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to ``max_steps`` (from the restored step when resuming); returns the run's summary."""
        cfg = self.cfg
        self._t_start = self._t_prev = time.perf_counter()
        self.last_val = None
        if self.ckpt is None:
            self.log(f"checkpoint: {self.save()} (initial weights)")
        if cfg.tensorboard and dist.is_main():
            self.tb = _summary_writer()(str(self.run_dir / "tensorboard"))
        try:
            self.run_steps(cfg.max_steps, self._train_step)
        finally:
            if self.tb is not None:
                self.tb.close()
        final_dir, report = self.finish()
        self.log(f"done: {self.step} steps, {self.tokens} tokens; model in {final_dir}")
        return {"step": self.step, "tokens": self.tokens, "val_loss": self.last_val, "final": final_dir,
                "report": report}

    def _train_step(self, step_no: int, say: Callable[[str], Any], metrics_file) -> bool:
        """One step (see the module docstring); False when it ended in a rollback."""
        cfg = self.cfg
        sampler_before = self.sampler.state_dict()
        metrics, load = self._forward_backward(self.step)
        decision = self.guard.check(step_no, metrics.loss, metrics.grad_norm, load)
        action = decision.action
        lr, gamma = 0.0, 0.0
        self.cost.add_tokens(self.tokens_per_step)
        self.cost.add_samples(cfg.batch_size * cfg.grad_accum * dist.world_size())
        if decision.apply_update:
            lr, gamma = self._apply(self.step, load)
            self.guard.accept(step_no, metrics.loss, metrics.grad_norm)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if action == "rollback":
            self.rollback(step_no, sampler_before)
            self._write(metrics_file, self._record(step_no, action, metrics, lr, gamma, 0.0, None))
            self._t_prev = time.perf_counter()
            return False
        self.step += 1
        self.tokens += self.tokens_per_step
        now = time.perf_counter()
        dt, self._t_prev = now - self._t_prev, now
        val = None
        if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
            val = self.last_val = self.evaluate()
        record = self._record(self.step, action, metrics, lr, gamma, dt, val)
        if self.step % cfg.log_every == 0 or action != "ok" or val is not None or self.step == cfg.max_steps:
            self._write(metrics_file, record)
            say(self._line(record))
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
            metrics_file.flush()
            n_bad, bad = self.nonfinite_state()
            if bad is not None:  # never checkpointed: back to the last good one, past this data
                self.guard.nonfinite_state(self.step, n_bad, bad)
                self.rollback(self.step, sampler_before, required=True)
                self._write(metrics_file, self._record(step_no, "rollback", metrics, lr, gamma, 0.0, None))
                self._t_prev = time.perf_counter()
                return False
            say(f"checkpoint: {self.save(check=False)}")
        if val is not None or self.step % cfg.checkpoint_every == 0:
            self._t_prev = time.perf_counter()  # eval / checkpoint time is not step time
        return True

    def _record(self, step: int, action: str, m: StepMetrics, lr: float, gamma: float, dt: float,
                val: float | None) -> dict:
        rec: dict[str, Any] = {
            "stage": self.stage, "step": step, "action": action, "loss": finite(m.loss), "lm_loss": finite(m.lm_loss),
            "mtp_loss": finite(m.mtp_loss), "aux_loss": finite(m.aux_loss), "lr": lr, "grad_norm": finite(m.grad_norm),
            "tokens": self.tokens,
        }
        if dt > 0:
            tps = self.tokens_per_step / dt
            rec["tokens_per_s"] = tps
            rec["tflops"] = tps * self.flops_per_token / 1e12
            if self.peak_tflops:
                rec["mfu"] = rec["tflops"] / (self.peak_tflops * dist.world_size())
        if m.dead_experts is not None:
            rec["expert_load_max_over_mean"] = finite(m.load_max_over_mean)
            rec["dead_experts"] = m.dead_experts
            rec["max_vio"] = [finite(v) for v in m.max_violation]
        rec.update({"peak_mem_bytes": peak_memory_bytes(self.device),
                    "mtp_weight": mtp_weight_at(step - 1, self.cfg), "bias_speed": gamma, "elapsed": self.elapsed()})
        if val is not None:
            rec["val_loss"] = val
        return rec

    def _write(self, fh, rec: dict) -> None:
        self.write_record(fh, rec)
        if self.tb is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(f"{self.stage}/{key}", value, rec["step"])

    def _line(self, r: dict) -> str:
        fields = [("loss", r["loss"], ".4f"), ("lm", r["lm_loss"], ".4f"), ("lr", r["lr"], ".2e"),
                  ("gnorm", r["grad_norm"], ".3f")]
        if "tokens_per_s" in r:
            fields.append(("", f"{r['tokens_per_s']:,.0f} tok/s", ""))
        if "mfu" in r:
            fields.append(("mfu", f"{100 * r['mfu']:.1f}%", ""))
        if r.get("val_loss") is not None:
            fields.append(("val", r["val_loss"], ".4f"))
        return format_line(r["step"], self.cfg.max_steps, fields, r["action"])


def pretrain(out: str | os.PathLike, overrides: dict[str, Any], resume: bool = False, log: Callable = print) -> dict:
    """Run (or ``resume``) the pretraining run in ``out``; ``overrides`` are TrainConfig fields
    (``guard`` a dict of GuardConfig fields). Returns a summary dict."""
    return run_stage(out, overrides, resume, log, Trainer)


def run_stage(out: str | os.PathLike, overrides: dict[str, Any], resume: bool = False, log: Callable = print,
              trainer_factory: Callable[..., Trainer] = Trainer, config_cls: type[TrainConfig] = TrainConfig) -> dict:
    """What every :class:`Trainer` stage runs (pretrain, sft, distill): resolve the settings
    (``config_cls``), lock the run directory, then ``trainer_factory(cfg, run_dir, resume, log).train()``."""
    run_dir = Path(out).expanduser().resolve()
    if not dist.launched_main():  # under torchrun only rank 0 speaks (and writes files)
        log = silent
    cfg = resolve_config(run_dir, overrides, resume, log, config_cls)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist.init_distributed(pick_device(cfg.device))  # torchrun: join the process group; no-op in one process
    with run_lock(run_dir):
        start_run_dir(run_dir, resume, ("metrics.jsonl", "incidents.jsonl"))
        if dist.is_main():
            cfg.save(run_dir / CONFIG_FILE)
        if cfg.tensorboard:  # a clear error before any data work
            _summary_writer()
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with _deterministic(bool(cfg.deterministic)):
            trainer = trainer_factory(cfg, run_dir, resume, log)
            return trainer.train()
