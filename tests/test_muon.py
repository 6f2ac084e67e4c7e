"""Muon (``--optimizer muon``): the Newton-Schulz orthogonalisation, the update rule, which parameters
it takes, exact resume of its state, and a run through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nanoseek
from nanoseek.train import muon
from nanoseek.train.checkpoint import restore_optimizer, save_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.muon import MuonAdamW, muon_param_names, orthogonalize
from nanoseek.train.optim import build_optimizer

from test_pretrain import COMMON, make_corpus, read_metrics, run_cli


@pytest.mark.parametrize("shape", [(32, 32), (48, 16), (16, 48), (3, 24, 40)])
def test_orthogonalize_flattens_the_spectrum_and_keeps_the_singular_vectors(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g = g * torch.logspace(-1, 0.5, shape[-1])  # column scales over 1.5 decades
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.3, s  # quintic NS: ~U Vᵀ up to singular values in ~[0.7, 1.2]
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    # same singular vectors: o ≈ U diag(s') Vᵀ with s' near 1, so Uᵀ o V is diagonal-dominant
    core = u.mT @ o @ vh.mT
    off = core - torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1))
    assert off.abs().max() < 0.05 * torch.diagonal(core, dim1=-2, dim2=-1).abs().min()


def test_orthogonalize_treats_each_stacked_expert_on_its_own():
    g = torch.randn(4, 12, 20, generator=torch.Generator().manual_seed(1))
    g[2] *= 1000.0  # a large expert must not shrink the others' updates
    o = orthogonalize(g)
    for e in range(4):
        torch.testing.assert_close(o[e], orthogonalize(g[e]), rtol=1e-5, atol=1e-5)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny").replace(num_nextn_predict_layers=1))
    names = muon_param_names(model)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert not any("norm" in n for n in names)
    for want in ("self_attn.kv_b_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
                 "mlp.gate.weight", "eh_proj.weight"):
        assert any(n.endswith(want) for n in names), want
    assert {n for n, blocks in names.items() if blocks == 2} == {n for n in names if n.endswith("gate_up_proj")}
    opt = build_optimizer(model, TrainConfig(preset="tiny", optimizer="muon", weight_decay=0.1), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group_names = {by_id[id(p)] for p in group["params"]}
        assert group_names <= names.keys() if group["muon"] else not group_names & names.keys()
        if group["muon"]:
            assert all(names[n] == group["blocks"] for n in group_names)
        if not group["muon"] and any("norm" in n for n in group_names):
            assert group["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len({id(p) for p in model.parameters()})


@pytest.mark.parametrize("ns_steps", [muon.NS_STEPS, 3])
def test_muon_step_follows_the_update_rule_and_the_rest_is_adamw(ns_steps):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16))
    b_ref = torch.nn.Parameter(b.detach().clone())
    lr, wd, mu = 0.02, 0.1, 0.9
    opt = MuonAdamW([{"params": [w], "weight_decay": wd, "muon": True},
                     {"params": [b], "weight_decay": 0.0, "muon": False}], lr=lr, momentum=mu, ns_steps=ns_steps)
    ref = torch.optim.AdamW([b_ref], lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    expected = w.detach().clone()
    buf = torch.zeros_like(expected)
    for step in range(3):
        gw, gb = torch.randn(24, 16), torch.randn(16)
        w.grad, b.grad, b_ref.grad = gw.clone(), gb.clone(), gb.clone()
        opt.step()
        ref.step()
        buf = mu * buf + gw
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(24) * orthogonalize(gw + mu * buf, ns_steps)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach(), b_ref.detach(), rtol=0, atol=0)


def test_the_newton_schulz_steps_setting_reaches_the_optimizer():
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    for steps in (muon.NS_STEPS, 3):
        cfg = TrainConfig(preset="tiny", optimizer="muon", muon_ns_steps=steps)
        assert build_optimizer(model, cfg, torch.device("cpu")).ns_steps == steps
    g = torch.randn(24, 16)
    assert not torch.allclose(orthogonalize(g, 3), orthogonalize(g, 5), atol=1e-2)  # the setting matters


def test_bf16_parameters_get_the_per_tensor_arithmetic():
    """The foreach step must not round its factors (momentum, 1 - lr·wd) to the parameters' dtype."""
    torch.manual_seed(0)
    lr, wd, mu = 0.02, 0.1, 0.9
    w = torch.nn.Parameter(torch.randn(24, 16, dtype=torch.bfloat16))
    opt = MuonAdamW([{"params": [w], "weight_decay": wd, "muon": True}], lr=lr, momentum=mu)
    expected, buf = w.detach().clone(), torch.zeros(24, 16, dtype=torch.bfloat16)
    for _ in range(3):
        g = torch.randn(24, 16, dtype=torch.bfloat16)
        w.grad = g.clone()
        opt.step()
        buf.mul_(mu).add_(g)
        expected.mul_(1 - lr * wd).add_(orthogonalize(g.add(buf, alpha=mu)), alpha=-lr * 0.2 * math.sqrt(24))
        assert torch.equal(w.detach(), expected)


@pytest.mark.parametrize("batch_elements", [muon.NS_BATCH_ELEMENTS, 2 * 24 * 16, 1])
def test_same_shaped_matrices_share_a_batch_but_each_gets_its_own_update(monkeypatch, batch_elements):
    """The step orthogonalises same-shaped matrices in batches (of up to ``NS_BATCH_ELEMENTS``
    elements: here all three 24×16 matrices together, two then one, or one at a time); each must still
    get exactly the update it would get alone, whatever its neighbours' scale and shape."""
    monkeypatch.setattr(muon, "NS_BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(0)
    shapes = [(24, 16), (8, 12), (24, 16), (24, 16)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = MuonAdamW([{"params": params, "weight_decay": 0.0, "muon": True}], lr=1.0, momentum=0.0)
    grads = [torch.randn(s) * scale for s, scale in zip(shapes, (1.0, 5.0, 100.0, 0.01))]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, g in zip(params, grads):
        want = -0.2 * math.sqrt(max(g.shape)) * orthogonalize(g)
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_bf16_newton_schulz_stays_close_to_float32():
    """``ns_dtype=bfloat16`` (what a bf16-autocast stage gets) computes the same update to bf16's
    precision: it changes the rounding, not the rule."""
    torch.manual_seed(0)
    g = torch.randn(3, 48, 96)
    o32, o16 = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
    assert o16.dtype == torch.float32 and not torch.equal(o16, o32)
    torch.testing.assert_close(o16, o32, rtol=0, atol=0.05)
    w = torch.nn.Parameter(torch.zeros(48, 96))
    opt = MuonAdamW([{"params": [w], "weight_decay": 0.0, "muon": True}], lr=1.0, momentum=0.0,
                    ns_dtype=torch.bfloat16)
    w.grad = g[0].clone()
    opt.step()
    torch.testing.assert_close(w.detach(), -0.2 * math.sqrt(96) * o16[0], rtol=1e-5, atol=1e-6)


def test_a_fused_gate_up_tensor_is_orthogonalised_as_its_two_matrices():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3, 2 * 8, 12))  # [E, 2I, H]: gate rows, then up rows
    opt = MuonAdamW([{"params": [w], "weight_decay": 0.0, "muon": True, "blocks": 2}], lr=1.0, momentum=0.0)
    w.grad = torch.randn(3, 16, 12)
    w.grad[:, 8:] *= 100.0  # the up half's gradient is far larger; the gate half must still move as much
    opt.step()
    want = -0.2 * math.sqrt(12) * torch.cat([orthogonalize(w.grad[:, :8]), orthogonalize(w.grad[:, 8:])], dim=1)
    torch.testing.assert_close(w.detach(), want, rtol=1e-5, atol=1e-6)


def test_muon_state_survives_a_checkpoint_exactly(tmp_path):
    def batch(i):
        return torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(i))

    def step(model, opt, i):
        ids = batch(i)
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cfg = TrainConfig(preset="tiny", optimizer="muon", lr=1e-2)
    torch.manual_seed(0)
    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    for i in range(2):
        step(model, opt, i)
    path = save_checkpoint(tmp_path, 2, model, opt, {}, None)
    resumed = nanoseek.load(path / "model")
    opt2 = build_optimizer(resumed, cfg, torch.device("cpu"))
    restore_optimizer(opt2, path)
    for i in range(2, 4):
        step(model, opt, i)
        step(resumed, opt2, i)
    for name, t in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], t), name


def test_pretrain_with_muon_through_the_cli(tmp_path):
    run = tmp_path / "muon"
    res = run_cli("pretrain", *COMMON, "--data", str(make_corpus(tmp_path / "corpus.txt")), "--out", str(run),
                  "--optimizer", "muon")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    steps = [m for m in read_metrics(run) if m["action"] in ("ok", "warn")]
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 0.5, (steps[0]["lm_loss"], steps[-1]["lm_loss"])
    assert json.loads((run / "train_config.json").read_text())["optimizer"] == "muon"
    meta = json.loads(next((run / "checkpoints").glob("step_*/optimizer.json")).read_text())
    assert [(g["muon"], g.get("blocks")) for g in meta["param_groups"]] == [
        (True, 1), (True, 2), (False, 1), (False, 1)]


def test_muon_is_refused_for_a_sharded_model_with_a_clear_error(monkeypatch):
    import nanoseek.train.optim as optim

    model = nanoseek.DeepSeekV3(nanoseek.get_preset("tiny"))
    monkeypatch.setattr(optim, "is_sharded", lambda m: m is model)  # as FSDP2 would leave it
    with pytest.raises(nanoseek.ConfigError, match="muon.*FSDP2.*--optimizer adamw"):
        build_optimizer(model, TrainConfig(preset="tiny", optimizer="muon"), torch.device("cpu"))
    assert isinstance(build_optimizer(model, TrainConfig(preset="tiny"), torch.device("cpu")), torch.optim.AdamW)
