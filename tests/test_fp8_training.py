"""nanoseek.fp8_training: block-wise FP8 training GEMMs swapped in from outside the model.

Every check draws fresh random inputs and compares against a float64 reference built from the SAME
quantised operands (so only float32 rounding separates them), then against the unquantised
product (FP8 error, a few percent).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nanoseek
from nanoseek.config import get_preset
from nanoseek.fp8 import (
    dequantize_activation_tilewise,
    dequantize_weight_blockwise,
    quantize_activation_tilewise,
    quantize_weight_blockwise,
)
from nanoseek.fp8_training import (
    Float8BlockLinear,
    Float8RoutedExperts,
    convert_to_fp8,
    fp8_converted_modules,
    quantize_weight_stack,
)
from nanoseek.model import DeepSeekV3, Router, SlotLatentCache
from nanoseek.model.layers import RMSNorm
from nanoseek.model.moe import RoutedExperts

EXACT = 1e-5  # float32 accumulation vs float64 on identical operands
FP8_REL = 0.05  # E4M3 has 3 mantissa bits: ~3.7% relative error per product on random data


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def deq_rows(t: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """deq(Q_1x128(t)) built from nanoseek.fp8 primitives (independent of fp8_training)."""
    q, s = quantize_activation_tilewise(t, 128, ue8m0=ue8m0)
    return dequantize_activation_tilewise(q, s, 128)


def deq_weight(w: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    q, s = quantize_weight_blockwise(w, (128, 128), ue8m0=ue8m0)
    return dequantize_weight_blockwise(q, s, (128, 128))


# ----------------------------------------------------------------------------- dense linear
@pytest.mark.parametrize("ue8m0", [False, True])
def test_linear_matches_float64_on_the_same_quantised_operands(ue8m0):
    g = torch.Generator().manual_seed(11 + ue8m0)
    # K = 200 (tiles of 128 + 72), N = 144 (blocks of 128 + 16 rows), M = 111 tokens (partial 128x1 tile)
    x = torch.randn(3, 37, 200, generator=g)
    lin = Float8BlockLinear(200, 144, bias=False, ue8m0=ue8m0)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(144, 200, generator=g) * 0.05)
    xr = x.clone().requires_grad_()
    y = lin(xr)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)

    x2, dy2, w = x.reshape(-1, 200), dy.reshape(-1, 144), lin.weight.detach()
    xd, wd = deq_rows(x2, ue8m0).double(), deq_weight(w, ue8m0).double()
    y_ref = xd @ wd.t()  # Fprop: 1x128 x, 128x128 W
    dx_ref = deq_rows(dy2, ue8m0).double() @ wd  # Dgrad: dy 1x128 along N, same W
    # Wgrad: reduction over the 111 tokens; dy and the FP8 copy of x both re-tiled 128x1
    dw_ref = deq_rows(dy2.t(), ue8m0).double() @ deq_rows(xd.float().t(), ue8m0).double().t()
    assert rel(y.reshape(-1, 144), y_ref) < EXACT
    assert rel(xr.grad.reshape(-1, 200), dx_ref) < EXACT
    assert rel(lin.weight.grad, dw_ref) < EXACT
    assert y.dtype == torch.float32 and xr.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32

    # ... and within FP8 error of the unquantised linear
    errs = (rel(y.reshape(-1, 144), x2 @ w.t()), rel(xr.grad.reshape(-1, 200), dy2 @ w),
            rel(lin.weight.grad, dy2.t() @ x2))
    print(f"ue8m0={ue8m0}: relative error vs unquantised fprop/dgrad/wgrad = "
          + " / ".join(f"{e:.4f}" for e in errs))
    assert all(e < FP8_REL for e in errs), errs
    assert all(e > 1e-3 for e in errs), "FP8 should visibly perturb the result"


def test_linear_bias_autocast_and_shared_parameters():
    g = torch.Generator().manual_seed(3)
    plain = nn.Linear(96, 40, bias=True)
    with torch.no_grad():
        plain.bias.normal_(generator=g)
    lin = Float8BlockLinear.from_linear(plain)
    assert lin.weight is plain.weight and lin.bias is plain.bias
    assert list(lin.state_dict()) == list(plain.state_dict())
    x = torch.randn(5, 96, generator=g)
    assert rel(lin(x), plain(x)) < FP8_REL
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x.requires_grad_())
    assert y.dtype == torch.bfloat16  # what nn.Linear returns under autocast
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32


def test_ue8m0_scales_are_powers_of_two():
    g = torch.Generator().manual_seed(5)
    lin = Float8BlockLinear(160, 200, bias=False, ue8m0=True)
    xq, xs, wq, ws = lin.quantized_operands(torch.randn(7, 160, generator=g) * 3)
    _, ss = quantize_weight_stack(torch.randn(3, 136, 160, generator=g), ue8m0=True)
    for s in (xs, ws, ss):
        e = torch.log2(s)
        assert torch.equal(e, e.round()), "UE8M0 scales must be exact powers of two"
    # default mode: scales are plain amax / 448, generally not powers of two
    xs_plain = Float8BlockLinear(160, 8, bias=False).quantized_operands(torch.randn(7, 160, generator=g))[1]
    assert not torch.equal(torch.log2(xs_plain), torch.log2(xs_plain).round())


# ----------------------------------------------------------------------------- routed experts
@pytest.mark.parametrize("ue8m0", [False, True])
def test_grouped_experts_match_float64_per_expert(ue8m0):
    g = torch.Generator().manual_seed(21 + ue8m0)
    counts = torch.tensor([130, 0, 7, 300, 1])  # an empty expert; segments spanning several 128-row tiles
    m, n, k = int(counts.sum()), 80, 136
    cfg = get_preset("tiny").replace(n_routed_experts=5, n_group=1, topk_group=1, num_experts_per_tok=2,
                                     hidden_size=k, moe_intermediate_size=n // 2)
    experts = Float8RoutedExperts.from_experts(RoutedExperts(cfg), ue8m0=ue8m0)
    w = (torch.randn(5, n, k, generator=g) * 0.05).requires_grad_()
    x = torch.randn(m, k, generator=g).requires_grad_()
    y = experts.expert_matmul(x, w, counts)
    dy = torch.randn(m, n, generator=g)
    y.backward(dy)

    y_ref, dx_ref, dw_ref = [], [], torch.zeros(5, n, k, dtype=torch.float64)
    for e, (x_e, dy_e) in enumerate(zip(x.detach().split(counts.tolist()), dy.split(counts.tolist()))):
        wd = deq_weight(w[e].detach(), ue8m0).double()
        xd = deq_rows(x_e, ue8m0)
        y_ref.append(xd.double() @ wd.t())
        dx_ref.append(deq_rows(dy_e, ue8m0).double() @ wd)
        if x_e.shape[0]:  # 128x1 tiles restart at each expert's first row
            dw_ref[e] = deq_rows(dy_e.t(), ue8m0).double() @ deq_rows(xd.t(), ue8m0).double().t()
    assert rel(y, torch.cat(y_ref)) < EXACT
    assert rel(x.grad, torch.cat(dx_ref)) < EXACT
    assert rel(w.grad, dw_ref) < EXACT
    assert torch.equal(w.grad[1], torch.zeros(n, k))

    plain = [x_e @ w_e.t() for x_e, w_e in zip(x.detach().split(counts.tolist()), w.detach()) if x_e.shape[0]]
    assert rel(y, torch.cat(plain)) < FP8_REL


# ----------------------------------------------------------------------------- a converted model
def tiny_model(seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(get_preset("tiny"))


def test_convert_swaps_the_right_modules_and_keeps_the_state_dict(tmp_path):
    model = tiny_model()
    before = model.state_dict()
    params_before = {n: p for n, p in model.named_parameters()}
    assert convert_to_fp8(model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before)  # same tensors, no copies
    assert {n: p for n, p in model.named_parameters()} == params_before

    converted = set(fp8_converted_modules(model))
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{proj}" in converted
    assert {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj"} <= converted  # dense MLP
    assert "model.layers.1.mlp.shared_experts.down_proj" in converted
    assert isinstance(model.model.layers[1].mlp.experts, Float8RoutedExperts)
    assert "mtp.0.eh_proj" in converted and "mtp.0.block.self_attn.o_proj" in converted
    assert "mtp.0.block.mlp.experts" in converted

    # high precision stays: embedding, head, router, norms (and attention itself has no weights)
    assert type(model.lm_head) is nn.Linear and "lm_head" not in converted
    assert type(model.model.embed_tokens) is nn.Embedding
    for name, m in model.named_modules():
        if isinstance(m, (Router, RMSNorm)):
            assert name not in converted and not any(c.startswith(name + ".") for c in converted)
    n_linear = sum(isinstance(m, Float8BlockLinear) for m in model.modules())
    assert n_linear == len(converted) - 3  # all but the three routed-expert modules

    convert_to_fp8(model)  # idempotent
    assert set(fp8_converted_modules(model)) == converted

    nanoseek.save(model, tmp_path / "ckpt")  # checkpoints are unchanged by the conversion
    loaded = nanoseek.load(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_filter_fn_keeps_modules():
    model = convert_to_fp8(tiny_model(), filter_fn=lambda fqn, m: "experts" not in fqn)
    names = fp8_converted_modules(model)
    assert names and not any("experts" in n for n in names)


def batches(vocab: int, n: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A tiny repeated corpus: one random 48-token phrase over and over; windows at random offsets."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(2, vocab, (48,), generator=g)
    corpus = phrase.repeat(40)
    out = []
    for _ in range(n):
        starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=g)
        rows = torch.stack([corpus[s: s + seq + 1] for s in starts.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def train(fp8: bool, data, steps: int = 30) -> list[float]:
    model = tiny_model(seed=1)
    if fp8:
        convert_to_fp8(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for x, y in data[:steps]:
        loss = model(x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_loss_at_init_and_after_30_steps_close_to_float32():
    data = batches(get_preset("tiny").vocab_size, 30, batch=4, seq=32, seed=7)
    x, y = data[0]
    ref, fp8 = tiny_model(seed=1), convert_to_fp8(tiny_model(seed=1))
    with torch.no_grad():
        l_ref, l_fp8 = ref(x, labels=y).loss.item(), fp8(x, labels=y).loss.item()
    init_diff = abs(l_fp8 - l_ref) / l_ref
    assert init_diff < 0.02, (l_ref, l_fp8)

    f32 = train(False, data)
    f8 = train(True, data)
    final_diff = abs(f8[-1] - f32[-1]) / f32[-1]
    print(f"FP8 vs float32 loss: init {l_fp8:.4f} vs {l_ref:.4f} ({100 * init_diff:.3f}%), after 30 steps "
          f"{f8[-1]:.4f} vs {f32[-1]:.4f} ({100 * final_diff:.2f}% relative)")
    assert all(math.isfinite(v) for v in f8)
    assert f8[-1] < 0.5 * f8[0] and f32[-1] < 0.5 * f32[0]  # both learn the repeated phrase
    assert final_diff < 0.05


def test_pretrain_fp8_flag_trains_and_writes_plain_checkpoints(tmp_path):
    """`nanoseek pretrain --fp8` converts the model from outside and still saves HF-format weights."""
    import os
    import subprocess
    import sys

    import nanoseek

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} plus {i} makes {2 * i}.\n" for i in range(400)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--data", str(corpus),
                          "--vocab-size", "320", "--out", str(tmp_path / "run"), "--max-steps", "3",
                          "--batch-size", "2", "--seq-len", "32", "--device", "cpu", "--fp8"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    model = nanoseek.load(tmp_path / "run" / "final")
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear  # a plain model again on load


@pytest.mark.parametrize("ue8m0", [False, True])
def test_cached_decode_computes_what_the_uncached_forward_computes(ue8m0):
    """MLA's absorbed decode uses kv_b_proj's FP8 weight and input, as its expanded forward does."""
    torch.manual_seed(9)
    cfg = get_preset("tiny")
    model = convert_to_fp8(DeepSeekV3(cfg), ue8m0=ue8m0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    cache = SlotLatentCache(cfg, n_slots=2, max_len=8, device="cpu", dtype=torch.float32)
    rows = [cache.allocate(), cache.allocate()]
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :3], cache=cache.view(rows)).logits]
        steps += [model(ids[:, i:i + 1], cache=cache.view(rows)).logits for i in range(3, 8)]
        plain = DeepSeekV3(cfg)
        plain.load_state_dict(model.state_dict())
        fp8_effect = (plain.eval()(ids).logits - full).abs().max()
    # the paths agree to float32 reassociation, far inside what FP8 quantisation changes
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert fp8_effect > 100 * 1e-5, fp8_effect.item()
