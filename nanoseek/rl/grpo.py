"""The GRPO loop (DeepSeekMath arXiv 2402.03300 §4, Alg. 1; DeepSeek-R1 arXiv 2501.12948 eq. 1-3).

One step::

    1. P problems from the task generator, problem seeds < EVAL_SEED_BASE (a pure function of the
       run seed and the step's batch number), each asked in the chat form of ``chat_prompt`` (or, with
       ``prompt_format`` "base", as a base model's document prefix: R1-Zero straight from pretraining);
       with ``screen_factor`` K > 1, the P of K × P candidates whose greedy answer earns the least
       reward (:func:`~nanoseek.rl.rollout.step_problems`);
    2. G samples per prompt from the CURRENT policy through the shared :class:`Engine` (the model
       object being trained, in eval mode), each sample with its own seed (run seed, batch, prompt,
       sample); the engine returns every token's log-prob under the sampling distribution: π_old;
    3. rewards from the configured rule-based reward (default ``combined``: accuracy + 0.1·format),
       plus DAPO's overlong penalty when configured; group advantages (R1 eq. 3). A completion on
       which the reward (or the accuracy / format check) raises gets :data:`REWARD_ON_ERROR` and is
       counted (``reward_errors``) and reported (a ``reward_error`` incident naming the exception
       and the start of the completion): one bad completion does not stop the run. If the reward
       raises on every completion of a step, it is broken itself and the run stops with that error;
    4. dynamic sampling (DAPO): groups whose G rewards are all equal carry no signal and are dropped
       (counted; if none remains, the update is skipped and logged);
    5. μ passes over the kept groups, split into ``minibatches`` optimizer steps each: a full forward
       of prompt + completion recomputes the completion tokens' log-probs at the sampling
       temperature (:func:`completion_logprobs`, the same ``token_logprobs`` the sampler uses), the
       frozen reference gives π_ref (only when β > 0; β = 0 keeps no copy), :func:`grpo_loss`,
       backward (micro-batches accumulate exactly for every loss mode), clip, AdamW.

No train/inference mismatch correction is applied or needed: the engine and the trainer run one
model definition in float32, so the engine's log-probs equal the recomputed ones up to float
rounding (``tests/test_grpo.py`` checks ≤ 1e-5); with μ = 1 the ratio starts at 1.

MoE routing during RL: the routers' ``e_score_correction_bias`` (V3's auxiliary-loss-free balancing)
stays FIXED unless ``bias_update_speed`` > 0. Balancing is a pretraining concern (it keeps experts
busy across trillions of tokens); RL runs few, narrow prompts, and moving the biases on that skewed
load would re-route tokens under the policy's feet and change log-probs outside the gradient.

Run directory (``--out``), the same machinery as pretraining::

    grpo_config.json    the GRPORunConfig of the run
    tokenizer/          a copy of the initial checkpoint's tokenizer
    checkpoints/        step_XXXXXXXX/ (nanoseek.train.checkpoint; step 0 = the initial policy)
    metrics.jsonl       one record per step (stage "grpo")
    samples.jsonl       a few (prompt, completion, reward) every ``samples_every`` steps
    incidents.jsonl     what the RL guard saw (nanoseek.rl.guard)
    cost.json           device-hours and $ (stage "grpo")
    final/              the last checkpoint's model + tokenizer, self-contained
                        (:func:`~nanoseek.train.checkpoint.publish_final`, as pretraining)

A metrics.jsonl record (stage "grpo"): ``reward`` (mean, shaped) / ``reward_std``, ``accuracy`` and
``format_rate`` (the accuracy and format rewards whatever reward trains), ``response_length`` (mean
generated tokens) / ``response_length_max``, ``truncation_rate`` (finish_reason "length"),
``zero_variance_frac``, ``groups_kept`` / ``groups_dropped`` / ``update_skipped`` (dynamic sampling),
``kl`` (k3 to the reference; null when β = 0), ``clip_low`` / ``clip_high`` / ``ratio_mean``,
``entropy`` (mean token entropy of the sampling distribution on every sampled completion),
``repetition_frac``, ``reward_errors`` (completions whose reward raised), ``loss``, ``grad_norm``,
``lr``, ``samples`` / ``tokens`` / ``samples_per_s`` / ``tokens_per_s`` (whole step), ``rollout_s``,
``step_s``, ``screen_reward`` (the mean greedy reward of the screened candidates; null without
screening), ``action`` (the RL guard's), ``batch``, and
``eval_accuracy`` (+ format rate, length) every ``eval_every`` steps. The cost meter counts samples and
prompt + completion tokens (what the training forward processes).

Exact resume: the problems and sampling seeds are functions of (seed, batch), the weights, AdamW
state, guard and cost states come from the checkpoint, the reference model is reloaded from
``init_from``, and metrics/samples records after the checkpoint are truncated, so ``--resume``
reproduces the metrics of an uninterrupted run (same machine and thread count).

The settings live in :mod:`nanoseek.rl.config`, the sampling of a step in :mod:`nanoseek.rl.rollout`,
the run machinery (checkpoints, resume, rollback, bookkeeping) in :mod:`nanoseek.train.run`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.tokenizer import check_vocab, load_tokenizer
from ..device import device_name, pick_device
from ..fp8_training import convert_to_fp8
from ..errors import ConfigError, NanoseekError
from ..hf import load_with_tokenizer
from ..infer.engine import Engine
from ..model import update_routing_bias
from ..tasks import get_reward, get_task
from ..tasks.base import parse_task_spec
from ..tasks.evaluate import evaluate, prompt_builder
from ..train import distributed as dist
from ..train.checkpoint import install_tokenizer, load_model, read_trainer_state
from ..train.cost import CostMeter
from ..train.optim import build_optimizer, train_top_layers
from ..train.run import (RunTrainer, absolute_path, finite, format_line, peak_memory_bytes, resolve_settings,
                         run_lock, silent, start_run_dir)
from .config import CONFIG_FILE, STAGE, GRPORunConfig, build_run_config
from .guard import RLGuard
from .objective import dynamic_sampling_mask, group_advantages, grpo_loss, zero_variance_fraction
from .rollout import REWARD_ON_ERROR, Rollout, StepSamples, _mean, completion_logprobs, sample_rollout

# ----------------------------------------------------------------------------- the trainer
class GRPOTrainer(RunTrainer):
    """Holds one GRPO run; :meth:`train` runs it to ``cfg.steps``. Checkpoints, resume, rollback,
    cost, metrics, report and ``final/`` come from :class:`~nanoseek.train.run.RunTrainer`."""

    stage = STAGE

    def __init__(self, cfg: GRPORunConfig, run_dir: Path, resume: bool, log: Callable = print):
        super().__init__()
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.keep_last = cfg.keep_last
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.logs = {"metrics_bytes": self.metrics_path, "samples_bytes": self.samples_path}
        self.objective = cfg.objective()
        self.task = get_task(cfg.task)
        self.reward_fn = get_reward(cfg.reward)
        self.device = dist.local_device(pick_device(cfg.device))  # cuda:LOCAL_RANK etc. under torchrun
        n_ranks = dist.world_size()
        if cfg.prompts_per_step % n_ranks:
            raise ConfigError(f"prompts_per_step {cfg.prompts_per_step} is the global count: it must divide "
                              f"evenly over the {n_ranks} processes")
        share = cfg.prompts_per_step // n_ranks
        self.prompts = range(dist.rank() * share, (dist.rank() + 1) * share)  # this rank's problems of a step
        self.tok_dir = run_dir / "tokenizer"
        self.ckpt = self.pick_checkpoint() if resume else None  # the newest that verifies
        state = read_trainer_state(self.ckpt) if self.ckpt is not None else None

        if state is None:
            if dist.is_main():
                install_tokenizer(cfg.init_from, self.tok_dir)
            dist.barrier()
            model, _ = load_with_tokenizer(cfg.init_from, "cpu", "float32")
        else:
            model = load_model(self.ckpt, "cpu", verify=False)  # verified by pick_checkpoint
        self.tokenizer = load_tokenizer(self.tok_dir)
        try:
            check_vocab(self.tokenizer.vocab_size, model.config.vocab_size)
        except ValueError as exc:
            raise ConfigError(f"{cfg.init_from}: vocabulary mismatch: {exc}") from None
        self.ref_model = None
        if self.objective.uses_kl:  # the frozen initial policy (beta = 0 keeps none)
            if state is None:
                ref = copy.deepcopy(model).to(self.device)
            else:
                if not (Path(cfg.init_from) / "config.json").is_file():
                    raise NanoseekError(f"cannot resume: the reference policy {cfg.init_from} (init_from) is gone")
                ref, _ = load_with_tokenizer(cfg.init_from, str(self.device), "float32")
            self.ref_model = ref.eval().requires_grad_(False)
        # GRPO scores the main head only: the MTP modules get no gradient, so they are frozen and the
        # optimizer holds no state for them (FSDP2 refuses to resume trainable parameters without it)
        for module in model.mtp:
            module.requires_grad_(False)
        try:
            self.n_trainable = train_top_layers(model, cfg.train_layers)
        except ValueError as exc:
            raise ConfigError(f"{cfg.init_from}: {exc}") from None
        if cfg.fp8:  # before the sampling copy, FSDP2 and compile: the policy samples as it trains
            convert_to_fp8(model, ue8m0=cfg.fp8_ue8m0)
        # Sampling needs the full weights on every rank and runs a different number of forwards on
        # each, so under FSDP2 it uses a plain copy refreshed after every update; in one process the
        # engine samples from the trained model itself.
        self.policy = copy.deepcopy(model).to(self.device).eval() if n_ranks > 1 else None
        self.model = dist.parallelize(model, self.device).train()  # FSDP2 shards when distributed
        self.policy = self.policy or self.model
        self.forward = torch.compile(self.model) if cfg.compile else self.model  # the update's forward
        self.optimizer = build_optimizer(self.model, cfg, self.device, lr=self.lr_at(0))
        self.routers = self.model.moe_routers()

        tok_vocab = self.tokenizer.vocab_size
        self.n_usable = tok_vocab if tok_vocab < self.model.config.vocab_size else None
        max_seq = cfg.max_seq_len or min(self.model.config.max_position_embeddings, cfg.max_tokens + 1024)
        n = cfg.prompts_per_step * cfg.group_size
        self.engine = Engine(self.policy, self.tokenizer, max_slots=min(cfg.max_slots, n), max_seq_len=max_seq,
                             compile=cfg.compile)
        self.guard = RLGuard(cfg.guard, run_dir / "incidents.jsonl" if dist.is_main() else None, log=log)
        self.cost = CostMeter(run_dir, STAGE, self.device, n_devices=n_ranks,
                              price_per_device_hour=cfg.price_per_device_hour)
        self.batch = 0  # prompts batches drawn so far: never rewound (a rollback moves on to new prompts)
        if state is not None:
            self.restore(self.ckpt, state)
            self.refresh_policy()
        log(f"grpo: {n_ranks} process(es), device {self.device} ({device_name(self.device)}); policy {cfg.init_from} "
            f"({self.model.num_parameters() / 1e6:.2f}M parameters, {self.n_trainable / 1e6:.2f}M trained); "
            f"task {cfg.task}:{cfg.difficulty}, reward {cfg.reward}; {cfg.prompts_per_step} prompts x "
            f"{cfg.group_size} samples, max_tokens {cfg.max_tokens}, T={cfg.temperature}; {cfg.variant}: "
            f"beta {self.objective.beta}, eps {self.objective.eps_low}/{self.objective.eps_high}, "
            f"loss {self.objective.loss_mode}, mu {self.objective.mu}, "
            f"dynamic sampling {'on' if self.objective.dynamic_sampling else 'off'}")

    # ------------------------------------------------------------------ schedule
    def lr_at(self, step_index: int) -> float:
        """Linear warmup over ``warmup_steps`` (step 0 gets lr/warmup), then constant."""
        cfg = self.cfg
        if cfg.warmup_steps > 0 and step_index < cfg.warmup_steps:
            return cfg.lr * (step_index + 1) / cfg.warmup_steps
        return cfg.lr

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"batch": self.batch, "grpo_config": self.cfg.to_dict(), "init_from": self.cfg.init_from}

    def load_extra_state(self, state: dict) -> None:
        self.batch = int(state["batch"])

    def rollback(self, bad_step: int) -> bool:
        """Reload the newest good checkpoint (weights, optimizer, guard windows); the prompt stream
        goes on. False when there is no checkpoint (the step is kept)."""
        state = self.load_checkpoint(bad_step, with_rng=False)
        if state is None:
            self.log(f"guard: step {bad_step}: rollback requested but there is no checkpoint; keeping the step")
            return False
        self.guard.load_state_dict(state["guard"])
        self.refresh_policy()
        self.log(f"guard: continuing with new prompts (batch {self.batch})")
        return True

    def refresh_policy(self) -> None:
        """Give the sampling copy the trained weights (distributed runs; collective)."""
        if self.policy is not self.model:
            dist.copy_full_weights(self.model, self.policy)

    # ------------------------------------------------------------------ rollout
    def rollout(self, batch: int) -> Rollout:
        """Sample batch ``batch`` with the current policy (eval mode while sampling)."""
        self.policy.eval()
        try:
            return sample_rollout(self.engine, self.tokenizer, self.task, self.reward_fn, self.cfg.reward, self.cfg,
                                  self.objective, batch, self.prompts)
        finally:
            self.model.train()

    # ------------------------------------------------------------------ update
    def _micro_batches(self, seqs: list[int]) -> list[list[int]]:
        size = self.cfg.micro_batch_size or len(seqs)
        return [seqs[i:i + size] for i in range(0, len(seqs), size)]

    def _forward(self, model, roll: Rollout, seqs: list[int], with_entropy: bool):
        """``(logp, mask, entropy, expert_load)`` of completions ``seqs`` under ``model``."""
        g = self.objective.group_size
        return completion_logprobs(model, [roll.prompt_ids[n // g] for n in seqs],
                                   [roll.completions[n].token_ids for n in seqs], self.objective.temperature,
                                   self.n_usable, with_entropy, pad_id=self.tokenizer.pad_id or 0,
                                   return_expert_load=True)

    @torch.no_grad()
    def _entropy_only(self, roll: Rollout, seqs: list[int]) -> tuple[float, int]:
        total, count = 0.0, 0
        for micro in self._micro_batches(seqs):
            _, mask, ent, _ = self._forward(self.policy, roll, micro, True)  # the plain copy: no collectives
            total += float(ent.sum())
            count += int(mask.sum())
        return total, count

    def update(self, roll: Rollout, step_index: int) -> dict:
        """Advantages, dynamic sampling and the μ × minibatches optimizer steps of one GRPO step.

        Distributed: each rank holds whole groups (its share of the prompts); every normaliser
        (sequences and tokens per minibatch) is the global one and FSDP2 averages gradients over
        ranks, so the update equals the one-process update up to float summation order. Ranks run
        the same number of forwards (a rank short of micro-batches runs one at weight 0)."""
        cfg, obj = self.cfg, self.objective
        g, n_ranks = obj.group_size, dist.world_size()
        n_groups = len(roll.problems)
        adv = group_advantages(roll.rewards, g, scale_by_std=obj.scale_adv_by_std)
        keep = (dynamic_sampling_mask(roll.rewards, g) if obj.dynamic_sampling
                else torch.ones(n_groups, dtype=torch.bool))
        kept = [i for i in range(n_groups) if bool(keep[i])]
        dropped = [i for i in range(n_groups) if not bool(keep[i])]
        n_kept = sum(dist.gather_json(len(kept)))
        out: dict[str, Any] = {"groups_kept": n_kept, "groups_dropped": len(roll.problems) * n_ranks - n_kept}
        lr = self.lr_at(step_index)
        out["lr"] = lr
        sums = torch.zeros(7, dtype=torch.float64)  # entropy, entropy tokens, kl, clip_low, clip_high, ratio, tokens
        if dropped:  # entropy covers every sampled completion, not only the ones trained on
            sums[0], sums[1] = self._entropy_only(roll, [i * g + j for i in dropped for j in range(g)])
        if not n_kept:
            sums = dist.all_reduce_sum(sums)
            out.update(update_skipped=True, entropy=float(sums[0] / sums[1]) if sums[1] else None)
            return out
        n_mb = min(cfg.minibatches, n_kept)
        bounds = [round(k * len(kept) / n_mb) for k in range(n_mb + 1)]
        minibatches = [[i * g + j for i in kept[bounds[k]:bounds[k + 1]] for j in range(g)] for k in range(n_mb)]
        ref_cache: dict[tuple, torch.Tensor] = {}
        losses, norms, skipped = [], [], 0
        for epoch in range(obj.mu):
            for mb in minibatches:
                micros = self._micro_batches(mb)
                sizes = dist.gather_json([len(mb), sum(len(roll.completions[n].token_ids) for n in mb), len(micros)])
                mb_seqs, mb_tokens = sum(s[0] for s in sizes), sum(s[1] for s in sizes)
                micros += [None] * (max(s[2] for s in sizes) - len(micros))
                mb_loss = torch.zeros((), dtype=torch.float64)
                load = None
                for micro in micros:
                    if micro is None:  # keep the collectives of the ranks in step: a forward at weight 0
                        logp, mask, _, _ = self._forward(self.forward, roll, [0], False)
                        (logp.sum() * 0.0).backward()
                        continue
                    logp, mask, ent, micro_load = self._forward(self.forward, roll, micro, epoch == 0)
                    if epoch == 0:
                        sums[0] += float(ent.sum())
                        sums[1] += int(mask.sum())
                    old = torch.zeros(logp.shape, dtype=torch.float32)  # π_old: the engine's log-probs
                    for r, n in enumerate(micro):
                        lps = roll.completions[n].logprobs
                        old[r, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
                    old = old.to(logp.device)
                    ref = None
                    if self.ref_model is not None:
                        key = tuple(micro)
                        if key not in ref_cache:
                            with torch.no_grad():
                                ref_cache[key] = self._forward(self.ref_model, roll, micro, False)[0]
                        ref = ref_cache[key]
                    loss, stats = grpo_loss(logp, old, ref, adv[micro].to(logp.device), mask, beta=obj.beta,
                                            eps_low=obj.eps_low, eps_high=obj.eps_high,
                                            loss_mode=obj.loss_mode, max_len=obj.loss_max_len)
                    n_tok = int(mask.sum())
                    weight = n_tok / mb_tokens if obj.loss_mode == "token_mean" else len(micro) / mb_seqs
                    (loss * weight * n_ranks).backward()  # FSDP2 averages gradients over the ranks
                    mb_loss += float(loss.detach()) * weight
                    for k, key in enumerate(("kl", "clip_low", "clip_high", "ratio_mean")):
                        sums[2 + k] += float(stats[key]) * n_tok
                    sums[6] += n_tok
                    if cfg.bias_update_speed > 0 and micro_load is not None:
                        load = micro_load if load is None else load + micro_load
                mb_loss = float(dist.all_reduce_sum(mb_loss))
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = float(dist.clip_grad_norm_(self.model.parameters(), max_norm))  # the global norm
                if math.isfinite(norm) and math.isfinite(mb_loss):
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    self.optimizer.step()
                    load = dist.all_reduce_sum(load)
                    if cfg.bias_update_speed > 0 and load is not None:
                        for router, layer_load in zip(self.routers, load):
                            update_routing_bias(router, layer_load, cfg.bias_update_speed)
                    self.refresh_policy()
                else:
                    skipped += 1
                    self.log(f"warning: step {step_index + 1}: non-finite loss/grad norm ({mb_loss}, {norm}); "
                             f"optimizer step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(mb_loss)
                norms.append(norm)
        sums = dist.all_reduce_sum(sums)
        out.update(update_skipped=False, optimizer_steps=len(losses) - skipped, loss=finite(_mean(losses)),
                   grad_norm=finite(max(norms)), entropy=float(sums[0] / sums[1]) if sums[1] else None)
        for k, key in enumerate(("kl", "clip_low", "clip_high", "ratio_mean")):
            out[key] = float(sums[2 + k] / max(float(sums[6]), 1.0))
        if self.ref_model is None:
            out["kl"] = None
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        """Held-out accuracy, format rate and answer length of the current policy (rank 0 evaluates)."""
        cfg = self.cfg
        self.policy.eval()
        try:
            res = evaluate(self.engine, self.tokenizer, self.task, n_problems=cfg.eval_n, difficulty=cfg.difficulty,
                           max_tokens=cfg.eval_max_tokens or cfg.max_tokens, seed=cfg.seed,
                           prompt_fn=prompt_builder(self.tokenizer, cfg.prompt_format))
        finally:
            self.model.train()
        return {"eval_accuracy": res.accuracy, "eval_format_rate": res.format_rate,
                "eval_response_length": res.mean_length}

    # ------------------------------------------------------------------ the loop
    def _record(self, step: int, action: str, roll: Rollout, seen: StepSamples, upd: dict, t_step: float) -> dict:
        obj = self.objective
        n = seen.n
        gen_tokens = sum(seen.lengths)
        rec: dict[str, Any] = {
            "stage": STAGE, "step": step, "action": action, "batch": roll.batch,
            "reward": float(seen.rewards.mean()), "reward_std": float(seen.rewards.std()) if n > 1 else 0.0,
            **seen.signals(), "response_length_max": max(seen.lengths),
            "zero_variance_frac": float(zero_variance_fraction(seen.rewards, obj.group_size)),
            "groups_kept": upd["groups_kept"], "groups_dropped": upd["groups_dropped"],
            "update_skipped": upd["update_skipped"], "kl": finite(upd.get("kl")),
            "clip_low": upd.get("clip_low"), "clip_high": upd.get("clip_high"),
            "ratio_mean": upd.get("ratio_mean"), "entropy": finite(upd.get("entropy")),
            "loss": upd.get("loss"), "grad_norm": upd.get("grad_norm"), "lr": upd["lr"],
            "repetition_frac": self.guard.last_repetition, "reward_none": seen.reward_none,
            "reward_errors": len(seen.reward_errors),
            "samples": n, "tokens": gen_tokens,
            "samples_per_s": n / t_step if t_step > 0 else None,
            "tokens_per_s": gen_tokens / t_step if t_step > 0 else None,
            "rollout_s": roll.seconds, "step_s": t_step, "screen_reward": roll.screen_reward,
            "peak_mem_bytes": peak_memory_bytes(self.device),
            "elapsed": self.elapsed(),
        }
        return rec

    def _write_samples(self, step: int, roll: Rollout) -> None:
        """A few (prompt, completion, reward) of this rank's share (rank 0: the step's first prompts)."""
        if not dist.is_main():
            return
        g = self.objective.group_size
        with open(self.samples_path, "a", encoding="utf-8") as fh:
            for i in range(min(self.cfg.samples_per_log, len(roll.problems))):
                c = roll.completions[i * g]
                fh.write(json.dumps({"step": step, "prompt": roll.problems[i].prompt, "answer": roll.problems[i].answer,
                                     "completion": c.text, "reward": float(roll.rewards[i * g]),
                                     "length": len(c.token_ids), "finish_reason": c.finish_reason}) + "\n")

    def train(self) -> dict:
        """Run to ``cfg.steps`` (from the restored step when resuming); returns the run's summary."""
        cfg = self.cfg
        self._t_start = time.perf_counter()
        self.last_eval: dict = {}
        if self.ckpt is None:
            self.log(f"checkpoint: {self.save()} (initial policy)")
        self.run_steps(cfg.steps, self._train_step)
        final, report = self.finish(report=cfg.report)
        self.log(f"done: {self.step} GRPO steps; final policy {final}")
        return {"step": self.step, "final": final, "run_dir": self.run_dir, "report": report,
                "eval_accuracy": self.last_eval.get("eval_accuracy"), "incidents": dict(self.guard.counts)}

    def _train_step(self, step_no: int, say: Callable[[str], Any], metrics) -> bool:
        """Sample, update, judge (see the module docstring); False when the guard rolled back."""
        cfg = self.cfg
        t0 = time.perf_counter()
        roll = self.rollout(self.batch)
        seen = StepSamples.gather(roll, dist.gather_json)  # every rank's samples, for metrics and guard
        self.batch += 1
        if seen.reward_errors:
            self.guard.note_reward_errors(step_no, seen.reward_errors, seen.n, REWARD_ON_ERROR)
        upd = self.update(roll, self.step)
        self.cost.add_samples(seen.n)
        self.cost.add_tokens(seen.tokens_processed)
        t_step = time.perf_counter() - t0
        signals = {**seen.signals(), "kl": upd.get("kl"), "entropy": upd.get("entropy")}
        decision = self.guard.check(step_no, signals, seen.token_ids)
        action = decision.action
        if action == "rollback":
            # the offending step's record first: the rollback may stop the run (max_rollbacks)
            self.write_record(metrics, self._record(step_no, action, roll, seen, upd, t_step))
            if self.rollback(step_no):
                return False
        self.guard.accept(signals)
        self.step += 1
        rec = self._record(self.step, action, roll, seen, upd, t_step)
        if upd["update_skipped"]:
            say(f"step {self.step}: all {upd['groups_kept'] + upd['groups_dropped']} groups have zero "
                f"reward variance: update skipped")
        elif upd["groups_dropped"]:
            rec["note"] = f"dynamic sampling dropped {upd['groups_dropped']} zero-variance groups"
        if cfg.eval_every and dist.is_main() and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
            self.last_eval = self.evaluate()
            rec.update(self.last_eval)
        if self.step == 1 or self.step % cfg.samples_every == 0 or self.step == cfg.steps:
            self._write_samples(self.step, roll)
        self.write_record(metrics, rec)
        say(self._line(rec))
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
            say(f"checkpoint: {self.save()}")
        return True

    def _line(self, r: dict) -> str:
        kept = f"{r['groups_kept']}/{r['groups_kept'] + r['groups_dropped']}"
        fields = [("reward", r.get("reward"), ".3f"), ("acc", r.get("accuracy"), ".3f"),
                  ("fmt", r.get("format_rate"), ".2f"), ("len", r.get("response_length"), ".1f"),
                  ("kl", r.get("kl"), ".4f"), ("ent", r.get("entropy"), ".3f"), ("kept", kept, ""),
                  ("", f"{r['samples_per_s']:.1f} samples/s" if r.get("samples_per_s") is not None else None, "")]
        if r.get("eval_accuracy") is not None:
            fields.append(("eval acc", r["eval_accuracy"], ".3f"))
        return format_line(r["step"], self.cfg.steps, fields, r["action"])


# ----------------------------------------------------------------------------- entry points
def resolve_run_config(run_dir: Path, overrides: dict[str, Any], resume: bool,
                       log: Callable = print) -> GRPORunConfig:
    """The run's settings: built from ``overrides`` (fresh) or read from ``grpo_config.json``
    (resume: only resumable settings may change; see :func:`~nanoseek.train.run.resolve_settings`)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "init_from" in overrides:
        overrides["init_from"] = absolute_path(overrides["init_from"])
    if resume and "task" in overrides:
        overrides["task"], diff = parse_task_spec(overrides["task"], flag="--task")
        if diff is not None:
            overrides["difficulty"] = diff

    def build(fields: dict[str, Any]) -> GRPORunConfig:
        if fields.get("init_from") is None:
            raise NanoseekError("--init-from is required: the checkpoint directory of the policy to train "
                                "(an SFT or pretraining checkpoint with its tokenizer)")
        return build_run_config(fields)

    return resolve_settings(run_dir, CONFIG_FILE, GRPORunConfig, overrides, resume, build, log, what="GRPO")


def check_inputs(cfg: GRPORunConfig) -> None:
    """Fail fast, with one clear line, on a bad task, reward or initial checkpoint."""
    get_task(cfg.task)  # RegistryError names the known ones
    get_reward(cfg.reward)
    src = Path(cfg.init_from)
    if not (src / "config.json").is_file():
        raise NanoseekError(f"--init-from {src}: not a checkpoint directory (no config.json there)")
    if not (src / "tokenizer.json").is_file():
        raise NanoseekError(f"--init-from {src}: no tokenizer.json there (GRPO needs the checkpoint's tokenizer)")


def grpo(out: str | os.PathLike, *, resume: bool = False, log: Callable = print, **fields: Any) -> dict:
    """Run (or ``resume``) GRPO into run directory ``out``; ``fields`` are :class:`GRPORunConfig`
    fields (``task`` may be ``"name:difficulty"``, ``guard`` a dict of RLGuardConfig fields,
    ``variant`` "grpo" | "dapo" | "dr_grpo"). Returns a summary dict (step, final, run_dir, report,
    eval_accuracy, incidents)."""
    run_dir = Path(out).expanduser().resolve()
    if not dist.launched_main():  # under torchrun only rank 0 speaks (and writes files)
        log = silent
    cfg = resolve_run_config(run_dir, fields, resume, log)
    check_inputs(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist.init_distributed(pick_device(cfg.device))  # torchrun: join the process group; no-op in one process
    with run_lock(run_dir):
        start_run_dir(run_dir, resume, ("metrics.jsonl", "samples.jsonl", "incidents.jsonl"))
        if dist.is_main():
            cfg.save(run_dir / CONFIG_FILE)
        trainer = GRPOTrainer(cfg, run_dir, resume, log)
        return trainer.train()
