"""Muon for the hidden matrices, AdamW for the rest: one optimizer (``TrainConfig.optimizer = "muon"``).

Muon (K. Jordan et al., 2024, "Muon: an optimizer for hidden layers in neural networks") replaces a
matrix's update by the orthogonalised momentum: with ``M_t = μ M_{t-1} + G_t`` and the Nesterov
input ``N_t = G_t + μ M_t``, the update is ``O_t ≈ U Vᵀ`` where ``N_t = U S Vᵀ``, computed by five
steps of the quintic Newton-Schulz iteration ``X ← a X + (b A + c A²) X``, ``A = X Xᵀ``
(coefficients (3.4445, −4.7750, 2.0315), after normalising ``X`` to spectral norm ≤ 1).

Moonlight (Liu et al., 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982, trained a
DeepSeek-V3-style MoE with it) adds the two pieces that let it replace AdamW without retuning:
decoupled weight decay, and an update scaled by ``0.2 · sqrt(max(A, B))`` for an A×B matrix, which
matches AdamW's typical update RMS (eq. 4 there), so AdamW's learning rate and schedule carry over:

    W ← W − η (0.2 · sqrt(max(A, B)) · O_t + λ W)

Which parameters: every matrix inside the decoder (attention and MLP projections, each routed
expert's matrices separately — the stacked [E, A, B] tensors are orthogonalised per expert, and the
fused gate/up tensor as its two matrices — the router weights and the MTP projection). The token
embedding, the output head and every 1-D parameter (RMSNorm scales, biases) stay on AdamW, as Muon's
authors and Moonlight do. Measured against AdamW on the cpu speedrun: benchmarks/RESULTS.md, "Muon for
pretraining"; docs/2026-11-29-muon.md.

Limits: the orthogonalisation needs whole matrices, so :func:`~nanoseek.train.optim.build_optimizer`
refuses Muon for FSDP2-sharded models (torchrun) with a clear error. The Newton-Schulz products run
in the training's compute dtype (bfloat16 where the stage autocasts, :func:`nanoseek.device.autocast_dtype`,
else float32), same-shaped matrices batched together (up to :data:`NS_BATCH_ELEMENTS` per batch).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.adamw import adamw

#: quintic Newton-Schulz coefficients (Jordan et al.) and the number of iterations
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
#: Moonlight's update-RMS match to AdamW (arXiv 2502.16982, eq. 4)
RMS_MATCH = 0.2
#: most elements orthogonalised in one batch (same-shaped matrices share a batch up to this size; one
#: larger matrix goes alone): bounds the step's extra memory to a few times this, not the whole model
NS_BATCH_ELEMENTS = 1 << 24


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """≈ U Vᵀ of each matrix in ``g`` ([..., A, B]) by the quintic Newton-Schulz iteration, computed in
    ``dtype``; the singular values land in roughly [0.7, 1.2] (the coefficients trade exactness for speed)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x.reshape(-1, *x.shape[-2:])  # a batch of matrices: bmm / baddbmm fuse the iteration's sums
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # Frobenius ≥ spectral norm
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    if tall:
        x = x.mT
    return x.to(g.dtype)


def muon_param_names(model: nn.Module) -> dict[str, int]:
    """The parameters Muon updates — matrices (ndim ≥ 2) other than the token embedding and the
    output head — each with its number of row blocks: 2 for the routed experts' fused
    ``gate_up_proj`` ([E, 2I, H], gate rows then up rows: two matrices, orthogonalised apart, as a
    Hugging Face checkpoint stores them), 1 for the rest."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    outside = embeddings | ({id(head.weight)} if head is not None else set())
    return {name: 2 if name.endswith("gate_up_proj") else 1
            for name, p in model.named_parameters() if p.ndim >= 2 and id(p) not in outside}


class MuonAdamW(torch.optim.Optimizer):
    """Parameter groups with ``muon=True`` take the Muon update (module docstring); the others take
    AdamW (``torch.optim.adamw.adamw``, the same function ``torch.optim.AdamW`` runs). Each group has
    ``lr`` and ``weight_decay``; ``betas``/``eps`` serve AdamW, ``momentum`` and ``blocks`` (each
    parameter's rows are that many matrices stacked, see :func:`muon_param_names`) Muon, whose
    ``ns_steps`` Newton-Schulz iterations run in ``ns_dtype``."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, foreach: bool | None = None, ns_dtype: torch.dtype = torch.float32,
                 ns_steps: int = NS_STEPS):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, momentum=momentum, weight_decay=0.0, muon=False,
                        blocks=1)
        super().__init__(groups, defaults)
        self.foreach, self.ns_dtype, self.ns_steps = foreach, ns_dtype, ns_steps

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, wd, mu, blocks = group["lr"], group["weight_decay"], group["momentum"], group["blocks"]
        same_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            same_shape.setdefault(p.shape, []).append(p)
        # the elementwise work as one foreach call per step of the formula, not one kernel per parameter;
        # the factors as float32 tensors: a Python scalar would be rounded to a bf16 list's dtype first
        buffers, grads = [self.state[p]["momentum_buffer"] for p in params], [p.grad for p in params]
        factor = functools.partial(torch.tensor, dtype=torch.float32, device=params[0].device)
        torch._foreach_mul_(buffers, factor(mu))
        torch._foreach_add_(buffers, grads)
        if wd:
            torch._foreach_mul_(params, factor(1.0 - lr * wd))
        for shape, members in same_shape.items():  # batches of same-shaped matrices: few, larger products
            per_batch = max(1, NS_BATCH_ELEMENTS // shape.numel())
            for start in range(0, len(members), per_batch):
                batch = members[start:start + per_batch]
                nesterov = torch.stack([p.grad for p in batch]).add_(
                    torch.stack([self.state[p]["momentum_buffer"] for p in batch]), alpha=mu)
                nesterov = nesterov.unflatten(-2, (blocks, -1))  # [n, ..., blocks, A, B]
                updates = orthogonalize(nesterov, self.ns_steps, self.ns_dtype).flatten(-3, -2)
                scale = RMS_MATCH * math.sqrt(max(nesterov.shape[-2], nesterov.shape[-1]))
                torch._foreach_add_(batch, list(updates.unbind(0)), alpha=-lr * scale)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], [], [self.state[p]["step"] for p in params],
            foreach=self.foreach, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
