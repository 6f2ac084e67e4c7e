"""Supervised fine-tuning (cold start, R1 §2.3.1) on the pretraining loop.

SFT is the pretraining :class:`~nanoseek.train.pretrain.Trainer` with another stage name and other
data: chat JSONL (and/or a generated cold-start set) tokenised with the checkpoint's chat template,
trained on assistant tokens only and packed into fixed-length sequences (:mod:`nanoseek.data.sft`).
Everything else is shared: ``TrainConfig``, the step (LM + MTP + balance losses; the MTP depth-k
loss reads the same masked labels shifted by k, so masked positions stay masked), the guard,
checkpoints and exact resume, the cost meter (stage ``"sft"`` in ``cost.json``), metrics and the
report card.

Run directory (``--out``)::

    train_config.json   the TrainConfig (init_from = the starting checkpoint)
    tokenizer/          the init checkpoint's tokenizer (or --tokenizer), copied
    cold_start.jsonl    with --cold-start: the generated chat examples
    data/               sft_data.safetensors + sft_data.json (packed sequences, split, counts)
    checkpoints/        step_XXXXXXXX/ as in pretraining (model/ loads with nanoseek.load)
    final/              the last checkpoint's model + tokenizer, self-contained
    metrics.jsonl, incidents.jsonl, cost.json, report.md
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

from ..data import load_tokenizer
from ..data.sft import build_sft_data, load_sft_data, read_sft_meta
from ..errors import NanoseekError
from ..tasks.coldstart import make_cold_start, write_jsonl
from .checkpoint import install_tokenizer, latest_checkpoint, read_trainer_state
from .config import SFTConfig
from .pretrain import Trainer, run_stage

STAGE = "sft"
COLD_START_FILE = "cold_start.jsonl"


def prepare_sft_data(cfg, run_dir: Path, fresh: bool, log: Callable = print,
                     make_data: Callable[[Callable], None] | None = None):
    """Tokenizer and packed data of an SFT run: ``(tokenizer, tokenizer_dir, data_dir)``.

    ``fresh``: copy the tokenizer (``cfg.tokenizer``, else the ``cfg.init_from`` checkpoint's) into
    ``RUN_DIR/tokenizer``, run ``make_data(log)`` (writes generated data files named in ``cfg.data``)
    and pack ``cfg.data`` into ``RUN_DIR/data``. Otherwise read what a fresh start wrote.
    """
    tok_dir, data_dir = run_dir / "tokenizer", run_dir / "data"
    if not fresh:
        if not (tok_dir / "tokenizer.json").is_file():
            raise NanoseekError(f"cannot resume: {tok_dir} holds no tokenizer.json")
        tokenizer = load_tokenizer(tok_dir)
        meta = read_sft_meta(data_dir)
        if meta["tokenizer_sha256"] != tokenizer.fingerprint:
            raise NanoseekError(f"{data_dir} was tokenised with another tokenizer than {tok_dir}")
        return tokenizer, tok_dir, data_dir

    src = cfg.tokenizer or cfg.init_from
    if src is None:
        raise NanoseekError("SFT needs a tokenizer: --init-from CKPT (its tokenizer is used) or --tokenizer DIR")
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        raise NanoseekError(f"{src} holds no tokenizer.json: SFT takes the tokenizer from the init checkpoint "
                            f"(or --tokenizer DIR)")
    tokenizer = load_tokenizer(src)
    install_tokenizer(src, tok_dir)
    log(f"tokenizer: {src} ({tokenizer.vocab_size} ids)")
    if make_data is not None:
        make_data(log)
    build_sft_data(cfg.data, tokenizer, cfg.seq_len, data_dir, val_fraction=cfg.val_fraction, log=log)
    return tokenizer, tok_dir, data_dir


class SFTTrainer(Trainer):
    """The pretraining loop on packed chat data with assistant-only targets (see the module doc)."""

    stage = STAGE

    def __init__(self, cfg, run_dir: Path, resume: bool, log: Callable = print, *, stage: str = STAGE,
                 make_data: Callable[[Callable], None] | None = None):
        self.stage = stage
        self.make_data = make_data
        super().__init__(cfg, run_dir, resume, log)

    def prepare_data(self, fresh: bool, default_vocab: int):
        return prepare_sft_data(self.cfg, self.run_dir, fresh, self.log, self.make_data)

    def load_datasets(self):
        train, val, meta = load_sft_data(self.data_dir, self.cfg.seq_len, self.tokenizer)
        self.log(f"sft data: {len(train)} train sequences ({train.n_target_tokens} target tokens), "
                 f"{0 if val is None else len(val)} val sequences")
        return train, val


def cold_start_maker(run_dir: Path, specs: list[str], n: int, seed: int,
                     answer_only: float = 0.0) -> Callable[[Callable], None]:
    """``make_data`` that writes ``RUN_DIR/cold_start.jsonl`` (:func:`nanoseek.tasks.coldstart.make_cold_start`)."""

    def make(log: Callable) -> None:
        records = make_cold_start(specs, n, seed=seed, answer_only_fraction=answer_only)
        write_jsonl(records, run_dir / COLD_START_FILE)
        mix = f", {answer_only:.0%} of them answer-only" if answer_only else ""
        log(f"cold start: {len(records)} chat examples from the solvers of {', '.join(specs)} "
            f"(problem seed {seed}{mix}) in {run_dir / COLD_START_FILE}")

    return make


def check_stage(run_dir: Path, stage: str) -> None:
    """On resume: the run's latest checkpoint must be of ``stage`` (not, say, a pretraining run)."""
    ckpt = latest_checkpoint(run_dir, cleanup=False)
    if ckpt is not None:
        found = read_trainer_state(ckpt).get("stage")
        if found != stage:
            raise NanoseekError(f"--resume: {run_dir} holds a {found} run, not {stage}; resume it with "
                                f"`nanoseek {found} --resume`")


def sft(out: str | os.PathLike, overrides: dict[str, Any], resume: bool = False, log: Callable = print, *,
        stage: str = STAGE, make_data: Callable[[Callable], None] | None = None,
        config_cls: type[SFTConfig] = SFTConfig) -> dict:
    """Run (or ``resume``) an SFT run in ``out``. Returns the trainer's summary (``final``: RUN_DIR/final).

    ``overrides`` are :class:`~nanoseek.train.config.SFTConfig` fields (SFT's defaults; the
    cold-start set is ``cold_start`` ``["task[:difficulty]", ...]`` with ``cold_start_n``,
    ``cold_start_seed`` and ``cold_start_answer_only``, all stored in the run's config). A fresh run
    needs a model (``init_from``, or ``preset``/``config`` with ``tokenizer``) and data (``data``
    chat JSONL files and/or ``cold_start``). ``make_data(log)``, when given, runs on a fresh start
    before the data is packed (distillation samples its data there).
    """
    run_dir = Path(out).expanduser().resolve()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("cold_start"), str):
        overrides["cold_start"] = [overrides["cold_start"]]
    if resume:
        check_stage(run_dir, stage)
        return run_stage(run_dir, overrides, True, log, functools.partial(SFTTrainer, stage=stage), config_cls)

    if not any(overrides.get(k) is not None for k in ("init_from", "preset", "config")):
        raise NanoseekError(f"{stage} needs a model to start from: --init-from CKPT")
    if overrides.get("init_from") is None and overrides.get("tokenizer") is None:
        raise NanoseekError(f"{stage} from --preset/--config needs --tokenizer DIR")
    data = [str(p) for p in overrides.get("data") or []]
    makers = [make_data] if make_data is not None else []
    cold = SFTConfig(init_from="-", **{k: v for k, v in overrides.items() if k.startswith("cold_start") or k == "seed"})
    if cold.cold_start:
        seed = cold.cold_start_seed if cold.cold_start_seed is not None else cold.seed
        make_cold_start(cold.cold_start, 1, seed=seed, answer_only_fraction=cold.cold_start_answer_only)  # check first
        data.insert(0, str(run_dir / COLD_START_FILE))
        makers.append(cold_start_maker(run_dir, list(cold.cold_start), cold.cold_start_n, seed,
                                       cold.cold_start_answer_only))
    if not data:
        raise NanoseekError(f"{stage} needs data: --data FILE.jsonl ... (chat JSONL) and/or "
                            f"--cold-start TASK[:DIFFICULTY]")
    overrides["data"] = data

    def make_all(log_fn: Callable) -> None:
        for maker in makers:
            maker(log_fn)

    factory = functools.partial(SFTTrainer, stage=stage, make_data=make_all if makers else None)
    return run_stage(run_dir, overrides, False, log, factory, config_cls)


__all__ = ["COLD_START_FILE", "SFTTrainer", "check_stage", "cold_start_maker", "prepare_sft_data",
           "sft"]
