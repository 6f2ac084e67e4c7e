"""Tests for nanoseek.fp8: block-wise / tile-wise E4M3 quantisation (DeepSeek-V3 §3.3.2)."""

import math

import pytest
import torch

from nanoseek.fp8 import (
    FP8_E4M3_MAX,
    dequantize_activation_tilewise,
    dequantize_weight_blockwise,
    fp8_linear_reference,
    quantize_activation_tilewise,
    quantize_weight_blockwise,
)

# Error bound for one element, derived from the E4M3 format (1 sign, 4 exponent
# bits, 3 mantissa bits, min normal 2**-6, subnormal spacing 2**-9):
#   * normal range (|v| >= 2**-6): round-to-nearest moves v by at most half an
#     ulp, and ulp <= 2**-3 * |v|, so |fp8(v) - v| <= 2**-4 * |v|;
#   * subnormal range (|v| < 2**-6): |fp8(v) - v| <= 2**-9 / 2 = 2**-10.
# With v = w / s and deq = fp8(v) * s:  |deq - w| <= 2**-4 |w| + 2**-10 s.
# float32 arithmetic (the division and the product) adds a relative 2**-23 or
# so, covered by SLACK.
SLACK = 1e-5


def elementwise_bound(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return (2.0**-4 * w.abs() + 2.0**-10 * scale_full) * (1 + SLACK) + 1e-30


def expand_blocks(scale: torch.Tensor, shape, block) -> torch.Tensor:
    """Per-element scale by an explicit Python loop (independent of the module)."""
    out_f, in_f = shape
    bo, bi = block
    full = torch.empty(shape, dtype=torch.float32)
    for r in range(out_f):
        for c in range(0, in_f, bi):
            full[r, c : c + bi] = scale[r // bo, c // bi]
    return full


def naive_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """Reference dequantisation: loop over blocks, slice, multiply."""
    out_f, in_f = q.shape
    bo, bi = block
    res = torch.zeros(out_f, in_f, dtype=torch.float32)
    for i, r0 in enumerate(range(0, out_f, bo)):
        for j, c0 in enumerate(range(0, in_f, bi)):
            res[r0 : r0 + bo, c0 : c0 + bi] = q[r0 : r0 + bo, c0 : c0 + bi].float() * scale_inv[i, j].item()
    return res


def naive_block_amax(w: torch.Tensor, block) -> torch.Tensor:
    out_f, in_f = w.shape
    bo, bi = block
    rows = []
    for r0 in range(0, out_f, bo):
        rows.append([w[r0 : r0 + bo, c0 : c0 + bi].abs().max().item() for c0 in range(0, in_f, bi)])
    return torch.tensor(rows, dtype=torch.float32)


def random_weight(seed: int, out_f: int = 144, in_f: int = 200, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * std


def check_roundtrip(w: torch.Tensor, block=(128, 128), ue8m0=False):
    q, s = quantize_weight_blockwise(w, block, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32
    assert s.shape == (math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
    deq = dequantize_weight_blockwise(q, s, block)
    assert torch.isfinite(deq).all()
    err = (deq - w).abs()
    # the bound uses each block's OWN amax, computed independently of the module
    # (ue8m0 may round a scale up by < 2x); a shared or wrong amax breaks it
    own_scale = naive_block_amax(w, block).clamp(min=1e-4) / FP8_E4M3_MAX * (2.0 if ue8m0 else 1.0)
    bound = elementwise_bound(w, expand_blocks(own_scale, w.shape, block))
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"
    # coarser: every element within 2**-4 of its block's amax
    amax_full = expand_blocks(naive_block_amax(w, block), w.shape, block)
    assert (err <= 2.0**-4 * amax_full * (1 + SLACK)).all()
    assert ((deq - w).norm() / w.norm()).item() < 0.04
    return q, s, deq


def test_roundtrip_random_144x200():
    w = random_weight(0)
    q, s, deq = check_roundtrip(w)
    assert s.shape == (2, 2)
    # scale_inv is the multiplier: amax / 448 per block, with the block's own amax
    torch.testing.assert_close(s, naive_block_amax(w, (128, 128)) / FP8_E4M3_MAX, rtol=1e-6, atol=0)
    # the largest element of every block maps to exactly +-448
    for i in range(2):
        for j in range(2):
            blk = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            assert blk.abs().max().item() == FP8_E4M3_MAX


def test_roundtrip_with_large_magnitude_block():
    w = random_weight(1)
    w[:128, 128:] *= 1000.0  # one full-size block 1000x larger (outlier block)
    _, s, deq = check_roundtrip(w)
    assert s[0, 1] > 100 * s[0, 0]
    # the small blocks are not spoiled by the outlier block
    rel = (deq[:, :128] - w[:, :128]).norm() / w[:, :128].norm()
    assert rel.item() < 0.04


def test_partial_edge_block_uses_its_own_amax():
    w = random_weight(2)
    w[128:] *= 1000.0  # last 16 rows: the partial row block
    q, s, deq = check_roundtrip(w)
    assert s.shape == (2, 2)
    torch.testing.assert_close(s, naive_block_amax(w, (128, 128)) / FP8_E4M3_MAX, rtol=1e-6, atol=0)
    # first block row is still accurate: it does not share a scale with the 1000x rows
    top_rel = (deq[:128] - w[:128]).norm() / w[:128].norm()
    assert top_rel.item() < 0.04
    assert s[1].min() > 100 * s[0].max()
    # the block size comes from the argument, not from shapes: (72, 128) gives the
    # same scale shape (2, 2) for 144 rows, so a shape-based guess cannot tell them
    # apart; reading these scales with 72-row blocks puts the huge scale on rows 72..127
    wrong = dequantize_weight_blockwise(q, s, (72, 128))
    assert ((wrong[72:128] - w[72:128]).norm() / w[72:128].norm()).item() > 10


def test_all_zero_weight():
    w = torch.zeros(144, 200)
    q, s = quantize_weight_blockwise(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    torch.testing.assert_close(s, torch.full((2, 2), 1e-4 / FP8_E4M3_MAX))
    deq = dequantize_weight_blockwise(q, s)
    assert not torch.isnan(deq).any()
    assert torch.equal(deq, torch.zeros_like(w))
    # a zero block next to nonzero ones
    w2 = random_weight(3)
    w2[:128, :128] = 0
    _, _, deq2 = check_roundtrip(w2)
    assert torch.equal(deq2[:128, :128], torch.zeros(128, 128))


def is_power_of_two(t: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(t)
    return bool((mantissa == 0.5).all())


@pytest.mark.parametrize("seed", [4, 5])
def test_ue8m0_weight_scales(seed):
    w = random_weight(seed)
    w[128:, :128] *= 37.0
    q, s, deq = check_roundtrip(w, ue8m0=True)
    assert is_power_of_two(s)
    plain = naive_block_amax(w, (128, 128)) / FP8_E4M3_MAX
    assert (s >= plain * (1 - 1e-6)).all() and (s < 2 * plain).all()
    assert q.float().abs().max().item() <= FP8_E4M3_MAX
    # an amax that is exactly 448 * 2**k keeps scale 2**k (no extra rounding up)
    w3 = torch.zeros(128, 128)
    w3[5, 7] = FP8_E4M3_MAX * 2.0**-10
    _, s3 = quantize_weight_blockwise(w3, ue8m0=True)
    assert s3.item() == 2.0**-10


def test_mismatched_scale_shape_raises():
    w = random_weight(6)
    q, s = quantize_weight_blockwise(w)
    bad = torch.ones(1, 2)
    with pytest.raises(ValueError) as exc:
        dequantize_weight_blockwise(q, bad)
    msg = str(exc.value)
    assert "(1, 2)" in msg and "(2, 2)" in msg
    # a transposed scale (in-blocks x out-blocks) is caught too
    q2, s2 = quantize_weight_blockwise(random_weight(6, 144, 300))
    assert s2.shape == (2, 3)
    with pytest.raises(ValueError) as exc:
        dequantize_weight_blockwise(q2, s2.t())
    assert "(3, 2)" in str(exc.value) and "(2, 3)" in str(exc.value)


def test_vectorised_dequant_matches_naive_loop():
    for block, shape in [((128, 128), (144, 200)), ((64, 32), (100, 70)), ((128, 128), (256, 128))]:
        w = random_weight(7, *shape)
        w[-3:, -5:] *= 50.0
        q, s = quantize_weight_blockwise(w, block)
        assert s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
        fast = dequantize_weight_blockwise(q, s, block)
        assert torch.equal(fast, naive_dequant(q, s, block))
        # a list (as in quantization_config.weight_block_size) is accepted too
        assert torch.equal(dequantize_weight_blockwise(q, s, list(block)), fast)


def test_dequant_dtype_and_hub_style_bf16_input():
    w = random_weight(8).to(torch.bfloat16)
    q, s = quantize_weight_blockwise(w)
    out = dequantize_weight_blockwise(q, s, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - w.float()).norm() / w.float().norm()).item() < 0.04


def test_activation_tiles_with_partial_last_tile():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 200, generator=g)
    x[..., 128:] *= 500.0  # partial last tile (72 channels) much larger
    x[1, 2] = 0.0  # one all-zero token
    q, s = quantize_activation_tilewise(x)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (3, 5, 2) and s.dtype == torch.float32
    expected = torch.stack(
        [x[..., :128].abs().amax(-1), x[..., 128:].abs().amax(-1)], dim=-1
    ).clamp(min=1e-4) / FP8_E4M3_MAX
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    deq = dequantize_activation_tilewise(q, s)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[1, 2], torch.zeros(200))
    scale_full = s.repeat_interleave(128, dim=-1)[..., :200]
    assert ((deq - x).abs() <= elementwise_bound(x, scale_full)).all()
    # the small first tiles keep their accuracy despite the large last tile
    assert ((deq[..., :128] - x[..., :128]).norm() / x[..., :128].norm()).item() < 0.04
    # ue8m0 activations
    qu, su = quantize_activation_tilewise(x, ue8m0=True)
    assert is_power_of_two(su)
    deq_u = dequantize_activation_tilewise(qu, su, dtype=torch.bfloat16)
    assert deq_u.dtype == torch.bfloat16
    assert ((deq_u.float() - x).norm() / x.norm()).item() < 0.04
    with pytest.raises(ValueError) as exc:
        dequantize_activation_tilewise(q, s[..., :1])
    assert "(3, 5, 1)" in str(exc.value) and "(3, 5, 2)" in str(exc.value)


def test_activation_small_tile_and_1d():
    x = torch.linspace(-3.0, 5.0, 10)
    q, s = quantize_activation_tilewise(x, tile=4)
    assert s.shape == (3,)
    expected = torch.stack([x[:4].abs().max(), x[4:8].abs().max(), x[8:].abs().max()]) / FP8_E4M3_MAX
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    deq = dequantize_activation_tilewise(q, s, tile=4)
    assert ((deq - x).abs() <= elementwise_bound(x, s.repeat_interleave(4)[:10])).all()


def test_fp8_linear_reference():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 200, generator=g)
    w = torch.randn(144, 200, generator=g) * 0.02
    y = fp8_linear_reference(x, w)
    assert y.shape == (6, 144) and y.dtype == torch.float32
    exact = x @ w.t()
    assert ((y - exact).norm() / exact.norm()).item() < 0.05
    # exactly the quantise-dequantise emulation, computed by hand
    xq, xs = quantize_activation_tilewise(x, 128)
    wq, ws = quantize_weight_blockwise(w, (128, 128))
    by_hand = dequantize_activation_tilewise(xq, xs, 128) @ dequantize_weight_blockwise(wq, ws, (128, 128)).t()
    assert torch.equal(y, by_hand)
    # and with the naive loop dequantisation as an independent reference
    naive = dequantize_activation_tilewise(xq, xs, 128) @ naive_dequant(wq, ws, (128, 128)).t()
    torch.testing.assert_close(y, naive, rtol=1e-6, atol=1e-6)
    # pre-quantised weight (hub checkpoint style) gives the same result
    assert torch.equal(fp8_linear_reference(x, wq, weight_scale_inv=ws), y)
    with pytest.raises(ValueError):
        fp8_linear_reference(x, wq)


def test_fp8_linear_reference_batched_bf16_and_ue8m0():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 200, generator=g).to(torch.bfloat16)
    w = (torch.randn(144, 200, generator=g) * 0.02).to(torch.bfloat16)
    exact = x.float() @ w.float().t()
    for ue8m0 in (False, True):
        y = fp8_linear_reference(x, w, ue8m0=ue8m0)
        assert y.shape == (2, 3, 144) and y.dtype == torch.bfloat16
        assert ((y.float() - exact).norm() / exact.norm()).item() < 0.05
    y2 = fp8_linear_reference(x.reshape(6, 200), w)
    torch.testing.assert_close(fp8_linear_reference(x, w).reshape(6, 144), y2, rtol=0, atol=0)
    with pytest.raises(ValueError):
        fp8_linear_reference(x, w[:, :100])
