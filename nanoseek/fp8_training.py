"""FP8 training applied from outside the model (torchtitan style): ``convert_to_fp8(model)``.

DeepSeek-V3 technical report (arXiv:2412.19437) §3.3 trains with block-wise FP8 (E4M3) GEMMs. This
module swaps the GEMMs of an existing :class:`~nanoseek.model.DeepSeekV3` in place, without touching
the model definition or its checkpoints:

* converted (V3 §3.3.1, "most core computation kernels, i.e. GEMM operations, are implemented in
  FP8"): the ``nn.Linear`` projections of attention (``q_proj`` or ``q_a_proj``/``q_b_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), the dense SwiGLU MLPs, the shared experts and
  the MTP modules' ``eh_proj`` become :class:`Float8BlockLinear`; the stacked routed experts become
  :class:`Float8RoutedExperts` (FP8 grouped GEMM). The MTP modules' own attention and MoE are
  converted too.
* kept in high precision (V3 §3.3.1: "the embedding module, the output head, MoE gating modules,
  normalization operators, and attention operators"): ``embed_tokens``, ``lm_head``, the router
  (``mlp.gate``), every RMSNorm and the attention itself (scores, softmax, the value product).

Both swapped module types keep the SAME parameter objects under the same names, so
``model.state_dict()`` keys (and ``nanoseek.save`` output) are unchanged, tied weights stay tied and
master weights, gradients and optimizer state keep their dtype (float32 in nanoseek's recipe).

What one converted GEMM computes (``Q`` = quantise to E4M3 with one scale per tile, ``deq`` = multiply
back; scales = max(amax, 1e-4) / 448, powers of two when ``ue8m0``; see :mod:`nanoseek.fp8`). For a
linear ``y = x Wᵀ`` with ``x`` [M, K] (M = tokens), ``W`` [N, K]:

* forward (Fprop, reduction over K): ``y = deq(Q_1x128(x)) · deq(Q_128x128(W))ᵀ`` — x per token per
  128 input channels, W per 128x128 block.
* backward, input gradient (Dgrad, reduction over N): ``dx = deq(Q_1x128(dy)) · deq(Q_128x128(W))`` —
  dy per token per 128 output channels, the SAME quantised weight as the forward (its 128x128 blocks
  serve the transposed product as well).
* backward, weight gradient (Wgrad, reduction over M, the tokens):
  ``dW = deq(Q_128x1(dy))ᵀ · deq(Q_128x1(x̂))`` — both operands quantised in tiles of 128 TOKENS per
  channel, where ``x̂ = deq(Q_1x128(x))`` is the FP8 copy of the input kept from the forward. This is
  the V3 workflow (§3.5.2: activations are stored as 1x128 FP8 tiles in the forward and, for the
  backward, "read out, dequantized, transposed, re-quantized into 128x1 tiles"), so the input of the
  Wgrad is quantised twice; nothing but the FP8 input and the FP8 weight is saved for backward.
* routed experts: the same three products per expert. Tiles never cross expert boundaries: 1x128
  tiles are per row anyway, weights get their own 128x128 grid per expert, and the Wgrad's 128x1
  tiles restart at each expert's first row (the reduction there runs over one expert's tokens).
  Partial tiles and blocks (sizes that are not multiples of 128) use the amax of their own elements.

Every product is accumulated in float32 (V3 §3.3.2 promotes partial sums to FP32 every 128 elements
of K; accumulating fully in FP32 is at least as precise; where a caller enables TF32 matmuls on a
GPU, the emulation inherits TF32 rounding, ~1e-3, far below the FP8 error). Outputs come back in the
autocast dtype when autocast is on (as ``nn.Linear`` would), else in the input's dtype; gradients in
the dtype of the tensor they belong to.

This is a pure-PyTorch quantise-dequantise emulation: exact about what FP8 storage loses, runs on
any device (the CPU included), but it multiplies dequantised float32 copies, so it is SLOWER than
bf16, not faster. There are no fused GPU kernels (FP8 GEMMs with block scales) yet.

Apply the conversion after the model is built (and moved to its device) and before the optimizer
and ``torch.compile`` are created.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NanoseekError
from .fp8 import (
    _scale_from_amax,
    _to_fp8,
    dequantize_activation_tilewise,
    dequantize_weight_blockwise,
    quantize_activation_tilewise,
    quantize_weight_blockwise,
)
from .model.layers import SwiGLU
from .model.mla import MultiHeadLatentAttention
from .model.moe import RoutedExperts, grouped_matmul
from .model.mtp import MTPModule

__all__ = [
    "Float8BlockLinear",
    "Float8RoutedExperts",
    "convert_to_fp8",
    "fp8_converted_modules",
    "fake_quantize_rows",
    "fake_quantize_segment_columns",
    "quantize_weight_stack",
    "dequantize_weight_stack",
]

ATTENTION_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
SWIGLU_LINEARS = ("gate_proj", "up_proj", "down_proj")
MTP_LINEARS = ("eh_proj",)


# =============================================================================== quantisation helpers
def _check_block(block: int) -> int:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"FP8 block size must be a positive int, got {block!r}")
    return block


def fake_quantize_rows(t: torch.Tensor, block: int = 128, ue8m0: bool = False) -> torch.Tensor:
    """``deq(Q(t))`` with one scale per row per ``block`` columns (1x128 tiles), as float32."""
    q, s = quantize_activation_tilewise(t, block, ue8m0=ue8m0)
    return dequantize_activation_tilewise(q, s, block)


def fake_quantize_segment_columns(t: torch.Tensor, counts: torch.Tensor, block: int = 128,
                                  ue8m0: bool = False) -> torch.Tensor:
    """``deq(Q(t))`` for ``t`` [M, C] whose rows are grouped in segments of ``counts`` rows (experts).

    One scale per column per ``block`` consecutive rows (128x1 tiles); tiles restart at the first row
    of every segment, so none spans two segments; a segment's last tile may be partial. With a single
    segment this is plain 128x1 quantisation along the rows. Vectorised, no host synchronisation.
    Returns float32 [M, C].
    """
    block = _check_block(block)
    if t.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [rows, columns], got shape {tuple(t.shape)}")
    m, c = t.shape
    n_seg = counts.numel()
    counts = counts.to(device=t.device, dtype=torch.long)
    seg_of_row = torch.repeat_interleave(torch.arange(n_seg, device=t.device), counts, output_size=m)
    seg_start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(m, device=t.device) - seg_start[seg_of_row]
    tiles_per_seg = (counts + block - 1) // block
    tile_start = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    tile_of_row = tile_start[seg_of_row] + pos // block
    n_tiles = m // block + n_seg + 1  # upper bound of sum(ceil(count / block)); no host sync
    tf = t.float()
    amax = tf.new_zeros(n_tiles, c).scatter_reduce_(0, tile_of_row[:, None].expand(m, c), tf.abs(), reduce="amax")
    scale = _scale_from_amax(amax, ue8m0)[tile_of_row]
    return _to_fp8(tf / scale).float() * scale


def quantize_weight_stack(w: torch.Tensor, block: int = 128, ue8m0: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise stacked expert weights ``w`` [E, N, K]: one 128x128 block grid PER expert.

    Same rule as :func:`nanoseek.fp8.quantize_weight_blockwise` on each ``w[e]`` (blocks never span
    two experts). Returns (E4M3 [E, N, K], float32 multipliers [E, ceil(N/block), ceil(K/block)]).
    """
    block = _check_block(block)
    if w.dim() != 3:
        raise ValueError(f"expected stacked weights [experts, out, in], got shape {tuple(w.shape)}")
    e, n, k = w.shape
    nbn, nbk = math.ceil(n / block), math.ceil(k / block)
    padded = F.pad(w.float(), (0, nbk * block - k, 0, nbn * block - n))
    blocks = padded.view(e, nbn, block, nbk, block)
    scale = _scale_from_amax(blocks.abs().amax(dim=(2, 4)), ue8m0)
    q = _to_fp8(blocks / scale[:, :, None, :, None])
    return q.view(e, nbn * block, nbk * block)[:, :n, :k].contiguous(), scale


def dequantize_weight_stack(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of :func:`quantize_weight_stack`: float32 [E, N, K]."""
    e, n, k = q.shape
    s = scale.float().repeat_interleave(block, dim=1)[:, :n].repeat_interleave(block, dim=2)[:, :, :k]
    return q.float() * s


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``nn.Linear`` would return here: the autocast dtype when autocast is on, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _no_autocast(device_type: str):
    """The emulation computes in float32 on purpose: keep autocast from recasting its matmuls."""
    return torch.autocast(device_type, enabled=False)


# =============================================================================== dense linear
class _Float8BlockMatmul(torch.autograd.Function):
    """``y = x Wᵀ`` with block-wise FP8 operands in all three GEMMs (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, block, ue8m0, out_dtype):
        with _no_autocast(x.device.type):
            xq, xs = quantize_activation_tilewise(x, block, ue8m0=ue8m0)
            wq, ws = quantize_weight_blockwise(weight, (block, block), ue8m0=ue8m0)
            y = torch.matmul(dequantize_activation_tilewise(xq, xs, block),
                             dequantize_weight_blockwise(wq, ws, (block, block)).t())
        ctx.save_for_backward(xq, xs, wq, ws)  # FP8 copies only (plus their float32 scales)
        ctx.block, ctx.ue8m0 = block, ue8m0
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        block, ue8m0 = ctx.block, ctx.ue8m0
        dx = dw = None
        with _no_autocast(dy.device.type):
            if ctx.needs_input_grad[0]:  # Dgrad: reduction over N; dy in 1x128 tiles along N
                w = dequantize_weight_blockwise(wq, ws, (block, block))
                dx = torch.matmul(fake_quantize_rows(dy, block, ue8m0), w).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad: reduction over tokens; both operands in 128x1 tiles
                x_fp8 = dequantize_activation_tilewise(xq, xs, block)
                dy_t = fake_quantize_rows(dy.t(), block, ue8m0)  # [N, M]: 128 tokens per tile
                x_t = fake_quantize_rows(x_fp8.t(), block, ue8m0)  # [K, M]
                dw = torch.matmul(dy_t, x_t.t()).to(ctx.w_dtype)
        return dx, dw, None, None, None


class Float8BlockLinear(nn.Linear):
    """``nn.Linear`` whose three GEMMs run with block-wise FP8 operands (V3 report §3.3).

    Same parameters (``weight`` [out, in], optional ``bias``) and state-dict keys as ``nn.Linear``;
    the bias is added after the FP8 GEMM in the output dtype. Build one from an existing linear with
    :meth:`from_linear` (shares its parameters).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 block: int = 128, ue8m0: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = _check_block(block)
        self.ue8m0 = bool(ue8m0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block: int = 128, ue8m0: bool = False) -> Float8BlockLinear:
        """A converted copy of ``linear`` holding the SAME ``weight``/``bias`` Parameter objects."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.block = _check_block(block)
        new.ue8m0 = bool(ue8m0)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _Float8BlockMatmul.apply(x.reshape(-1, self.in_features), self.weight, self.block, self.ue8m0,
                                     _out_dtype(x))
        y = y.reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def computed_weight(self) -> torch.Tensor:
        """``deq(Q_128x128(W))`` in the weight's dtype: the weight the forward multiplies by (MLA's
        absorbed decode folds it into the query and output, :func:`nanoseek.model.layers.computed_weight`)."""
        block = (self.block, self.block)
        with _no_autocast(self.weight.device.type):
            wq, ws = quantize_weight_blockwise(self.weight, block, ue8m0=self.ue8m0)
            return dequantize_weight_blockwise(wq, ws, block).to(self.weight.dtype)

    def computed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``deq(Q_1x128(x))`` in ``x``'s dtype: the input the forward multiplies."""
        with _no_autocast(x.device.type):
            rows = fake_quantize_rows(x.reshape(-1, self.in_features), self.block, self.ue8m0)
        return rows.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def quantized_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The forward's FP8 operands for ``x``: (x_fp8, x_scales [.., ceil(in/128)], w_fp8, w_scales)."""
        xq, xs = quantize_activation_tilewise(x.reshape(-1, self.in_features), self.block, ue8m0=self.ue8m0)
        wq, ws = quantize_weight_blockwise(self.weight, (self.block, self.block), ue8m0=self.ue8m0)
        return xq, xs, wq, ws

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 block={self.block} ue8m0={self.ue8m0}"


# =============================================================================== routed experts
class _Float8GroupedMatmul(torch.autograd.Function):
    """Rows of ``x`` [M, K] sorted by expert (``counts`` [E]) times ``w[e]ᵀ`` ([E, N, K]), FP8 operands."""

    @staticmethod
    def forward(ctx, x, w, counts, impl, block, ue8m0, out_dtype):
        with _no_autocast(x.device.type):
            xq, xs = quantize_activation_tilewise(x, block, ue8m0=ue8m0)
            wq, ws = quantize_weight_stack(w, block, ue8m0)
            y = grouped_matmul(dequantize_activation_tilewise(xq, xs, block),
                               dequantize_weight_stack(wq, ws, block), counts, impl)
        ctx.save_for_backward(xq, xs, wq, ws, counts)
        ctx.impl, ctx.block, ctx.ue8m0 = impl, block, ue8m0
        ctx.x_dtype, ctx.w_dtype = x.dtype, w.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws, counts = ctx.saved_tensors
        block, ue8m0 = ctx.block, ctx.ue8m0
        dx = dw = None
        with _no_autocast(dy.device.type):
            if ctx.needs_input_grad[0]:  # Dgrad per expert: dy_e · W_e (W_eᵀ stacked as [E, K, N])
                w_t = dequantize_weight_stack(wq, ws, block).transpose(1, 2).contiguous()
                dx = grouped_matmul(fake_quantize_rows(dy, block, ue8m0), w_t, counts, ctx.impl).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad per expert: reduction over that expert's tokens
                x_fp8 = dequantize_activation_tilewise(xq, xs, block)
                dy_c = fake_quantize_segment_columns(dy, counts, block, ue8m0)
                x_c = fake_quantize_segment_columns(x_fp8, counts, block, ue8m0)
                e, n, k = wq.shape
                dw = dy_c.new_zeros(e, n, k)
                sizes = counts.tolist()  # the emulation's one host sync (the plain loop GEMM has it too)
                for i, (d_e, x_e) in enumerate(zip(dy_c.split(sizes), x_c.split(sizes))):
                    if d_e.shape[0]:
                        dw[i] = d_e.t() @ x_e
                dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None, None, None


class Float8RoutedExperts(RoutedExperts):
    """:class:`RoutedExperts` whose two grouped GEMMs (gate_up, down) run with FP8 operands.

    Same ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] parameters (shared with the module it
    was built from). Each expert's stacked gate_up matrix gets one 128x128 grid; when the
    intermediate size is a multiple of 128 (as in every real config) that is exactly the separate
    gate and up grids of the hub checkpoints.
    """

    gathers_small_batches = False  # every expert GEMM goes through the FP8 path

    @classmethod
    def from_experts(cls, experts: RoutedExperts, *, block: int = 128, ue8m0: bool = False) -> Float8RoutedExperts:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_up_proj = experts.gate_up_proj
        new.down_proj = experts.down_proj
        new.impl = experts.impl
        new.block = _check_block(block)
        new.ue8m0 = bool(ue8m0)
        new.train(experts.training)
        return new

    def expert_matmul(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # The emulation multiplies float32: let "auto" probe whether grouped_mm takes float32 here.
        impl = "loop" if self.impl == "loop" else "auto"
        return _Float8GroupedMatmul.apply(x, w, counts, impl, self.block, self.ue8m0, _out_dtype(x))

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return (f"experts={e}, hidden={h}, intermediate={two_i // 2}, fp8=e4m3 block={self.block} "
                f"ue8m0={self.ue8m0}")


# =============================================================================== conversion
def _linear_names(parent: nn.Module) -> tuple[str, ...]:
    if isinstance(parent, MultiHeadLatentAttention):
        return ATTENTION_LINEARS
    if isinstance(parent, SwiGLU):  # dense MLPs and shared experts
        return SWIGLU_LINEARS
    if isinstance(parent, MTPModule):
        return MTP_LINEARS
    return ()


def convert_to_fp8(model: nn.Module, ue8m0: bool = False, *, block: int = 128,
                   filter_fn: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Swap ``model``'s FP8-eligible GEMMs for block-wise FP8 ones, in place; returns ``model``.

    Converted: attention projections, dense MLPs, shared experts, MTP ``eh_proj`` (→
    :class:`Float8BlockLinear`) and routed experts (→ :class:`Float8RoutedExperts`), in the main model
    and in the MTP modules. Untouched: embedding, LM head, router, norms, attention itself (see the
    module docstring for the exact quantisation). ``ue8m0`` rounds every scale up to a power of two
    (DeepSeek-V3.1's format). ``filter_fn(fqn, module)`` returning False keeps that module as it is.
    Modules already converted are left alone, so converting twice is harmless. Call it before
    building the optimizer and before ``torch.compile``; parameters stay the same objects, so an
    optimizer built earlier keeps working too.
    """
    _check_block(block)
    if hasattr(model, "_orig_mod"):
        raise NanoseekError("convert_to_fp8: got a torch.compile'd model; convert the plain model first, "
                            "then compile it")
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        wanted = _linear_names(parent)
        for child_name, child in parent.named_children():
            fqn = prefix + child_name
            if filter_fn is not None and not filter_fn(fqn, child):
                continue
            if child_name in wanted and type(child) is nn.Linear:
                swaps.append((parent, child_name, Float8BlockLinear.from_linear(
                    child, block=block, ue8m0=ue8m0)))
            elif type(child) is RoutedExperts:
                swaps.append((parent, child_name, Float8RoutedExperts.from_experts(
                    child, block=block, ue8m0=ue8m0)))
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    return model


def fp8_converted_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules that run FP8 GEMMs (for logs and tests)."""
    return [name for name, m in model.named_modules() if isinstance(m, (Float8BlockLinear, Float8RoutedExperts))]
