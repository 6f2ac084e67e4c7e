"""DeepSeekMoE: shared experts + fine-grained routed experts with auxiliary-loss-free balancing.

V3 report §2.1.2: token-to-expert affinity ``s_i = sigmoid(u·e_i)`` (eq. 15); experts are chosen by
``s_i + b_i`` with the bias ``b`` (``e_score_correction_bias``) kept outside the gradient (eq. 16),
group-limited to the best ``topk_group`` of ``n_group`` groups (a group scores the sum of its top-2
biased affinities); the gate weights use the UNBIASED affinities of the chosen experts normalised to
sum 1 and scaled by ``routed_scaling_factor`` (eq. 13). No token is dropped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import SwiGLU


@dataclass
class Routing:
    """One router decision for N tokens."""

    expert_ids: torch.Tensor  # [N, k] int64
    weights: torch.Tensor  # [N, k] float32: normalised unbiased affinities × routed_scaling_factor
    scores: torch.Tensor  # [N, E] float32 sigmoid affinities (for the sequence-wise balance loss)


class Router(nn.Module):
    """Sigmoid router with the bias term and group-limited top-k (stored as ``mlp.gate``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            grouped = biased.view(-1, self.n_group, self.n_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            # Excluded groups get -inf (not 0): with negative biases a 0 could still be picked.
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(biased)
        expert_ids = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(expert_ids, weights * self.scaling, scores)


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward AND backward here (probed once per device kind)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The probe runs inside the first forward, possibly under activation checkpointing: identity
    # saved-tensor hooks keep its tensors out of the checkpoint's count (the recomputation skips it).
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            a = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
            offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
            out = torch._grouped_mm(a, b, offs=offs)
            # A dense upstream gradient: ``.sum().backward()`` would send a stride-0 (expanded)
            # gradient, which _grouped_mm's backward rejects, and the probe would wrongly say no.
            out.backward(torch.ones_like(out))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows of ``x`` [M, K], sorted by expert with ``counts`` [E] rows each, times ``w[e]`` [E, N, K]ᵀ.

    ``impl``: ``grouped_mm`` (one ``torch._grouped_mm`` call, no host sync), ``loop`` (one matmul per
    expert over its contiguous slice — the portable fallback) or ``auto``: ``grouped_mm`` where it
    runs. Under ``torch.compile`` in dtypes other than bf16 (the compiler's shape function for
    ``_grouped_mm`` takes bf16 only) the product is :func:`expert_matmul_op`, one operator the
    compiler keeps whole and fuses everything around.
    """
    if impl == "auto" and torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return expert_matmul_op(x, w, counts)
    if impl == "grouped_mm" or (impl == "auto" and _grouped_mm_works(x.device.type, x.dtype)):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    outs = [xe @ w[e].t() for e, xe in enumerate(x.split(counts.tolist())) if xe.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


@torch.library.custom_op("nanoseek::expert_matmul", mutates_args=())
def expert_matmul_op(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_matmul` (``auto``) as one custom operator: what ``torch.compile`` calls in float32,
    where it cannot trace ``_grouped_mm`` and the per-expert row counts are data. Backward:
    :func:`_expert_matmul_backward`."""
    return grouped_matmul(x, w, counts)


@expert_matmul_op.register_fake
def _(x, w, counts):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("nanoseek::expert_weight_grad", mutates_args=())
def expert_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the grouped product: ``dW[e] = grad[rows of e]ᵀ @ x[rows of e]``."""
    sizes = counts.tolist()
    dw = [g.t() @ xe for g, xe in zip(grad.split(sizes), x.split(sizes))]
    return torch.stack(dw) if dw else grad.new_zeros(0, grad.shape[1], x.shape[1])


@expert_weight_grad.register_fake
def _(grad, x, counts):
    return grad.new_empty(counts.shape[0], grad.shape[1], x.shape[1])


def _expert_matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _expert_matmul_backward(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad = grad.contiguous()
    dx = expert_matmul_op(grad, w.transpose(-2, -1), counts) if ctx.needs_input_grad[0] else None
    dw = expert_weight_grad(grad, x, counts) if ctx.needs_input_grad[1] else None
    return dx, dw, None


expert_matmul_op.register_autograd(_expert_matmul_backward, setup_context=_expert_matmul_setup)


class RoutedExperts(nn.Module):
    """``n_routed_experts`` SwiGLU experts stored stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.impl = "auto"

    #: whether a forward of at most ``E`` token-expert pairs may use :meth:`gathered`
    gathers_small_batches = True

    def expert_matmul(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' GEMM: :func:`grouped_matmul` (FP8 training overrides it, see ``nanoseek.fp8_training``)."""
        return grouped_matmul(x, w, counts, self.impl)

    def forward(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] → ([N, H], tokens per expert [E]). No token loop: one permutation in and one out,
        or, under ``torch.compile`` with at most ``E`` token-expert pairs (a compiled decode step),
        :meth:`gathered` (eagerly its weight copies cost more than the grouped GEMM)."""
        n_experts = self.gate_up_proj.shape[0]
        flat_ids = routing.expert_ids.reshape(-1)
        counts = torch.zeros(n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))  # bincount's output size is data to a compiler
        small = flat_ids.shape[0] <= n_experts
        if self.gathers_small_batches and self.impl == "auto" and small and torch.compiler.is_compiling():
            return self.gathered(x, routing), counts
        top_k = routing.expert_ids.shape[1]
        order = flat_ids.argsort(stable=True)
        token_of = order // top_k
        # index_select, not x[token_of]: its backward is index_add_, ~6x faster on the CPU than the
        # accumulating index_put_ that advanced indexing's backward runs (2048 × 192 rows, 2 threads)
        xs = x.index_select(0, token_of)
        gate, up = self.expert_matmul(xs, self.gate_up_proj, counts).chunk(2, dim=-1)
        ys = self.expert_matmul(F.silu(gate) * up, self.down_proj, counts)
        ys = ys * routing.weights.reshape(-1).index_select(0, order).unsqueeze(-1).to(ys.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))  # FP8 GEMMs return autocast's dtype
        return out, counts

    def gathered(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Each token times its own experts' weights, gathered: with no more token-expert pairs than
        experts this reads about what the grouped GEMM reads, in a few fixed-shape operations (no sort,
        no per-expert split), which is what a compiled decode step wants."""
        ids = routing.expert_ids
        gate, up = torch.einsum("nh,nkih->nki", x, self.gate_up_proj[ids]).chunk(2, dim=-1)
        ys = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, self.down_proj[ids])
        return (ys * routing.weights.unsqueeze(-1).to(ys.dtype)).sum(dim=1)


@dataclass
class MoEStats:
    expert_load: torch.Tensor  # [E] tokens routed to each expert in this forward
    balance_loss: torch.Tensor | None  # sequence-wise balance loss (already × α), when α > 0


class DeepSeekMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (SwiGLU(config.hidden_size, config.n_shared_experts * config.moe_intermediate_size)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, balance_alpha: float = 0.0) -> tuple[torch.Tensor, MoEStats]:
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        routing = self.gate(flat)
        routed, counts = self.experts(flat, routing)
        out = routed.view(b, t, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        balance = sequence_balance_loss(routing, b, t) * balance_alpha if balance_alpha > 0 else None
        return out, MoEStats(counts, balance)


def sequence_balance_loss(routing: Routing, batch: int, seq: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss without α (V3 report eq. 17-20), mean over sequences.

    ``f_i = E/(k·T) · Σ_t 1[i ∈ topk_t]``, ``P_i = 1/T · Σ_t s_{i,t}/Σ_j s_{j,t}``, loss ``Σ_i f_i P_i``.
    """
    n_experts = routing.scores.shape[-1]
    top_k = routing.expert_ids.shape[-1]
    chosen = torch.zeros(batch * seq, n_experts, device=routing.scores.device)
    chosen.scatter_(1, routing.expert_ids, 1.0)
    f = chosen.view(batch, seq, n_experts).sum(1) * (n_experts / (top_k * seq))
    normalised = routing.scores / routing.scores.sum(-1, keepdim=True)
    p = normalised.view(batch, seq, n_experts).mean(1)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_routing_bias(router: Router, expert_load: torch.Tensor, speed: float) -> None:
    """Auxiliary-loss-free balancing (V3 report §2.1.2): ``b_i += γ·sign(mean_load − load_i)``.

    Runs on the device with no host sync; ``expert_load`` is the token count per expert of the step.
    """
    load = expert_load.float()
    router.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))
