"""The run machinery every training stage shares: pretraining, SFT and distillation
(:class:`nanoseek.train.pretrain.Trainer`) and GRPO (:class:`nanoseek.rl.grpo.GRPOTrainer`).

A stage's trainer subclasses :class:`RunTrainer`, builds its model, optimizer, guard and cost meter,
and keeps its own step; this module owns the rest of the run's life:

- the run directory: one trainer at a time (:func:`run_lock`), the records of a fresh run cleared;
- checkpoints: the newest that verifies is picked on resume and rollback (every rank gets rank 0's
  choice), a checkpoint is refused while the weights or AdamW moments hold NaN/inf, and only rank 0
  writes (the full, unsharded state, so checkpoints are portable across world sizes);
- exact resume: the trainer state holds the step, elapsed time, guard and cost states and the byte
  length of every JSONL log, so a resumed run truncates the records of steps it redoes
  (``extra_state`` / ``load_extra_state`` carry what only one stage has);
- rollback to the newest good checkpoint (the guard counts it and stops the run past
  ``max_rollbacks``);
- bookkeeping around the loop: progress bar with ETA, metrics JSONL, cost meter, and at the end
  the report card and ``final/`` (through :func:`~nanoseek.train.checkpoint.publish_final`, fsynced).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from ..errors import CheckpointError, NanoseekError
from ..report import write_report
from ..settings import resumable
from . import distributed as dist
from .checkpoint import (
    TRAINER_STATE,
    checkpoint_dir,
    checkpoint_step,
    describe_nonfinite,
    latest_checkpoint,
    list_checkpoints,
    publish_final,
    read_trainer_state,
    restore_model,
    restore_optimizer,
    restore_rng,
    save_checkpoint,
)
from .config import merge_resume_settings
from .faults import maybe_fault

STATE_VERSION = 1


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else ``None`` (JSON has no NaN)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def absolute_path(p: str | None) -> str | None:
    """``p`` with ``~`` expanded, made absolute (``None`` stays ``None``)."""
    return None if p is None else os.path.abspath(os.path.expanduser(p))


def silent(*args: Any, **kwargs: Any) -> None:
    """A log function that says nothing (ranks other than 0 under torchrun)."""


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One trainer per run directory (advisory flock; released by the kernel even on SIGKILL).
    Under torchrun rank 0 holds it for all ranks."""
    if not dist.is_main():
        yield
        return
    try:
        import fcntl  # POSIX only
    except ImportError:
        yield
        return
    fh = open(run_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise NanoseekError(f"another nanoseek process is training in {run_dir}") from None
        yield
    finally:
        fh.close()


def resolve_settings(run_dir: Path, config_file: str, cls: type, overrides: dict[str, Any], resume: bool,
                     build: Callable[[dict[str, Any]], Any], log: Callable[[str], Any] = print,
                     ignore: frozenset[str] = frozenset(), what: str = "") -> Any:
    """A run's settings (a :class:`~nanoseek.settings.Settings` subclass ``cls``; ``what`` names the
    kind of run in messages).

    Fresh run: ``build(overrides)``; ``--out`` must be new, empty, or an attempt that never reached
    its first checkpoint (anything else would be lost or mixed up). Resume: the stored
    ``RUN_DIR/config_file`` with ``overrides`` applied where the field is declared resumable (each
    change logged; any other difference is refused naming it; ``ignore`` fields, such as data paths,
    are skipped); ``overrides["guard"]`` holds guard fields. Errors name ``run_dir`` and the file.
    """
    cfg_path = run_dir / config_file
    kind = f"{what} " if what else ""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if resume:
        if not cfg_path.is_file() or not list_checkpoints(run_dir):  # intact or not: the trainer picks
            raise NanoseekError(f"--resume: no {kind}checkpoint in {run_dir} to resume from "
                                f"(run without --resume to start a new run there)")
        guard = overrides.pop("guard", None) or {}
        guard = guard.to_dict() if hasattr(guard, "to_dict") else dict(guard)
        data = merge_resume_settings(cls.load(cfg_path).to_dict(), overrides, guard, resumable(cls), run_dir, log,
                                     ignore=ignore)
        return cls.from_dict(data, source=str(cfg_path))
    cfg = build(overrides)
    if run_dir.exists() and not run_dir.is_dir():
        raise NanoseekError(f"--out {run_dir} exists and is not a directory")
    if cfg_path.is_file():
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            diffs = cls.load(cfg_path).differences(cfg)
            shown = "; ".join(f"{k}: run {a!r}, given {b!r}" for k, (a, b) in sorted(diffs.items())[:6])
            held = f"a {kind}run with a different config ({shown})" if diffs else "this run"
            raise NanoseekError(f"--out {run_dir} already holds {held} with checkpoints up to step "
                                f"{checkpoint_step(ckpts[-1])}; pass --resume to continue it, or choose another --out")
        log(f"note: {run_dir} holds a run that never reached its first checkpoint: starting over there")
    elif run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        raise NanoseekError(f"--out {run_dir} is a non-empty directory that holds no {kind}run; "
                            f"choose an empty or new directory")
    return cfg


def start_run_dir(run_dir: Path, resume: bool, logs: tuple[str, ...]) -> None:
    """Create ``run_dir``; a fresh run (or a start-over) forgets the records (``logs``: JSONL file
    names) of an earlier attempt. Rank 0 only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and dist.is_main():
        for name in logs:
            (run_dir / name).unlink(missing_ok=True)


class RunTrainer:
    """The run machinery of one training stage (see the module docstring).

    The subclass sets, in its ``__init__``: :attr:`stage`, ``run_dir``, ``log``, ``device``,
    ``model``, ``optimizer``, ``tokenizer``, ``tok_dir``, ``guard`` (a TrainingGuard or RLGuard),
    ``cost`` (a CostMeter), ``keep_last`` and ``logs`` (state key → JSONL path, e.g.
    ``{"metrics_bytes": run_dir / "metrics.jsonl"}``), then calls :meth:`restore` when resuming.
    """

    stage: str

    def __init__(self) -> None:
        self.step = 0
        self.elapsed_before = 0.0
        self._t_start = time.perf_counter()

    # ------------------------------------------------------------------ what one stage adds
    def extra_state(self) -> dict:
        """The stage's own part of the trainer state (JSON)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` on resume."""

    # ------------------------------------------------------------------ state
    def elapsed(self) -> float:
        """Seconds of this run so far, over every resume."""
        return self.elapsed_before + (time.perf_counter() - self._t_start)

    def trainer_state(self) -> dict:
        """Everything a checkpoint holds besides weights, optimizer and RNG."""
        state = {"version": STATE_VERSION, "stage": self.stage, "step": self.step,
                 "guard": self.guard.state_dict(), "cost": self.cost.state_dict(), "elapsed": self.elapsed(),
                 "tokenizer_sha256": self.tokenizer.fingerprint, "torch_version": torch.__version__,
                 "num_threads": torch.get_num_threads(), "device": str(self.device), "saved_at": time.time()}
        for key, path in self.logs.items():
            state[key] = path.stat().st_size if path.exists() else 0
        state.update(self.extra_state())
        return state

    def restore(self, ckpt: Path, state: dict) -> None:
        """Resume from ``ckpt`` (its model weights are already loaded): optimizer, RNG, guard, cost,
        step, the stage's extra state; the JSONL logs lose the records written after ``ckpt``."""
        if state.get("version") != STATE_VERSION or state.get("stage") != self.stage:
            raise NanoseekError(f"{ckpt}: not a {self.stage} checkpoint of a supported version "
                                f"(stage {state.get('stage')!r}, version {state.get('version')!r})")
        if state.get("tokenizer_sha256") != self.tokenizer.fingerprint:
            raise NanoseekError(f"{ckpt} was trained with another tokenizer than {self.tok_dir}")
        restore_optimizer(self.optimizer, ckpt, model=self.model, verify=False)  # verified when picked
        restore_rng(ckpt, self.device, verify=False)
        self.guard.load_state_dict(state["guard"])
        self.cost.load_state_dict(state["cost"])
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed"])
        self.load_extra_state(state)
        if self.device.type == "cpu" and state.get("num_threads") not in (None, torch.get_num_threads()):
            self.log(f"note: the checkpoint was written with {state['num_threads']} CPU threads and this process "
                     f"has {torch.get_num_threads()}: the continuation is exact in state but may differ bitwise "
                     f"from an uninterrupted run")
        if dist.is_main():
            for key, path in self.logs.items():
                if path.exists():  # drop the records of steps the interrupted run took after the checkpoint
                    with open(path, "r+b") as fh:
                        fh.truncate(min(int(state[key]), path.stat().st_size))
        self.log(f"resumed from {ckpt} at step {self.step}")

    # ------------------------------------------------------------------ checkpoints
    def pick_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies (``None``: there is none at all): rank 0 reads and
        checks the files, logging what it skips, and every rank gets its choice. Raises
        :class:`CheckpointError` on every rank when checkpoints exist but none verifies."""
        step, error = -1, None
        if dist.is_main():
            try:
                ckpt = latest_checkpoint(self.run_dir, log=self.log)
                step = -1 if ckpt is None else checkpoint_step(ckpt)
            except CheckpointError as exc:
                step, error = -2, exc
        if dist.world_size() > 1:
            step = int(dist.all_reduce_sum(torch.tensor([step if dist.is_main() else 0], device=self.device)).item())
        if step == -2:
            raise error or CheckpointError(f"no intact checkpoint in {self.run_dir} (see rank 0's output)")
        return None if step < 0 else checkpoint_dir(self.run_dir, step)

    def nonfinite_state(self) -> tuple[int, str | None]:
        """How many values of the weights, buffers and optimizer moments are NaN or infinite (summed
        over ranks), and which tensors hold them. Collective under FSDP2."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        named = list(self.model.state_dict().items())
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                named += [(f"optimizer {key} of {names.get(id(p), '?')}", state[key]) for key in sorted(state)]
        return describe_nonfinite(named, reduce=dist.all_reduce_sum)

    def save(self, check: bool = True) -> Path | None:
        """Checkpoint the current step (collective; rank 0 writes and gets the path, the others
        ``None``). ``check``: refuse non-finite state on every rank first (:class:`CheckpointError`);
        save_checkpoint checks again on rank 0 either way."""
        if check:
            _, bad = self.nonfinite_state()
            if bad is not None:
                raise CheckpointError(f"refusing to checkpoint step {self.step} in {self.run_dir}: {bad}")
        path = None
        model_state, optimizer_state = dist.full_state_dicts(self.model, self.optimizer)  # all ranks; None if 1 process
        if dist.is_main():
            self.cost.save()
            path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(),
                                   self.tok_dir, keep_last=self.keep_last, device=self.device,
                                   model_state=model_state, optimizer_state=optimizer_state)
        dist.barrier()
        return path

    def load_checkpoint(self, bad_step: int, with_rng: bool) -> dict | None:
        """Roll back from step ``bad_step``: reload weights and optimizer (and RNG when ``with_rng``)
        from the newest checkpoint that verifies, set the step to its, and return its trainer state
        (``None`` when there is no checkpoint: nothing changed). The guard records the rollback and
        stops the run past ``max_rollbacks``; the cost meter keeps counting (the compute was real)."""
        ckpt = self.pick_checkpoint()
        if ckpt is None:
            return None
        self.guard.note_rollback(bad_step, checkpoint_step(ckpt))
        restore_model(self.model, ckpt, verify=False)  # verified by pick_checkpoint
        restore_optimizer(self.optimizer, ckpt, model=self.model, verify=False)
        if with_rng:
            restore_rng(ckpt, self.device, verify=False)
        state = read_trainer_state(ckpt)
        self.step = int(state["step"])
        self.log(f"guard: step {bad_step}: rolled back to {ckpt.name}")
        return state

    # ------------------------------------------------------------------ around the loop
    @contextlib.contextmanager
    def bookkeeping(self, total_steps: int) -> Iterator[tuple[tqdm, Callable[[str], Any], Any]]:
        """``(progress bar, say, metrics file)`` for the loop: the bar shows the ETA on a terminal
        (rank 0), ``say`` prints above it, the metrics JSONL is open for appending (rank 0; on other
        ranks writes go nowhere). The cost meter runs inside; on the way out (even on an error) the
        files are closed and the cost is saved."""
        bar = tqdm(total=total_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True,
                   disable=not sys.stderr.isatty() or not dist.is_main(), file=sys.stderr)
        say = bar.write if not bar.disable else self.log
        self.guard.log = say
        self.cost.start()
        metrics = open(self.logs["metrics_bytes"] if dist.is_main() else os.devnull, "a", encoding="utf-8")
        try:
            yield bar, say, metrics
        finally:
            bar.close()
            metrics.close()
            self.cost.stop()
            if dist.is_main():
                self.cost.save()

    def run_steps(self, total: int, step: Callable[[int, Callable[[str], Any], Any], bool]) -> None:
        """The loop of every stage, to ``total`` steps: ``step(step_no, say, metrics_file)`` trains step
        ``step_no`` (forward, guard decision, update, records, checkpoint when due) and returns False
        when the guard rolled the run back instead. Around it: the fault hooks (tests), the progress
        bar (it follows a rollback back) and :meth:`bookkeeping`."""
        with self.bookkeeping(total) as (bar, say, metrics):
            while self.step < total:
                step_no = self.step + 1
                maybe_fault("kill_at_step", step_no)  # TEST-ONLY (see nanoseek.train.faults)
                if step(step_no, say, metrics):
                    bar.update(1)
                else:
                    bar.n = self.step
                    bar.refresh()

    def write_record(self, fh, record: dict) -> None:
        """One metrics line, flushed."""
        fh.write(json.dumps(record) + "\n")
        fh.flush()

    def finish(self, report: bool = True) -> tuple[Path | None, Path | None]:
        """After the last step: ``RUN_DIR/final`` from the checkpoint of the last step (saved first
        if there is none) and the report card. Returns ``(final_dir, report_path)`` (``None`` on
        ranks other than 0, and for a report that could not be written: the run itself succeeded)."""
        ckpt = checkpoint_dir(self.run_dir, self.step)
        if not (ckpt / TRAINER_STATE).is_file():
            ckpt = self.save()
        if not dist.is_main():
            return None, None
        final = publish_final(self.run_dir, ckpt)
        report_path = None
        if report:
            try:
                report_path = write_report(self.run_dir)
                self.log(f"report: {report_path}")
            except Exception as exc:  # a report problem must not hide that the run succeeded
                self.log(f"warning: could not write the report: {type(exc).__name__}: {exc}")
        return final, report_path


def format_line(step: int, total: int, fields: list[tuple[str, Any, str]], action: str) -> str:
    """A console line of one step: ``step 3/50 | loss 2.3456 | ... [skip]``; ``fields`` are
    ``(label, value, format)`` (a missing value prints ``-``)."""
    parts = [f"step {step}/{total}"]
    for label, value, fmt in fields:
        text = format(value, fmt) if value is not None else "-"
        parts.append(f"{label} {text}" if label else text)
    if action != "ok":
        parts.append(f"[{action}]")
    return " | ".join(parts)
