"""The GRPO loop, its RL guard and ``nanoseek grpo`` (tiny model, CPU, short generations)."""

import json
import math

import pytest
import torch

import nanoseek
from nanoseek import load_with_tokenizer, settings
from nanoseek.cli import main
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rl import cli as rl_cli
from nanoseek.rl import config as rl_config
from nanoseek.rl import objective
from nanoseek.rl.config import DEFAULT_POLICIES, POLICY_FIELDS, RLGuardConfig, build_run_config
from nanoseek.rl.grpo import GRPOTrainer, grpo
from nanoseek.rl.guard import RLGuard, fitted_change, repetition_coverage, trend_t
from nanoseek.rl.rollout import completion_logprobs, problem_seed, sample_seed
from nanoseek.tasks import Problem, Task, Verdict, get_task, register_task
from nanoseek.tasks.evaluate import EVAL_SEED_BASE, chat_prompt
from nanoseek.train.optim import train_top_layers
from grpo_toy import SCREEN_REWARD, TASK, first_lower_reward, parity_first_lower_reward, register, tiny_policy

register()
QUIET = dict(log=lambda s: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("init"))


def run_cfg(init_ckpt, **kw):
    base = dict(init_from=str(init_ckpt), task=TASK, reward=TASK, steps=2, prompts_per_step=2, group_size=4,
                max_tokens=4, lr=1e-2, beta=0.0, checkpoint_every=100, report=False, device="cpu")
    base.update(kw)
    return base


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_equal_trainer_recomputed(init_ckpt, temperature):
    model, tok = load_with_tokenizer(str(init_ckpt), "cpu", "float32")
    engine = Engine(model, tok, max_slots=8, max_seq_len=160)
    problems = get_task("arithmetic").generate(3, 3, 1)
    prompt_ids = [tok.encode(chat_prompt(tok, p)) for p in problems]
    assert len({len(p) for p in prompt_ids}) > 1  # ragged prompts: padding is exercised
    prompts = [p for p in prompt_ids for _ in range(3)]
    params = [SamplingParams(temperature=temperature, max_tokens=12, seed=100 + i) for i in range(len(prompts))]
    outs = engine.generate(prompts, params)
    assert len({len(o.token_ids) for o in outs}) >= 1
    with torch.no_grad():
        logp, mask, ent = completion_logprobs(model, prompts, [o.token_ids for o in outs], temperature,
                                              n_usable=tok.vocab_size, with_entropy=True)
    diff = 0.0
    for i, o in enumerate(outs):
        n = len(o.token_ids)
        assert mask[i].sum() == n
        diff = max(diff, (logp[i, :n] - torch.tensor(o.logprobs)).abs().max().item())
    assert diff <= 1e-5, diff
    assert torch.isfinite(ent).all() and (ent[mask] > 0).all()


# ------------------------------------------------------------------------------ learning
def test_grpo_raises_reward_on_a_learnable_task_and_logs_everything(init_ckpt, tmp_path):
    # Measured while developing (lr 1e-2, 20 steps, P=4, G=8): last-5 minus first-5 mean reward
    # 0.64 / 0.73 / 0.71 for seeds 0 / 1 / 2 (beta 0.04: 0.43 / 0.55 / 0.55).
    run = tmp_path / "run"
    summary = grpo(run, **run_cfg(init_ckpt, steps=20, prompts_per_step=4, group_size=8, samples_every=10,
                                  checkpoint_every=10, seed=0), **QUIET)
    recs = records(run)
    assert [r["step"] for r in recs] == list(range(1, 21))
    rewards = [r["reward"] for r in recs]
    margin = sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5
    assert margin > 0.3, rewards
    needed = ("stage", "step", "reward", "reward_std", "accuracy", "format_rate", "response_length",
              "response_length_max", "truncation_rate", "zero_variance_frac", "kl", "clip_low", "clip_high",
              "entropy", "samples_per_s", "tokens_per_s", "lr", "loss", "grad_norm", "groups_kept")
    for r in recs:
        assert all(k in r for k in needed), set(needed) - set(r)
        assert r["stage"] == "grpo" and r["lr"] == 1e-2 and r["kl"] is None  # beta 0: no reference
        assert 0 <= r["truncation_rate"] <= 1 and r["response_length_max"] <= 4
        assert r["entropy"] > 0 and r["samples_per_s"] > 0
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 10, 20} and all("completion" in s and "reward" in s for s in samples)
    cost = json.loads((run / "cost.json").read_text())["stages"]["grpo"]
    assert cost["samples"] == 20 * 32 and cost["tokens"] > 0
    assert summary["step"] == 20 and (run / "final" / "model.safetensors").is_file()
    assert (run / "final" / "tokenizer.json").is_file()
    final, _ = load_with_tokenizer(str(run / "final"), "cpu", "float32")  # self-contained
    assert final.config.vocab_size == nanoseek.ModelConfig.from_json(init_ckpt / "config.json").vocab_size
    state = json.loads((run / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
    assert {"step", "batch", "guard", "cost", "grpo_config", "metrics_bytes"} <= set(state)


def test_seeds_are_deterministic_and_below_the_eval_range():
    seeds = {problem_seed(s, b) for s in range(3) for b in range(200)}
    assert len(seeds) == 600 and max(seeds) < EVAL_SEED_BASE
    per_sample = {sample_seed(0, 5, p, g) for p in range(16) for g in range(16)}
    assert len(per_sample) == 256 and sample_seed(0, 5, 1, 2) == sample_seed(0, 5, 1, 2)


# ------------------------------------------------------------------------------ reference model
def test_beta_keeps_a_frozen_reference_and_zero_beta_keeps_none(init_ckpt, tmp_path):
    cfg = build_run_config(run_cfg(init_ckpt, beta=0.04, steps=2, prompts_per_step=4, group_size=8))
    (tmp_path / "a").mkdir()
    trainer = GRPOTrainer(cfg, tmp_path / "a", False, log=lambda s: None)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    before_ref = [p.detach().clone() for p in trainer.ref_model.parameters()]
    before_pol = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before_ref, trainer.ref_model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_pol, trainer.model.parameters()))
    recs = records(tmp_path / "a")
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # first update: policy == reference
    assert recs[1]["kl"] > 0
    (tmp_path / "b").mkdir()
    no_ref = GRPOTrainer(build_run_config(run_cfg(init_ckpt, beta=0.0)), tmp_path / "b", False, log=lambda s: None)
    assert no_ref.ref_model is None


# ------------------------------------------------------------------------------ dynamic sampling
def test_dynamic_sampling_drops_zero_variance_groups(init_ckpt, tmp_path):
    cfg = build_run_config(run_cfg(init_ckpt, prompts_per_step=4, group_size=4, variant="dapo"))
    assert cfg.dynamic_sampling and cfg.loss_mode == "token_mean" and cfg.eps_high == 0.28
    trainer = GRPOTrainer(cfg, tmp_path, False, log=lambda s: None)
    roll = trainer.rollout(0)
    # scripted rewards: group 0 all right, group 1 all wrong, groups 2 and 3 mixed
    roll.rewards = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.float32)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    upd = trainer.update(roll, 0)
    assert (upd["groups_kept"], upd["groups_dropped"], upd["update_skipped"]) == (2, 2, False)
    assert upd["optimizer_steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # no group left: the update is skipped and the weights stay
    roll.rewards = torch.tensor([1.0] * 8 + [0.0] * 8)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    upd = trainer.update(roll, 1)
    assert upd["update_skipped"] and upd["groups_kept"] == 0 and upd["entropy"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # without dynamic sampling every group stays (zero-variance ones with zero advantage)
    trainer.objective = trainer.objective.with_(dynamic_sampling=False)
    assert trainer.update(roll, 2)["groups_kept"] == 4


# ------------------------------------------------------------------------------ the RL guard
def feed(guard, series, completions=None):
    """Check then accept each step's signals; returns the actions."""
    actions = []
    for step, signals in enumerate(series, start=1):
        d = guard.check(step, signals, completions)
        actions.append(d.action)
        if d.action != "rollback":
            guard.accept(signals)
    return actions


def calm(n, **over):
    out = []
    for i in range(n):
        wiggle = 0.01 * ((i * 7) % 5 - 2)
        s = {"accuracy": 0.4 + wiggle, "format_rate": 0.6 - wiggle, "response_length": 50 + 10 * wiggle,
             "truncation_rate": 0.05, "kl": 0.01 + wiggle / 10, "entropy": 1.5 + wiggle}
        s.update({k: (v(i) if callable(v) else v) for k, v in over.items()})
        out.append(s)
    return out


def test_guard_is_quiet_on_calm_and_on_healthy_learning(tmp_path):
    guard = RLGuard(RLGuardConfig(), tmp_path / "incidents.jsonl", log=lambda s: None)
    assert set(feed(guard, calm(30))) == {"ok"}
    learning = calm(30, accuracy=lambda i: 0.1 + 0.02 * i, format_rate=lambda i: 0.2 + 0.02 * i,
                    entropy=lambda i: 1.5 - 0.01 * i)
    guard = RLGuard(RLGuardConfig(), None, log=lambda s: None)
    assert set(feed(guard, learning, [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 4)) == {"ok"}
    assert not (tmp_path / "incidents.jsonl").exists()


WARN_ALL = {name: "warn" for name in POLICY_FIELDS}


@pytest.mark.parametrize("kind,series,completions", [
    ("reward_hacking", calm(16, format_rate=lambda i: 0.1 + 0.05 * i, accuracy=lambda i: 0.5 - 0.02 * i), None),
    ("length_explosion", calm(10) + calm(1, response_length=200), None),
    ("length_explosion", calm(10) + calm(1, truncation_rate=0.8), None),
    ("kl_blowup", calm(10) + calm(1, kl=0.5), None),
    ("kl_blowup", calm(1, kl=3.0), None),
    ("entropy_collapse", calm(10) + calm(1, entropy=0.5), None),
    ("entropy_collapse", calm(1, entropy=0.001), None),
    ("repetition", calm(1), [[7] * 10, [1, 2, 1, 2, 1, 2, 1, 2, 1, 2], [3, 4, 5, 6, 7, 8, 9, 10]]),
])
def test_guard_detectors_fire_on_synthetic_series(tmp_path, kind, series, completions):
    lines = []
    path = tmp_path / "incidents.jsonl"
    guard = RLGuard(RLGuardConfig(**WARN_ALL), path, log=lines.append)
    actions = feed(guard, series, completions)
    assert "warn" in actions and set(actions) <= {"ok", "warn"}
    incidents = [json.loads(x) for x in path.read_text().splitlines()]
    assert [i["kind"] for i in incidents] == [kind]
    step = actions.index("warn") + 1
    assert incidents[0]["step"] == step and (kind == "reward_hacking" or step == len(series))
    assert set(incidents[0]) == {"time", "step", "kind", "value", "threshold", "detail", "action"}
    assert lines == [f"[guard] step {step}: {kind}: {incidents[0]['detail']} -> warn"]


def test_guard_rollback_policy_state_and_limit(tmp_path):
    cfg = RLGuardConfig(on_entropy="rollback", max_rollbacks=1)
    guard = RLGuard(cfg, tmp_path / "incidents.jsonl", log=lambda s: None)
    assert feed(guard, calm(6)) == ["ok"] * 6
    state = json.loads(json.dumps(guard.state_dict()))
    decision = guard.check(7, calm(1, entropy=0.001)[0])
    assert decision.action == "rollback" and not decision.apply_update
    guard.note_rollback(7, 5)
    fresh = RLGuard(cfg, None, log=lambda s: None)
    fresh.load_state_dict(state)
    assert fresh.windows["entropy"].values == guard.windows["entropy"].values
    with pytest.raises(NanoseekError, match="rollbacks"):
        guard.note_rollback(8, 5)
    with pytest.raises(Exception, match="on_kl"):
        RLGuardConfig(on_kl="skip")


def test_guard_helpers():
    assert repetition_coverage([7, 7, 7, 7]) == 1.0
    assert repetition_coverage([1, 2, 1, 2, 1, 2, 5, 6]) == 6 / 8
    assert repetition_coverage([1, 2, 3, 4, 5]) == 0.0 and repetition_coverage([]) == 0.0
    assert fitted_change([0.0, 1.0, 2.0, 3.0]) == pytest.approx(3.0)
    assert fitted_change([1.0, 1.0, 1.0]) == 0.0


def test_guard_rollback_in_the_loop_moves_on_to_new_prompts(init_ckpt, tmp_path):
    guard = dict(on_entropy="rollback", entropy_floor=100.0, max_rollbacks=1)  # entropy always "collapsed"
    with pytest.raises(NanoseekError, match="rollbacks"):
        grpo(tmp_path, **run_cfg(init_ckpt, guard=guard), **QUIET)
    recs = records(tmp_path)
    assert [(r["step"], r["action"], r["batch"]) for r in recs] == [(1, "rollback", 0), (1, "rollback", 1)]
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "incidents.jsonl").read_text().splitlines()]
    assert kinds == ["entropy_collapse", "rollback", "entropy_collapse", "rollback"]


# ------------------------------------------------------------------------------ resume
DETERMINISTIC = ("reward", "reward_std", "accuracy", "format_rate", "response_length", "truncation_rate",
                 "zero_variance_frac", "kl", "clip_low", "clip_high", "entropy", "loss", "grad_norm", "batch")


def test_resume_reproduces_the_uninterrupted_run(init_ckpt, tmp_path):
    kw = run_cfg(init_ckpt, beta=0.04, mu=2, checkpoint_every=2)
    grpo(tmp_path / "a", **dict(kw, steps=4), **QUIET)
    grpo(tmp_path / "b", **dict(kw, steps=2), **QUIET)
    with pytest.raises(NanoseekError, match="--resume"):
        grpo(tmp_path / "b", **dict(kw, steps=4), **QUIET)
    with pytest.raises(NanoseekError, match="cannot change"):
        grpo(tmp_path / "b", resume=True, **dict(kw, steps=4, lr=1e-3), **QUIET)
    grpo(tmp_path / "b", resume=True, steps=4, **QUIET)
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in DETERMINISTIC} == {k: rb[k] for k in DETERMINISTIC}
    assert a[3]["kl"] > 0
    wa = nanoseek.load(tmp_path / "a" / "final").state_dict()
    wb = nanoseek.load(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------ CLI
def test_cli_bad_input_exits_2_with_one_line(init_ckpt, tmp_path, capsys):
    assert main(["grpo", "--init-from", str(init_ckpt), "--task", "nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown task 'nope'")
    assert main(["grpo", "--init-from", str(tmp_path / "missing"), "--task", "arithmetic",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --init-from") and "missing" in err[0]
    assert main(["grpo", "--init-from", str(init_ckpt), "--task", "arithmetic", "--reward", "nope",
                 "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown reward 'nope'")
    assert main(["grpo", "--out", str(tmp_path / "r2"), "--resume"]) == 2
    assert "no GRPO checkpoint" in capsys.readouterr().err


def test_cli_runs_a_step_with_the_chosen_options(init_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["grpo", "--init-from", str(init_ckpt), "--task", "arithmetic:2", "--out", str(out), "--steps", "1",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "3", "--dapo",
                 "--guard-policy", "rollback", "--on-kl", "warn", "--no-report", "--device", "cpu"]) == 0
    assert "final policy" in capsys.readouterr().out
    cfg = json.loads((out / "grpo_config.json").read_text())
    assert (cfg["task"], cfg["difficulty"], cfg["variant"], cfg["beta"], cfg["eps_high"]) == \
        ("arithmetic", 2, "dapo", 0.0, 0.28)
    assert cfg["guard"]["on_entropy"] == "rollback" and cfg["guard"]["on_kl"] == "warn"
    assert records(out)[0]["step"] == 1


def test_cli_flags_come_from_the_settings_declarations():
    """Each flag's help shows its field's default, and the guard's per-detector flags are exactly its
    policy fields: nothing is declared twice, so nothing can drift."""
    import argparse

    parser = argparse.ArgumentParser()
    rl_cli.add_grpo_arguments(parser)
    actions = {a.dest: a for a in parser._actions}
    for name in POLICY_FIELDS:
        assert f"(default: {DEFAULT_POLICIES[name]})" in actions[name].help
        assert tuple(actions[name].choices) == rl_config.RL_POLICIES
    assert "(default: 0.04)" in actions["beta"].help and "(default: 16)" in actions["prompts_per_step"].help
    assert tuple(actions["loss_mode"].choices) == objective.LOSS_MODES
    assert {name: getattr(RLGuardConfig(), name) for name in POLICY_FIELDS} == DEFAULT_POLICIES
    args = parser.parse_args(["--out", "x", "--beta", "0.1", "--no-std-scaling"])
    assert settings.given(args, rl_config.GRPORunConfig) == {"beta": 0.1, "scale_adv_by_std": False}


def test_config_validation(init_ckpt):
    with pytest.raises(Exception, match="difficulty"):
        build_run_config(run_cfg(init_ckpt, task="arithmetic:x"))
    with pytest.raises(Exception, match="minibatches"):
        build_run_config(run_cfg(init_ckpt, minibatches=3))
    dr = build_run_config(run_cfg(init_ckpt, variant="dr_grpo", max_tokens=6))
    assert dr.loss_mode == "constant" and dr.loss_max_len == 6 and not dr.scale_adv_by_std
    assert math.isclose(build_run_config(run_cfg(init_ckpt, variant="dapo", beta=0.01)).beta, 0.01)


def test_router_biases_stay_fixed_unless_a_bias_update_speed_is_given(init_ckpt, tmp_path):
    for speed, moved in ((0.0, False), (0.01, True)):
        cfg = build_run_config(run_cfg(init_ckpt, prompts_per_step=2, group_size=4, bias_update_speed=speed))
        (tmp_path / str(speed)).mkdir()
        trainer = GRPOTrainer(cfg, tmp_path / str(speed), False, log=lambda s: None)
        before = [r.e_score_correction_bias.clone() for r in trainer.routers]
        roll = trainer.rollout(0)
        roll.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
        assert trainer.update(roll, 0)["optimizer_steps"] == 1
        changed = any(not torch.equal(a, r.e_score_correction_bias) for a, r in zip(before, trainer.routers))
        assert changed == moved


def test_guard_warnings_are_reported_when_they_start_not_every_step(tmp_path):
    path = tmp_path / "incidents.jsonl"
    guard = RLGuard(RLGuardConfig(), path, log=lambda s: None)
    series = calm(3) + calm(3, entropy=0.001) + calm(2) + calm(1, entropy=0.001)
    assert feed(guard, series) == ["ok"] * 3 + ["warn", "ok", "ok"] + ["ok"] * 2 + ["warn"]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [4, 9]


def test_a_policy_that_starts_below_the_entropy_floor_is_reported_once(tmp_path):
    path = tmp_path / "incidents.jsonl"
    guard = RLGuard(RLGuardConfig(), path, log=lambda s: None)
    low = calm(12, entropy=lambda i: 0.02 + 0.012 * (i % 2))  # a confident SFT policy: 0.020 / 0.032
    assert feed(guard, low) == ["warn"] + ["ok"] * 11
    (incident,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert incident["step"] == 1 and "starts below the floor 0.03" in incident["detail"]
    assert feed(guard, calm(1, entropy=0.005)) == ["warn"]  # a fast fall is still reported


def test_a_policy_that_hovers_at_the_entropy_floor_is_reported_once_per_window(tmp_path):
    path = tmp_path / "incidents.jsonl"
    cfg = RLGuardConfig()
    guard = RLGuard(cfg, path, log=lambda s: None)
    hover = calm(1, entropy=0.05) + calm(15, entropy=lambda i: (0.028, 0.036, 0.033)[i % 3])
    assert feed(guard, hover) == ["ok", "warn"] + ["ok"] * 14
    (incident,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert incident["step"] == 2 and "fell below the floor 0.03" in incident["detail"]
    assert feed(guard, calm(cfg.window, entropy=0.05) + calm(1, entropy=0.028)) == ["ok"] * cfg.window + ["warn"]


@pytest.mark.parametrize("loss_mode", ["sequence_mean", "token_mean", "constant"])
def test_micro_batches_accumulate_to_the_minibatch_gradient(init_ckpt, tmp_path, loss_mode):
    weights = []  # the gradients each run hands to the optimizer
    for micro in (0, 3):
        cfg = build_run_config(run_cfg(init_ckpt, group_size=4, max_tokens=6, loss_mode=loss_mode, loss_max_len=6,
                                       micro_batch_size=micro, grad_clip=0.0, lr=1e-3))
        (tmp_path / str(micro)).mkdir()
        trainer = GRPOTrainer(cfg, tmp_path / str(micro), False, log=lambda s: None)
        roll = trainer.rollout(0)
        roll.rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.optimizer.step = lambda: weights.append([p.grad.clone() if p.grad is not None else None
                                                         for p in params])
        trainer.update(roll, 0)
    full, micro = weights
    assert sum(g is not None for g in full) > 10
    for a, b in zip(full, micro):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_train_layers_updates_only_the_top_of_the_model(init_ckpt, tmp_path):
    model = nanoseek.load(init_ckpt)
    n_layers = model.config.num_hidden_layers
    top = (f"model.layers.{n_layers - 1}.", "model.norm.", "lm_head.")
    n_trainable = train_top_layers(model, 1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(top) for name in trainable)
    top_modules = (model.model.layers[-1], model.model.norm, model.lm_head)
    assert n_trainable == sum(p.numel() for m in top_modules for p in m.parameters())
    assert not any(p.requires_grad for p in model.mtp.parameters())
    untouched = nanoseek.load(init_ckpt)
    assert train_top_layers(untouched, 0) == sum(p.numel() for p in untouched.parameters())
    with pytest.raises(ValueError, match=f"between 0 and {n_layers}"):
        train_top_layers(model, n_layers + 1)

    grpo(tmp_path / "run", **run_cfg(init_ckpt, steps=3, prompts_per_step=4, group_size=8, train_layers=1), **QUIET)
    before = nanoseek.load(init_ckpt).state_dict()
    after = nanoseek.load(tmp_path / "run" / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(top[0]) for k in changed) and all(k.startswith(top) for k in changed)
    with pytest.raises(NanoseekError, match="train_layers"):
        grpo(tmp_path / "bad", **run_cfg(init_ckpt, train_layers=n_layers + 1), **QUIET)
    with pytest.raises(NanoseekError, match="train_layers"):
        build_run_config(run_cfg(init_ckpt, train_layers=-1))


# ------------------------------------------------------------------------------ issue 13, items 8 and 9
def test_default_guard_rolls_back_on_reward_hacking_and_kl_blowup(tmp_path):
    # The defaults were "warn" for every detector, so nothing was ever rolled back.
    assert (DEFAULT_POLICIES["on_hacking"], DEFAULT_POLICIES["on_kl"]) == ("rollback", "rollback")
    cases = {
        "reward_hacking": calm(16, format_rate=lambda i: 0.1 + 0.05 * i, accuracy=lambda i: 0.5 - 0.02 * i),
        "kl_blowup": calm(10) + calm(1, kl=0.5),  # a jump far above the window
    }
    for kind, series in cases.items():
        guard = RLGuard(RLGuardConfig(), tmp_path / f"{kind}.jsonl", log=lambda s: None)
        actions = feed(guard, series)
        first = actions.index("rollback")
        assert set(actions[:first]) == {"ok"}, (kind, actions)
        incident = json.loads((tmp_path / f"{kind}.jsonl").read_text().splitlines()[0])
        assert (incident["kind"], incident["action"], incident["step"]) == (kind, "rollback", first + 1)
    guard = RLGuard(RLGuardConfig(), None, log=lambda s: None)
    assert guard.check(1, calm(1, kl=3.0)[0]).action == "rollback"  # above kl_max: no history needed


# The KL of a learning run (test task, lr 1e-2, beta 0.04, seed 0): it climbs smoothly past kl_max.
CREEPING_KL = [0.0, 0.0237, 0.0254, 0.0537, 0.0542, 0.0699, 0.1025, 0.151, 0.1441, 0.2079, 0.3705, 0.3803,
               0.4607, 0.4547, 0.7011, 0.8461, 1.052, 1.21, 1.35]


def test_default_guard_only_warns_on_what_healthy_runs_also_do(tmp_path):
    for series in (calm(10) + calm(1, response_length=200), calm(10) + calm(1, truncation_rate=0.8),
                   calm(10) + calm(1, entropy=0.5), calm(1, entropy=0.001)):
        guard = RLGuard(RLGuardConfig(), None, log=lambda s: None)
        assert feed(guard, series)[-1] == "warn"
    # a KL that crept above kl_max is reported once and not rolled back: going back replays the drift
    lines = []
    guard = RLGuard(RLGuardConfig(), None, log=lines.append)
    actions = feed(guard, calm(len(CREEPING_KL), kl=lambda i: CREEPING_KL[i]))
    assert actions == ["ok"] * 16 + ["warn", "ok", "ok"], actions
    assert "rose gradually" in lines[0] and lines[0].endswith("-> warn")
    assert guard.check(20, calm(1, kl=2 * CREEPING_KL[-1])[0]).action == "rollback"  # but a jump from there is


def test_default_guard_rolls_back_on_repetition_only_after_healthy_steps(tmp_path):
    loops = [[7] * 10, [1, 2] * 5, [3, 4, 5, 6, 7, 8, 9, 10]]
    fine = [[3, 4, 5, 6, 7, 8, 9, 10]] * 3
    lines = []
    guard = RLGuard(RLGuardConfig(), tmp_path / "incidents.jsonl", log=lines.append)
    assert feed(guard, calm(1), loops) == ["warn"]  # a policy that repeats from the start: no rollback
    assert "no earlier steps to go back to" in lines[-1] and lines[-1].endswith("-> warn")
    guard = RLGuard(RLGuardConfig(), None, log=lines.append)
    assert feed(guard, calm(6), fine) == ["ok"] * 6
    assert guard.check(7, calm(1)[0], loops).action == "rollback"  # it stopped being healthy
    degenerate = RLGuard(RLGuardConfig(), None, log=lines.append)
    assert feed(degenerate, calm(6), loops) == ["warn"] + ["ok"] * 5  # repeated all along
    assert degenerate.check(7, calm(1)[0], loops).action == "ok"  # still the same warning: quiet
    assert feed(degenerate, calm(1), fine) == ["ok"]
    assert degenerate.check(9, calm(1)[0], loops).action == "warn"  # back, but it repeated before
    assert "the policy repeated before" in lines[-1]


def test_default_guard_rolls_back_a_kl_blowup_in_the_loop(init_ckpt, tmp_path):
    # beta > 0 and a tiny kl_max: every update past the first leaves the reference "too far"
    with pytest.raises(NanoseekError, match="rollbacks"):
        grpo(tmp_path, **run_cfg(init_ckpt, beta=0.04, guard=dict(kl_max=1e-4, max_rollbacks=1)), **QUIET)
    assert json.loads((tmp_path / "grpo_config.json").read_text())["guard"]["on_kl"] == "rollback"
    recs = records(tmp_path)
    assert [(r["step"], r["action"]) for r in recs] == [(1, "ok"), (2, "rollback"), (1, "ok"), (2, "rollback")]
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "incidents.jsonl").read_text().splitlines()]
    assert kinds == ["kl_blowup", "rollback", "kl_blowup", "rollback"]


def test_cli_guard_flags_set_one_detector_each(init_ckpt, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("nanoseek.rl.grpo.grpo", lambda out, resume=False, **fields: seen.update(fields) or
                        {"final": "x"})
    base = ["grpo", "--init-from", str(init_ckpt), "--task", "arithmetic", "--out", str(tmp_path / "r")]
    assert main(base + ["--on-hacking", "warn"]) == 0
    assert seen["guard"] == {"on_hacking": "warn"}  # --on-hacking used to set every detector
    seen.clear()
    assert main(base) == 0 and "guard" not in seen  # the RLGuardConfig defaults
    assert main(base + ["--guard-policy", "warn", "--on-kl", "rollback"]) == 0
    assert seen["guard"] == dict(WARN_ALL, on_kl="rollback")


class Flaky:
    """A reward that raises on its ``bad``-th call (0-based) and pays 1 for a lowercase start otherwise."""

    def __init__(self, bad):
        self.bad, self.calls = set(bad), 0

    def __call__(self, prompt, completion, fields):
        self.calls += 1
        if self.calls - 1 in self.bad:
            raise ZeroDivisionError("verifier divided by zero")
        return first_lower_reward(prompt, completion, fields)


def test_a_reward_that_raises_on_one_completion_leaves_the_step_running(init_ckpt, tmp_path):
    cfg = build_run_config(run_cfg(init_ckpt, prompts_per_step=2, group_size=4))
    trainer = GRPOTrainer(cfg, tmp_path, False, log=lambda s: None)
    trainer.reward_fn = Flaky(bad={2})
    roll = trainer.rollout(0)
    assert float(roll.rewards[2]) == 0.0 and trainer.reward_fn.calls == 8
    (err,) = roll.reward_errors
    assert (err["index"], err["check"], err["error"]) == (2, "reward", "ZeroDivisionError")
    assert err["completion"] == roll.completions[2].text[:200] and "divided by zero" in err["message"]

    # in the loop: the step is taken and recorded, the error counted in metrics and incidents
    lines = []
    trainer = GRPOTrainer(cfg, tmp_path / "run", False, log=lines.append)
    trainer.reward_fn = Flaky(bad={2})
    summary = trainer.train()
    recs = records(tmp_path / "run")
    assert [(r["step"], r["action"], r["reward_errors"]) for r in recs] == [(1, "ok", 1), (2, "ok", 0)]
    assert summary["step"] == 2 and summary["incidents"] == {"reward_error": 1}
    (inc,) = [json.loads(x) for x in (tmp_path / "run" / "incidents.jsonl").read_text().splitlines()]
    assert (inc["step"], inc["kind"], inc["action"], inc["value"], inc["error"]) == \
        (1, "reward_error", "warn", 1, "ZeroDivisionError")
    assert inc["completion"] == err["completion"] and "1 of 8 completions" in inc["detail"]
    assert any(line.startswith("[guard] step 1: reward_error:") for line in lines)

    # a reward that raises on every completion is broken itself: the run stops, naming the error
    trainer.reward_fn = Flaky(bad=range(100))
    with pytest.raises(NanoseekError, match="raised on all 8 completions.*ZeroDivisionError"):
        trainer.rollout(5)


def test_a_verifier_that_raises_counts_as_a_wrong_answer(init_ckpt, tmp_path):
    class Broken(Task):
        name = "test_broken_verifier"

        def make_problem(self, rng, difficulty):
            return Problem(prompt=f"Say word {rng.randint(0, 99)}.", answer="x")

        def check(self, answer, fields):
            return Verdict.WRONG

        def grade(self, completion, fields):  # what accuracy_reward calls
            raise RuntimeError("bug in the verifier")

    register_task(Broken(), overwrite=True)
    cfg = build_run_config(run_cfg(init_ckpt, task="test_broken_verifier", reward=TASK))
    trainer = GRPOTrainer(cfg, tmp_path, False, log=lambda s: None)
    roll = trainer.rollout(0)  # the training reward works: the step goes on, accuracy counts as 0
    assert roll.accuracy == 0.0 and len(roll.reward_errors) == 8
    assert {(e["check"], e["error"]) for e in roll.reward_errors} == {("accuracy", "RuntimeError")}
    assert sorted(roll.rewards.tolist()) == sorted(first_lower_reward("", c.text, {}) for c in roll.completions)


def test_final_is_published_from_the_last_checkpoint(init_ckpt, tmp_path, monkeypatch):
    import nanoseek.train.run as run_mod  # the run layer publishes final/ for every stage

    published = []
    real = run_mod.publish_final
    monkeypatch.setattr(run_mod, "publish_final", lambda run_dir, ckpt: published.append(ckpt) or real(run_dir, ckpt))
    run = tmp_path / "run"
    run.mkdir()
    cfg = build_run_config(run_cfg(init_ckpt, steps=3, checkpoint_every=2))
    trainer = GRPOTrainer(cfg, run, False, log=lambda s: None)
    summary = trainer.train()
    last = run / "checkpoints" / "step_00000003"
    assert published == [last] and summary["final"] == run / "final"
    assert sorted(p.name for p in (run / "final").iterdir()) == sorted(p.name for p in (last / "model").iterdir())
    assert (run / "final" / "tokenizer.json").read_bytes() == (init_ckpt / "tokenizer.json").read_bytes()
    model, tok = load_with_tokenizer(str(run / "final"), "cpu", "float32")  # self-contained, with the tokenizer
    assert tok.vocab_size < model.config.vocab_size
    final = nanoseek.load(run / "final").state_dict()
    step = nanoseek.load(last / "model").state_dict()
    live = trainer.model.state_dict()
    assert final.keys() == live.keys()
    assert all(torch.equal(final[k], step[k]) and torch.equal(final[k], live[k].cpu()) for k in final)
    assert not list(run.glob("final.*"))  # no temporary or old copies left


def test_default_guard_does_not_take_sampling_noise_for_reward_hacking(tmp_path):
    # An R1-Zero start: the format is learnt (0.3 -> 0.9 in 20 steps) while accuracy stays at 0.3,
    # measured on 64 samples a step (the cpu speedrun's batch). Without the trend's t-test, 2 of
    # these 12 seeded runs "fell by 0.1" somewhere and would have been rolled back.
    import random

    for seed in range(12):
        rng = random.Random(seed)
        series = [calm(1, accuracy=sum(rng.random() < 0.3 for _ in range(64)) / 64,
                       format_rate=sum(rng.random() < min(0.9, 0.3 + 0.03 * i) for _ in range(64)) / 64)[0]
                  for i in range(50)]
        guard = RLGuard(RLGuardConfig(), None, log=lambda s: None)
        assert "rollback" not in feed(guard, series), seed
    assert trend_t([1.0, 2.0, 3.0]) == math.inf and trend_t([3.0, 2.0, 1.0]) == -math.inf
    assert trend_t([1.0, 1.0, 1.0]) == 0.0 and trend_t([1.0, 2.0]) == 0.0
    assert trend_t([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.6124, abs=1e-4)


def test_fp8_policy_samples_as_it_trains(init_ckpt, tmp_path):
    """--fp8 converts the policy before the engine and the update see it: its GEMMs are FP8 ones, with
    mu = 1 the trainer's recomputed log-probs equal the sampler's (ratio 1), and final/ holds plain
    weights."""
    from nanoseek.fp8_training import Float8BlockLinear

    run = tmp_path / "run"
    run.mkdir()
    trainer = GRPOTrainer(build_run_config(run_cfg(init_ckpt, steps=2, fp8=True)), run, False, log=lambda s: None)
    assert type(trainer.policy.model.layers[0].self_attn.kv_b_proj) is Float8BlockLinear
    trainer.train()
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 2]
    assert abs(recs[0]["ratio_mean"] - 1.0) < 1e-4, recs[0]["ratio_mean"]
    model, _ = load_with_tokenizer(str(run / "final"), "cpu", "float32")
    assert type(model.model.layers[0].self_attn.kv_b_proj) is torch.nn.Linear


def test_base_prompt_format_asks_the_base_model_without_chat_turns(init_ckpt, tmp_path, monkeypatch):
    """R1-Zero straight from a base model: --prompt-format base asks every rollout (and the held-out
    evaluation) with the pretraining document's prefix, not the chat template."""
    from nanoseek.rl import grpo as grpo_module
    from nanoseek.tasks.evaluate import base_prompt, prompt_builder

    asked: list[str] = []
    sampled = grpo_module.sample_rollout

    def spy(*args, **kwargs):
        roll = sampled(*args, **kwargs)
        asked.extend(roll.prompt_texts)
        return roll
    monkeypatch.setattr(grpo_module, "sample_rollout", spy)
    evaluated = []
    monkeypatch.setattr(grpo_module, "evaluate",
                        lambda *a, prompt_fn, **k: evaluated.append(prompt_fn) or type(
                            "R", (), {"accuracy": 0.0, "format_rate": 0.0, "mean_length": 0.0})())
    grpo(tmp_path / "run", **run_cfg(init_ckpt, steps=1, prompt_format="base", eval_every=1), **QUIET)
    problems = get_task(TASK).generate(problem_seed(0, 0), 2, 1)
    assert asked == [base_prompt(p) for p in problems]
    assert evaluated and evaluated[0] is base_prompt
    _, tok = load_with_tokenizer(str(init_ckpt), "cpu")
    assert prompt_builder(tok, "chat")(problems[0]) == chat_prompt(tok, problems[0])
    with pytest.raises(NanoseekError, match="prompt_format"):
        build_run_config(run_cfg(init_ckpt, prompt_format="instruct"))


def test_screening_trains_on_the_candidates_whose_greedy_answer_earns_least(init_ckpt, tmp_path, monkeypatch):
    """--screen-factor K: the step draws K × P candidates, answers each greedily with the policy and
    keeps the P lowest greedy rewards (ties in generation order); recomputed here with a separate
    engine. The reward mixes the prompt's parity (so the order cannot be the generation order) with
    the greedy completion's first letter (so it depends on what the policy answers)."""
    from nanoseek.rl import grpo as grpo_module

    rolls = []
    sampled = grpo_module.sample_rollout
    monkeypatch.setattr(grpo_module, "sample_rollout", lambda *a, **k: rolls.append(sampled(*a, **k)) or rolls[-1])
    cfg = run_cfg(init_ckpt, steps=1, prompts_per_step=3, screen_factor=4, reward=SCREEN_REWARD)
    grpo(tmp_path / "run", **cfg, **QUIET)

    candidates = get_task(TASK).generate(problem_seed(0, 0), 12, 1)
    model, tok = load_with_tokenizer(str(init_ckpt), "cpu", "float32")
    model.eval()
    texts = [chat_prompt(tok, p) for p in candidates]
    greedy = Engine(model, tok).generate([tok.encode(t) for t in texts],
                                         [SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"])] * 12)
    rewards = [parity_first_lower_reward(t, c.text, p.fields) for t, c, p in zip(texts, greedy, candidates)]
    assert len(set(rewards)) > 1
    expected = sorted(range(12), key=rewards.__getitem__)[:3]
    assert [p.prompt for p in rolls[0].problems] == [candidates[i].prompt for i in expected]
    assert all(rewards[i] <= min(rewards[j] for j in range(12) if j not in expected) for i in expected)
    assert records(tmp_path / "run")[0]["screen_reward"] == pytest.approx(sum(rewards) / 12)
    assert len(rolls[0].completions) == 3 * cfg["group_size"]
    with pytest.raises(NanoseekError, match="screen_factor"):
        build_run_config(run_cfg(init_ckpt, screen_factor=0))
