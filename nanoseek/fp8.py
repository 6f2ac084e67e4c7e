"""Block-wise FP8 (E4M3) quantisation, as in the DeepSeek-V3 recipe.

DeepSeek-V3 technical report (arXiv:2412.19437), §3.3.2 "Improved Precision from
Quantization and Multiplication": instead of one scale per tensor, scales are
fine-grained so that one outlier only spoils its own group:

* weights: one scale per 128x128 block (per 128 output rows x 128 input columns);
* activations: one scale per token per 128 channels (1x128 tiles).

In each group the maximum absolute value ``amax`` is mapped onto the largest
finite E4M3 value (448): ``scale = amax / 448`` and ``q = fp8(x / scale)``, so
``x ~= q * scale``. The amax is clamped to at least 1e-4 so that all-zero
groups get a finite, nonzero scale (their q is 0 and dequantises back to 0).

The hub FP8 checkpoints (deepseek-ai/DeepSeek-V3 and later) store the E4M3
weight next to ``<name>_scale_inv``: float32 of shape
``[ceil(out/128), ceil(in/128)]``. Despite its name it is a MULTIPLIER:
``dequantised = q.float() * scale_inv`` broadcast over the block, i.e. it is
the ``scale`` above. When ``out`` or ``in`` is not a multiple of the block size
the last block row/column is partial; it is quantised with the amax of its own
(smaller) region and dequantised with its own scale.

UE8M0 (DeepSeek-V3.1 checkpoints; the V3 report, §3.3.3, already restricts some
activation scaling factors to integral powers of 2): every scale is rounded UP
to a power of two, ``2**ceil(log2(scale))``, so it can be stored as a bare
8-bit exponent. Rounding up keeps ``|x / scale| <= 448``.

Everything here is plain PyTorch and runs on whatever device its inputs live
on (CPU included); ``fp8_linear_reference`` is the quantise-dequantise
emulation that faster kernels are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FP8_E4M3_MAX",
    "AMAX_MIN",
    "quantize_weight_blockwise",
    "dequantize_weight_blockwise",
    "quantize_activation_tilewise",
    "dequantize_activation_tilewise",
    "fp8_linear_reference",
]

FP8_E4M3_MAX = 448.0
"""Largest finite value of ``torch.float8_e4m3fn``."""

AMAX_MIN = 1e-4
"""Lower clamp on a group's amax, so all-zero groups get a usable scale."""

_FP8_DTYPE = torch.float8_e4m3fn


def _as_block(block: int | Sequence[int]) -> tuple[int, int]:
    """Normalise a block size (an int, or a pair such as ``weight_block_size``)."""
    if isinstance(block, int):
        pair = (block, block)
    else:
        pair = tuple(block)
        if len(pair) != 2:
            raise ValueError(f"block size must be an int or a pair of ints, got {block!r}")
    for b in pair:
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"block sizes must be positive ints, got {block!r}")
    return pair[0], pair[1]


def _check_tile(tile: int) -> int:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise ValueError(f"tile size must be a positive int, got {tile!r}")
    return tile


def _scale_from_amax(amax: Tensor, ue8m0: bool) -> Tensor:
    """``scale = max(amax, AMAX_MIN) / 448``; with ``ue8m0`` rounded up to a power of two.

    The power-of-two rounding uses ``frexp`` (``scale = m * 2**e`` with ``m`` in
    [0.5, 1)), which is exact: a scale that already is a power of two (``m == 0.5``)
    stays as it is, any other one becomes ``2**e``.
    """
    scale = amax.float().clamp(min=AMAX_MIN) / FP8_E4M3_MAX
    if ue8m0:
        mantissa, exponent = torch.frexp(scale)
        exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
        scale = torch.ldexp(torch.ones_like(scale), exponent)
    return scale


def _to_fp8(scaled: Tensor) -> Tensor:
    """Cast to E4M3, saturating: ``|scaled|`` may exceed 448 by float32 rounding only."""
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(_FP8_DTYPE)


def quantize_weight_blockwise(
    w: Tensor,
    block: tuple[int, int] = (128, 128),
    ue8m0: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantise a 2-D weight ``[out, in]`` to E4M3 with one scale per block.

    DeepSeek-V3 report (arXiv:2412.19437) §3.3.2: weights are grouped into
    128x128 blocks (``block`` = (rows, cols), e.g. a config's
    ``quantization_config.weight_block_size``); each block gets
    ``scale = max(amax, 1e-4) / 448`` (rounded up to a power of two when
    ``ue8m0``) and ``q = fp8_e4m3fn(w / scale)``. Partial edge blocks use the
    amax of their own elements only.

    Returns ``(q, scale_inv)``: ``q`` has ``w``'s shape and dtype
    ``torch.float8_e4m3fn``; ``scale_inv`` is float32 of shape
    ``[ceil(out / rows), ceil(in / cols)]`` and, as in the hub checkpoints, is
    the multiplier that dequantises: ``w ~= q.float() * scale_inv`` per block.
    """
    bo, bi = _as_block(block)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {w.dtype}")
    out_f, in_f = w.shape
    nbo, nbi = math.ceil(out_f / bo), math.ceil(in_f / bi)
    wf = w.float()
    # Zero padding does not change any block's amax (|0| <= amax).
    padded = F.pad(wf, (0, nbi * bi - in_f, 0, nbo * bo - out_f))
    blocks = padded.view(nbo, bo, nbi, bi)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = _scale_from_amax(amax, ue8m0)
    q = _to_fp8(blocks / scale[:, None, :, None])
    q = q.view(nbo * bo, nbi * bi)[:out_f, :in_f].contiguous()
    return q, scale


def dequantize_weight_blockwise(
    q: Tensor,
    scale_inv: Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dequantise a block-quantised 2-D weight: ``q.float() * scale_inv`` per block.

    DeepSeek-V3 report (arXiv:2412.19437) §3.3.2; ``scale_inv`` is the hub
    checkpoints' ``<name>_scale_inv`` tensor, a per-block multiplier of shape
    ``[ceil(out / rows), ceil(in / cols)]`` for ``block = (rows, cols)``.
    The block size is taken from ``block``, never guessed from shapes, so
    partial edge blocks (e.g. a 144-row weight: blocks of 128 and 16 rows) get
    their own scale. Raises ``ValueError`` naming both shapes if ``scale_inv``
    does not have the expected shape. Computed in float32, returned as ``dtype``.
    """
    bo, bi = _as_block(block)
    if q.dim() != 2:
        raise ValueError(f"expected a 2-D quantised weight [out, in], got shape {tuple(q.shape)}")
    out_f, in_f = q.shape
    expected = (math.ceil(out_f / bo), math.ceil(in_f / bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a weight of shape "
            f"{tuple(q.shape)} with block size {(bo, bi)} needs shape {expected}"
        )
    s = scale_inv.to(device=q.device, dtype=torch.float32)
    s = s.repeat_interleave(bo, dim=0)[:out_f].repeat_interleave(bi, dim=1)[:, :in_f]
    return (q.float() * s).to(dtype)


def quantize_activation_tilewise(
    x: Tensor,
    tile: int = 128,
    ue8m0: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantise activations to E4M3 with one scale per token per ``tile`` channels.

    DeepSeek-V3 report (arXiv:2412.19437) §3.3.2: activations are grouped into
    1x128 tiles along the last (channel) dimension; each tile gets
    ``scale = max(amax, 1e-4) / 448`` (rounded up to a power of two when
    ``ue8m0``) and ``q = fp8_e4m3fn(x / scale)``. A partial last tile (when the
    channel count is not a multiple of ``tile``) uses its own amax.

    Returns ``(q, scale)``: ``q`` has ``x``'s shape and dtype
    ``torch.float8_e4m3fn``; ``scale`` is float32 of shape
    ``[..., ceil(d / tile)]`` and dequantises by multiplication.
    """
    tile = _check_tile(tile)
    if x.dim() < 1:
        raise ValueError("expected at least one dimension (the channels)")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point activation, got {x.dtype}")
    lead, d = tuple(x.shape[:-1]), x.shape[-1]
    nt = math.ceil(d / tile)
    padded = F.pad(x.float(), (0, nt * tile - d))
    tiles = padded.reshape(*lead, nt, tile)
    amax = tiles.abs().amax(dim=-1)
    scale = _scale_from_amax(amax, ue8m0)
    q = _to_fp8(tiles / scale[..., None])
    q = q.reshape(*lead, nt * tile)[..., :d].contiguous()
    return q, scale


def dequantize_activation_tilewise(
    q: Tensor,
    scale: Tensor,
    tile: int = 128,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dequantise tile-quantised activations: ``q.float() * scale`` per 1x``tile`` tile.

    DeepSeek-V3 report (arXiv:2412.19437) §3.3.2. ``scale`` must have shape
    ``[..., ceil(d / tile)]`` where ``q`` has shape ``[..., d]``; otherwise a
    ``ValueError`` names both shapes. Computed in float32, returned as ``dtype``.
    """
    tile = _check_tile(tile)
    if q.dim() < 1:
        raise ValueError("expected at least one dimension (the channels)")
    d = q.shape[-1]
    expected = (*q.shape[:-1], math.ceil(d / tile))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)} but activations of shape "
            f"{tuple(q.shape)} with tile size {tile} need shape {expected}"
        )
    s = scale.to(device=q.device, dtype=torch.float32)
    s = s.repeat_interleave(tile, dim=-1)[..., :d]
    return (q.float() * s).to(dtype)


def fp8_linear_reference(
    x: Tensor,
    weight: Tensor,
    block: int = 128,
    ue8m0: bool = False,
    *,
    weight_scale_inv: Tensor | None = None,
) -> Tensor:
    """Reference FP8 linear ``y = x @ weight.T`` by quantise-dequantise emulation.

    Follows the fine-grained FP8 GEMM of the DeepSeek-V3 report
    (arXiv:2412.19437) §3.3.2: ``x`` ``[..., in]`` is quantised per 1x``block``
    tile, ``weight`` ``[out, in]`` per ``block``x``block`` block (both to E4M3,
    UE8M0 scales if ``ue8m0``), both are dequantised to float32 and multiplied
    in float32; the result ``[..., out]`` is returned in ``x.dtype``. This is
    slow but exact about what the quantisation loses, and runs on CPU.

    If ``weight_scale_inv`` is given, ``weight`` is taken as already quantised
    (e.g. an E4M3 tensor from a hub checkpoint with its ``_scale_inv``) and is
    only dequantised; ``ue8m0`` then applies to the activations only.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input has {x.shape[-1]} features but the weight of shape "
            f"{tuple(weight.shape)} expects {weight.shape[1]}"
        )
    blk = (block, block)
    if weight_scale_inv is None:
        if weight.dtype == _FP8_DTYPE:
            raise ValueError("weight is already float8_e4m3fn: pass its weight_scale_inv")
        wq, ws = quantize_weight_blockwise(weight, blk, ue8m0=ue8m0)
    else:
        wq, ws = weight, weight_scale_inv
    w_deq = dequantize_weight_blockwise(wq, ws, blk)
    xq, xs = quantize_activation_tilewise(x, block, ue8m0=ue8m0)
    x_deq = dequantize_activation_tilewise(xq, xs, block)
    return torch.matmul(x_deq, w_deq.t()).to(x.dtype)
