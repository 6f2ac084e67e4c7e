"""Tests for nanoseek.rl.objective: GRPO (R1 eq. 1-3) and its DAPO / Dr. GRPO variants.

Expected values are worked out by hand in the comments next to them (small explicit numbers), not
recomputed through the code under test.
"""

import math

import pytest
import torch

from nanoseek.errors import ConfigError
from nanoseek.rl.config import GRPOConfig
from nanoseek.rl.objective import (
    aggregate,
    clipped_surrogate,
    dynamic_sampling_mask,
    group_advantages,
    grpo_loss,
    k3_kl,
    overlong_penalty,
    zero_variance_fraction,
)

LOG2 = math.log(2.0)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------- advantages
def test_advantages_half_correct_group_unbiased_std():
    # mean 0.5; deviations ±0.5; unbiased var = 4·0.25/3 = 1/3 → std = 0.577350...
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # = 0.86588...
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert close(adv, [a, -a, -a, a])
    assert abs(a - 0.86588) < 1e-5


def test_advantages_std_convention_is_unbiased():
    # G = 2, rewards (1, 0): unbiased std = sqrt(0.5) → Â = ±0.7071; the biased std (0.5) gives ±1.
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0)
    assert close(adv, [1 / math.sqrt(2), -1 / math.sqrt(2)])


def test_advantages_zero_variance_group_is_zero_not_nan():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]), 4)
    assert adv.shape == (8,)
    assert torch.isfinite(adv).all()
    assert close(adv[4:], [0.0] * 4)
    assert close(group_advantages(torch.zeros(4), 4), [0.0] * 4)


def test_advantages_without_std_dr_grpo():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0]), 4,
                           scale_by_std=False)
    # group 1: mean 0.5; group 2: mean 1.5
    assert close(adv, [0.5, -0.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5])


def test_advantages_accept_int_and_bool_rewards():
    adv = group_advantages(torch.tensor([True, False, False, True]), 4, scale_by_std=False)
    assert adv.dtype == torch.float32 and close(adv, [0.5, -0.5, -0.5, 0.5])
    assert close(group_advantages(torch.tensor([2, 0]), 2, scale_by_std=False), [1.0, -1.0])


def test_advantages_shape_errors():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(2, 3), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 1)


# --------------------------------------------------------------------------- k3 KL
def test_k3_known_points():
    z = torch.zeros(3)
    assert close(k3_kl(z, z), [0.0, 0.0, 0.0])
    # ref − logp = log 2: π_ref/π = 2 → 2 − log 2 − 1 = 0.306853
    assert close(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0 + LOG2])), [1.0 - LOG2])
    # ref − logp = −log 2: 0.5 + log 2 − 1 = 0.193147
    assert close(k3_kl(torch.tensor([0.0]), torch.tensor([-LOG2])), [LOG2 - 0.5])


def test_k3_small_difference_keeps_precision_and_gradient():
    d = 1e-4  # k3 ≈ d²/2 = 5e-9: exp(d) − d − 1 in float32 would be pure rounding noise
    v = k3_kl(torch.tensor([0.0]), torch.tensor([d]))
    assert abs(v.item() - d * d / 2) < 1e-11
    # d k3 / d logp = 1 − π_ref/π = 1 − 2 = −1 at ref − logp = log 2
    lp = torch.tensor([0.0], requires_grad=True)
    k3_kl(lp, torch.tensor([LOG2])).sum().backward()
    assert close(lp.grad, [-1.0])


def test_k3_non_negative_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(2000, generator=g) * 5
    ref = lp + torch.randn(2000, generator=g) * torch.logspace(-8, 1, 2000)
    assert (k3_kl(lp, ref) >= 0).all()


# --------------------------------------------------------------------------- clipped surrogate
def test_clipped_surrogate_hand_picked_ratios():
    # row 0: Â = +1, ρ = 1.5 (clipped to 1.2), 0.5 (kept), 1.1 (inside)
    # row 1: Â = −1, ρ = 1.5 (kept: min picks −1.5), 0.5 (clipped to 0.8), 0.9 (inside)
    ratios = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 0.9]])
    logp = ratios.log().requires_grad_()
    loss, st = clipped_surrogate(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), 0.2, 0.2)
    assert close(loss, [[-1.2, -0.5, -1.1], [1.5, 0.8, 0.9]], 1e-5)
    assert close(st["clip_high"], 1 / 6) and close(st["clip_low"], 1 / 6)
    assert close(st["ratio_mean"], 1.0, 1e-6)  # (1.5+0.5+1.1+1.5+0.5+0.9)/6
    loss.sum().backward()
    # d(−ρÂ)/d logp = −ρÂ where the unclipped term is selected, 0 where the clip is active
    assert close(logp.grad, [[0.0, -0.5, -1.1], [1.5, 0.0, 0.9]], 1e-5)


def test_clip_higher_asymmetric_bounds():
    logp = torch.tensor([[math.log(1.25)]])
    old = torch.zeros(1, 1)
    pos = torch.tensor([1.0])
    loss, st = clipped_surrogate(logp, old, pos, eps_low=0.2, eps_high=0.2)
    assert close(loss, [[-1.2]], 1e-6) and st["clip_high"].item() == 1.0
    loss, st = clipped_surrogate(logp, old, pos, eps_low=0.2, eps_high=0.28)  # DAPO
    assert close(loss, [[-1.25]], 1e-6) and st["clip_high"].item() == 0.0
    # the lower bound stays at 0.8 under clip-higher: ρ = 0.75, Â = −1 → −min(−0.75, −0.8) = 0.8
    loss, st = clipped_surrogate(torch.tensor([[math.log(0.75)]]), old, -pos, 0.2, 0.28)
    assert close(loss, [[0.8]], 1e-6) and st["clip_low"].item() == 1.0


def test_clip_fractions_ignore_zero_advantage_and_masked_tokens():
    ratios = torch.tensor([[3.0, 3.0, 0.1, 1.0]])
    adv = torch.tensor([[0.0, 2.0, 2.0, 2.0]])  # per-token advantages
    _, st = clipped_surrogate(ratios.log(), torch.zeros(1, 4), adv, 0.2, 0.2)
    # Â = 0 never counts; ρ = 0.1 with Â > 0 is not clipped (min picks 0.1·Â)
    assert close(st["clip_high"], 0.25) and close(st["clip_low"], 0.0)
    mask = torch.tensor([[True, False, True, True]])  # the one clipped token is padding
    _, st = clipped_surrogate(ratios.log(), torch.zeros(1, 4), adv, 0.2, 0.2, mask=mask)
    assert close(st["clip_high"], 0.0)
    assert close(st["ratio_mean"], (3.0 + 0.1 + 1.0) / 3, 1e-6)


# --------------------------------------------------------------------------- aggregation
RAGGED_X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, float("nan"), 99.0, -float("inf")]])
RAGGED_M = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])


def test_aggregation_modes_on_ragged_mask():
    # sequence_mean: (10/4 + 10/1) / 2 = 6.25; token_mean: 20/5 = 4;
    # constant(4): (10 + 10) / (2·4) = 2.5; constant(8): 20/16 = 1.25
    assert close(aggregate(RAGGED_X, RAGGED_M, "sequence_mean"), 6.25)
    assert close(aggregate(RAGGED_X, RAGGED_M, "token_mean"), 4.0)
    assert close(aggregate(RAGGED_X, RAGGED_M, "constant", max_len=4), 2.5)
    assert close(aggregate(RAGGED_X, RAGGED_M.bool(), "constant", max_len=8), 1.25)


def test_aggregation_weights_per_token():
    x = RAGGED_X.clone().requires_grad_()
    expected = {  # d loss / d x_it on real tokens; padding gets 0 (and no NaN from the NaN there)
        "sequence_mean": [[0.125] * 4, [0.5, 0, 0, 0]],       # 1/(N·|o_i|)
        "token_mean": [[0.2] * 4, [0.2, 0, 0, 0]],            # 1/Σ|o_i|
        "constant": [[0.125] * 4, [0.125, 0, 0, 0]],          # 1/(N·max_len), max_len = 4
    }
    for mode, g in expected.items():
        x.grad = None
        aggregate(x, RAGGED_M, mode, max_len=4).backward()
        assert close(x.grad, g), mode


def test_aggregation_empty_row_and_errors():
    x = torch.tensor([[2.0, 4.0], [7.0, 7.0]])
    m = torch.tensor([[1, 1], [0, 0]])
    assert close(aggregate(x, m, "sequence_mean"), 1.5)  # (3 + 0) / 2
    assert close(aggregate(x, m, "token_mean"), 3.0)
    with pytest.raises(ValueError):
        aggregate(x, m, "constant")
    with pytest.raises(ValueError):
        aggregate(x, m, "mean")
    with pytest.raises(ValueError):
        aggregate(x, m[:, :1], "token_mean")


# --------------------------------------------------------------------------- full loss
def test_positive_advantage_step_increases_logp():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    for mode in ("sequence_mean", "token_mean", "constant"):
        logp = torch.log(torch.tensor([[0.3, 0.5, 0.2], [0.4, 0.1, 0.6]])).requires_grad_()
        old = logp.detach().clone()
        loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0, -1.0]), mask, beta=0.0,
                            loss_mode=mode, max_len=3)
        loss.backward()
        new = logp.detach() - 0.1 * logp.grad
        assert (new[0, :2] > old[0, :2]).all(), mode       # Â > 0: more likely
        assert (new[1] < old[1]).all(), mode               # Â < 0: less likely
        assert new[0, 2] == old[0, 2], mode                # padding untouched


def test_positive_advantage_step_through_logits():
    # The same through a softmax policy: one SGD step on the logits raises the sampled tokens'
    # log-probs of the positively rewarded completion.
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    tokens = torch.tensor([[1, 3, 0, 2], [4, 4, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    def seq_logp(lg):
        return torch.log_softmax(lg, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    before = seq_logp(logits).detach()
    loss, _ = grpo_loss(seq_logp(logits), before, None, torch.tensor([1.0, 0.0]), mask, beta=0.0)
    loss.backward()
    with torch.no_grad():
        after = seq_logp(logits - 0.5 * logits.grad)
    assert (after[0] > before[0]).all()
    assert torch.equal(logits.grad[1], torch.zeros(4, 5))  # Â = 0 gives no gradient


def test_beta_adds_exactly_beta_times_kl_sequence_mean():
    # ref − logp: row 0 (log 2, 0, pad), row 1 (−log 2, pad, pad)
    # k3: (1 − log 2, 0) and (log 2 − 1/2); sequence mean = ((1 − log 2)/2 + log 2 − 1/2)/2 = log2/4
    # token mean = (1 − log 2 + 0 + log 2 − 1/2)/3 = 1/6
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -1.0]])
    ref = logp + torch.tensor([[LOG2, 0.0, 50.0], [-LOG2, -80.0, 90.0]])  # garbage on padding
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([0.7, -0.3])
    base, st0 = grpo_loss(logp, logp, ref, adv, mask, beta=0.0)
    with_kl, st = grpo_loss(logp, logp, ref, adv, mask, beta=0.1)
    assert close(with_kl - base, 0.1 * LOG2 / 4, 1e-6)
    assert close(st["kl"], 1 / 6, 1e-6) and close(st0["kl"], 0.0)
    # no reference model → no KL term whatever beta says
    no_ref, st_none = grpo_loss(logp, logp, None, adv, mask, beta=0.1)
    assert close(no_ref, base) and close(st_none["kl"], 0.0)


def test_on_policy_gradient_is_reinforce_with_baseline():
    # ρ ≡ 1 (old = logp, μ = 1): ∂loss/∂logp_it = −Â_i · w_it, w the aggregation weight.
    # Â = (0.5, −1.5), lengths (4, 1), N = 2, max_len = 4:
    #   sequence_mean w = 1/(N|o_i|): −0.5/8 = −0.0625 ;  +1.5/2 = 0.75
    #   token_mean    w = 1/5      : −0.5/5 = −0.1    ;  +1.5/5 = 0.3
    #   constant      w = 1/(N·4)  : −0.5/8 = −0.0625 ;  +1.5/8 = 0.1875
    expected = {"sequence_mean": (-0.0625, 0.75), "token_mean": (-0.1, 0.3),
                "constant": (-0.0625, 0.1875)}
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.5])
    for mode, (g0, g1) in expected.items():
        for eps_high in (0.2, 0.28):
            logp = torch.log(torch.tensor([[0.2, 0.9, 0.5, 0.3], [0.6, 0.1, 0.1, 0.1]]))
            logp.requires_grad_()
            loss, st = grpo_loss(logp, None, None, adv, mask, beta=0.0, eps_high=eps_high,
                                 loss_mode=mode, max_len=4)
            loss.backward()
            assert close(logp.grad, [[g0] * 4, [g1, 0, 0, 0]], 1e-6), (mode, eps_high)
            assert close(st["ratio_mean"], 1.0) and close(st["clip_high"] + st["clip_low"], 0.0)
    # loss value at ρ = 1 is −aggregate(Â): sequence_mean → −(0.5 − 1.5)/2 = 0.5
    loss, _ = grpo_loss(torch.zeros(2, 4), None, None, adv, mask, beta=0.0)
    assert close(loss, 0.5)


def test_garbage_on_padding_gives_finite_loss_and_gradient():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    clean = torch.log(torch.full((2, 4), 0.25))
    dirty = clean.clone()
    dirty[mask == 0] = -1e4
    old = clean.clone()
    old[mask == 0] = 0.0
    ref = clean.clone()
    ref[mask == 0] = 1e4
    lp = dirty.clone().requires_grad_()
    loss, st = grpo_loss(lp, old, ref, torch.tensor([1.0, -1.0]), mask, beta=0.04,
                         loss_mode="token_mean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in st.values())
    ref_loss, _ = grpo_loss(clean, clean, clean, torch.tensor([1.0, -1.0]), mask, beta=0.04,
                            loss_mode="token_mean")
    assert close(loss, ref_loss)


def test_half_precision_inputs_are_upcast():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).to(torch.bfloat16).requires_grad_()
    loss, st = grpo_loss(logp, logp.detach(), None, torch.tensor([2.0]), torch.ones(1, 2),
                         beta=0.0)
    assert loss.dtype == torch.float32 and close(loss, -2.0)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------- DAPO helpers
def test_dynamic_sampling_mask_and_zero_variance_fraction():
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0],    # all correct → drop
                      [0.0, 1.0, 0.0, 0.0],    # mixed → keep
                      [0.0, 0.0, 0.0, 0.0],    # all wrong → drop
                      [0.5, 0.5, 0.5, 0.5]])   # equal partial credit → drop
    assert dynamic_sampling_mask(r).tolist() == [False, True, False, False]
    assert dynamic_sampling_mask(r.reshape(-1), 4).tolist() == [False, True, False, False]
    assert close(zero_variance_fraction(r.reshape(-1), 4), 0.75)
    assert close(zero_variance_fraction(r), 0.75)
    with pytest.raises(ValueError):
        dynamic_sampling_mask(r.reshape(-1))


def test_overlong_penalty_piecewise():
    # L_max = 20, L_cache = 4: free up to 16, then (16 − |y|)/4, −1 beyond 20
    lengths = torch.tensor([0, 10, 16, 17, 18, 19, 20, 21, 100])
    assert close(overlong_penalty(lengths, 20, 4),
                 [0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 20, 0)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 20, 21)


# --------------------------------------------------------------------------- config
def test_config_defaults_and_presets():
    c = GRPOConfig()
    assert (c.group_size, c.beta, c.eps_low, c.eps_high, c.loss_mode) == \
        (8, 0.04, 0.2, 0.2, "sequence_mean")
    assert c.scale_adv_by_std and not c.dynamic_sampling and c.mu == 1 and c.temperature == 1.0
    assert c.uses_kl
    d = GRPOConfig.dapo()
    assert (d.eps_low, d.eps_high, d.loss_mode, d.dynamic_sampling, d.beta) == \
        (0.2, 0.28, "token_mean", True, 0.0)
    d2 = GRPOConfig.dapo(overlong_max_len=1024, overlong_cache_len=256, group_size=16)
    assert (d2.overlong_max_len, d2.overlong_cache_len, d2.group_size) == (1024, 256, 16)
    r = GRPOConfig.dr_grpo(512)
    assert (r.scale_adv_by_std, r.loss_mode, r.loss_max_len, r.beta) == \
        (False, "constant", 512, 0.0)
    assert c.with_(beta=0.001).beta == 0.001


@pytest.mark.parametrize("bad", [
    dict(group_size=1), dict(group_size=4.0), dict(beta=-0.1), dict(beta=float("nan")),
    dict(eps_low=1.0), dict(eps_low=-0.1), dict(eps_high=-0.01), dict(loss_mode="mean"),
    dict(loss_mode="constant"), dict(loss_max_len=0), dict(overlong_max_len=100),
    dict(overlong_max_len=100, overlong_cache_len=200), dict(overlong_max_len=100,
                                                             overlong_cache_len=0),
    dict(mu=0), dict(temperature=0.0),
])
def test_config_validation(bad):
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        GRPOConfig(**bad)


def test_config_with_rejects_unknown_and_invalid():
    with pytest.raises(ConfigError):
        GRPOConfig().with_(epsilon=0.1)
    with pytest.raises(ConfigError):
        GRPOConfig().with_(loss_mode="constant")
