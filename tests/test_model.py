"""Model behaviour checked against hand computations from the V3 report's definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model import DeepSeekV3, SlotLatentCache, sequence_balance_loss, update_routing_bias
from nanoseek.model.moe import Router, RoutedExperts, Routing


def tiny(**changes):
    return nanoseek.get_preset("tiny").replace(**changes)


def logit(p):
    return math.log(p / (1 - p))


def hand_router(affinities, bias=None, top_k=2, n_group=4, topk_group=2, scaling=2.5):
    """A router whose sigmoid affinities for the input e_0 are exactly ``affinities``."""
    n = len(affinities)
    cfg = tiny(hidden_size=8, n_routed_experts=n, n_group=n_group, topk_group=topk_group,
               num_experts_per_tok=top_k, routed_scaling_factor=scaling)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([logit(p) for p in affinities])
        if bias is not None:
            router.e_score_correction_bias.copy_(torch.tensor(bias))
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    return router(x)


class TestRouting:
    # groups of two: G0={0,1} G1={2,3} G2={4,5} G3={6,7}
    AFF = [0.95, 0.05, 0.62, 0.60, 0.55, 0.55, 0.10, 0.10]

    def test_group_limit_excludes_the_single_best_expert(self):
        # Expert 0 is the best expert, but its group scores 1.00 < G1 1.22 and G2 1.10.
        r = hand_router(self.AFF)
        assert sorted(r.expert_ids[0].tolist()) == [2, 3]
        expected = torch.tensor([0.62, 0.60]) / 1.22 * 2.5
        got = r.weights[0][r.expert_ids[0].argsort()]
        torch.testing.assert_close(got, expected)

    def test_without_group_limit_the_best_expert_wins(self):
        r = hand_router(self.AFF, topk_group=4)
        assert sorted(r.expert_ids[0].tolist()) == [0, 2]

    def test_bias_changes_choice_but_weights_use_unbiased_affinities(self):
        bias = [0.0] * 8
        bias[4] = 0.5  # G2 becomes the best group; expert 4 is chosen through its bias
        r = hand_router(self.AFF, bias=bias)
        assert sorted(r.expert_ids[0].tolist()) == [2, 4]
        weights = dict(zip(r.expert_ids[0].tolist(), r.weights[0].tolist()))
        assert weights[4] == pytest.approx(0.55 / (0.55 + 0.62) * 2.5, rel=1e-5)
        assert weights[2] == pytest.approx(0.62 / (0.55 + 0.62) * 2.5, rel=1e-5)

    def test_negative_biases_never_pick_excluded_groups(self):
        # All biased scores negative: masking dropped groups with 0 would pick them; -inf must not.
        bias = [-2.0] * 8
        bias[6] = bias[7] = -1.9  # G3 has the best biased experts individually? no: sums decide
        r = hand_router(self.AFF, bias=bias)
        biased = torch.tensor(self.AFF) + torch.tensor(bias)
        group_scores = biased.view(4, 2).sum(-1)  # top-2 of 2 = both
        kept = set(group_scores.topk(2).indices.tolist())
        assert {e // 2 for e in r.expert_ids[0].tolist()} <= kept

    def test_norm_topk_prob_off_keeps_raw_affinities(self):
        cfg = tiny(hidden_size=8, n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2,
                   norm_topk_prob=False, routed_scaling_factor=1.0)
        router = Router(cfg)
        torch.nn.init.normal_(router.weight)
        x = torch.randn(5, 8)
        r = router(x)
        torch.testing.assert_close(r.weights, torch.sigmoid(x @ router.weight.T).gather(1, r.expert_ids))


def test_grouped_mm_matches_loop_fallback():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    torch.manual_seed(0)
    experts = RoutedExperts(tiny())
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(13, 64)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(13)])
    ids[:, 0] = 3  # one expert gets many tokens, some get none
    routing = Routing(ids, torch.rand(13, 2), torch.rand(13, 8))
    with torch.no_grad():
        experts.impl = "loop"
        a, counts_a = experts(x, routing)
        experts.impl = "grouped_mm"
        b, counts_b = experts(x, routing)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts_a, counts_b)


def test_routed_experts_match_per_token_reference_including_gradients():
    torch.manual_seed(1)
    experts = RoutedExperts(tiny())
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts.impl = "loop"
    x = torch.randn(9, 64, requires_grad=True)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(9)])
    w = torch.rand(9, 2)
    out, counts = experts(x, Routing(ids, w, torch.rand(9, 8)))
    ref = torch.zeros_like(x)
    for t in range(9):
        for j in range(2):
            e = ids[t, j]
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            ref[t] += w[t, j] * (experts.down_proj[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=8).tolist()
    wanted = [x, experts.gate_up_proj, experts.down_proj]
    g_out = torch.autograd.grad(out.square().sum(), wanted)
    g_ref = torch.autograd.grad(ref.square().sum(), wanted)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sequence_balance_loss_matches_definition():
    torch.manual_seed(2)
    batch, seq, n, k = 2, 5, 8, 2
    scores = torch.rand(batch * seq, n)
    ids = torch.stack([torch.randperm(n)[:k] for _ in range(batch * seq)])
    got = sequence_balance_loss(Routing(ids, torch.rand(batch * seq, k), scores), batch, seq)
    total = 0.0
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        loss = 0.0
        for i in range(n):
            f_i = n / (k * seq) * sum(int(i in ids[t].tolist()) for t in rows)
            p_i = sum(float(scores[t, i] / scores[t].sum()) for t in rows) / seq
            loss += f_i * p_i
        total += loss
    assert got.item() == pytest.approx(total / batch, rel=1e-5)


def test_bias_update_moves_toward_balance():
    router = Router(tiny())
    update_routing_bias(router, torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]), speed=0.001)
    assert router.e_score_correction_bias.tolist()[:3] == pytest.approx([-0.001, 0.001, 0.0])


def _direct_ce(logits, targets):
    """Mean CE written out: -log softmax at the target, averaged over valid targets."""
    logp = logits.float().log_softmax(-1)
    vals = [-logp[b, i, targets[b, i]] for b in range(targets.shape[0]) for i in range(targets.shape[1])
            if targets[b, i] != -100]
    return torch.stack(vals).mean()


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_loss_matches_definition(depth):
    torch.manual_seed(3)
    cfg = tiny(num_nextn_predict_layers=depth, mtp_loss_weight=0.3)
    model = DeepSeekV3(cfg).eval()
    seq = torch.randint(0, cfg.vocab_size, (2, 11))
    ids, labels = seq[:, :-1], seq[:, 1:].clone()
    labels[0, 3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, return_hidden=True)
        t = ids.shape[1]
        emb = model.model.embed_tokens
        prev = out.hidden_states
        per_depth = []
        for k in range(1, depth + 1):
            m = model.mtp[k - 1]
            # h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)], then the block, then the head.
            h = m.eh_proj(torch.cat([m.enorm(emb(ids[:, k:])), m.hnorm(prev[:, : t - k])], -1))
            pos = torch.arange(t - k)[None]
            cos, sin = model.model.rotary_emb(pos)
            h, _ = m.block(h, cos, sin)
            # depth k at position i predicts the token i+k+1 of the sequence = labels[:, i+k]
            per_depth.append(_direct_ce(model.lm_head(m.norm(h)), labels[:, k:]))
            prev = h
        lm = _direct_ce(out.logits, labels)
    assert out.lm_loss.item() == pytest.approx(lm.item(), rel=1e-5)
    assert out.mtp_loss.item() == pytest.approx(torch.stack(per_depth).mean().item(), rel=1e-5)
    assert out.aux_loss is None  # alpha = 0 in the tiny preset
    assert out.loss.item() == pytest.approx(lm.item() + 0.3 * out.mtp_loss.item(), rel=1e-5)


def test_training_outputs_and_backward():
    torch.manual_seed(4)
    cfg = tiny(aux_loss_alpha=0.01)
    model = DeepSeekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, cfg.vocab_size)
    assert out.expert_load.shape == (len(model.moe_routers()), cfg.n_routed_experts)  # MTP block's row last
    assert out.expert_load[: cfg.n_moe_layers].sum(-1).tolist() == [2 * 9 * cfg.num_experts_per_tok] * cfg.n_moe_layers
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    expected = out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss + out.aux_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    # the bias is a buffer: never a gradient parameter
    assert not any("e_score_correction_bias" in n for n in grads)


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(5)
    cfg = tiny()
    model = DeepSeekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_activation_checkpointing(True)
    model(ids, labels=ids).loss.backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_latent_cache_decode_equals_full_forward(q_lora_rank):
    torch.manual_seed(6)
    cfg = tiny(q_lora_rank=q_lora_rank, rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                                       "mscale_all_dim": 1.0,
                                                       "original_max_position_embeddings": 64})
    model = DeepSeekV3(cfg).eval()
    for r in model.moe_routers():
        r.e_score_correction_bias.normal_(0, 0.3)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = SlotLatentCache(cfg, n_slots=2, max_len=16, device="cpu", dtype=torch.float32)
        rows = [cache.allocate(), cache.allocate()]
        steps = [model(ids[:, :4], cache=cache.view(rows)).logits]  # prefill 4 tokens on the absorbed path
        for i in range(4, 10):
            steps.append(model(ids[:, i:i + 1], cache=cache.view(rows)).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths == [10, 10]
    assert cache.c_kv[0].shape[-1] + cache.k_pe[0].shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_mtp_draft_through_the_cache_equals_the_uncached_mtp_block():
    """Drafting with the step's cache runs at that step's positions and attends only written entries."""
    torch.manual_seed(8)
    cfg = tiny()
    model = DeepSeekV3(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        out = model(ids[:, :-1], return_hidden=True)
        ref, _ = model.mtp_draft_logits(0, out.hidden_states, ids[:, 1:], position_ids=torch.arange(8)[None])
        cache = SlotLatentCache(cfg, n_slots=2, max_len=16, device="cpu", dtype=torch.float32)
        rows = [cache.allocate(), cache.allocate()]
        prefill = cache.view(rows)
        model(ids[:, :5], cache=prefill, return_hidden=True)
        h_pre = model(ids[:, :5], return_hidden=True).hidden_states
        draft_pre, _ = model.mtp_draft_logits(0, h_pre, ids[:, 1:6], cache=prefill)
        step = cache.view(rows)  # the next step: three more tokens, then their drafts
        h_step = model(ids[:, 5:8], cache=step, return_hidden=True).hidden_states
        draft_step, _ = model.mtp_draft_logits(0, h_step, ids[:, 6:9], cache=step)
    assert cache.lengths == [8, 8]
    torch.testing.assert_close(torch.cat([draft_pre, draft_step], 1), ref, rtol=1e-4, atol=1e-5)


def test_cache_overflow_is_a_clear_error():
    cfg = tiny()
    model = DeepSeekV3(cfg).eval()
    cache = SlotLatentCache(cfg, n_slots=1, max_len=4, device="cpu", dtype=torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="latent cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache.view([cache.allocate()]))


def test_v3_builds_on_meta_device():
    with torch.device("meta"):
        model = DeepSeekV3(nanoseek.get_preset("v3"))
    assert model.num_parameters() == pytest.approx(671e9, rel=0.005)


def test_bf16_forward_is_finite_and_close_to_fp32():
    torch.manual_seed(7)
    model = DeepSeekV3(tiny()).eval()
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        ref = model(ids).logits
        got = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 0.05
