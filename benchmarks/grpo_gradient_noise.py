"""How much of a GRPO step's policy gradient is signal: the gradient noise scale of a checkpoint.

Draws ``--steps`` independent rollout batches (P prompts × G samples each, from the policy as it is;
no update is taken), computes each batch's GRPO gradient (on-policy, β = 0: the REINFORCE gradient
with the group baseline) and compares them. With independent unbiased estimates g_i = G + n_i of the
true gradient G (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv
1812.06162, §2.2 and appendix A):

    |G|²     ≈ mean over pairs i < j of g_i · g_j          (the noise terms cancel in expectation)
    E|n|²    ≈ mean_i |g_i|² − |G|²                         (noise of one batch of B = P·G samples)
    B_simple = B · E|n|² / |G|²                             (samples per step at which noise ≈ signal)

It also reports the mean pairwise cosine of single batches and the cosine between the sums of two
disjoint halves of the batches, and which parameters hold the largest gradients. A B_simple far above
the samples a step can afford means the updates are mostly noise: Adam then moves every weight by
about lr per step in a direction that does not repeat.

    python benchmarks/grpo_gradient_noise.py --ckpt runs/speedrun/sft/final --task arithmetic:2 \\
        --steps 12 --prompts 8 --group-size 8 --max-tokens 110 --seed 1 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, git_commit, write_json  # noqa: E402


def noise_statistics(grads: torch.Tensor, batch_samples: int) -> dict:
    """Signal/noise split of ``grads`` [K, D], K ≥ 2 independent gradient estimates of
    ``batch_samples`` samples each (see the module docstring for the estimators)."""
    k = grads.shape[0]
    if k < 2:
        raise ValueError(f"need at least 2 gradient estimates, got {k}")
    g = grads.double()
    gram = g @ g.T
    pairs = list(itertools.combinations(range(k), 2))
    signal_sq = sum(float(gram[i, j]) for i, j in pairs) / len(pairs)
    noise_sq = float(gram.diagonal().mean()) - signal_sq
    norms = gram.diagonal().sqrt()
    cos = [float(gram[i, j] / (norms[i] * norms[j])) for i, j in pairs if norms[i] > 0 and norms[j] > 0]
    half = k // 2
    a, b = g[:half].sum(0), g[half:2 * half].sum(0)
    halves = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    ok = signal_sq > 0
    return {
        "estimates": k, "batch_samples": batch_samples,
        "signal_norm_sq": signal_sq, "noise_norm_sq": noise_sq,
        "noise_to_signal": math.sqrt(max(noise_sq, 0.0) / signal_sq) if ok else float("inf"),
        "b_simple_samples": batch_samples * max(noise_sq, 0.0) / signal_sq if ok else float("inf"),
        "mean_pairwise_cosine": sum(cos) / len(cos) if cos else float("nan"),
        "halves_cosine": halves, "halves_samples": half * batch_samples,
    }


def measure(ckpt: str, task: str, steps: int, prompts: int, group_size: int, max_tokens: int,
            temperature: float = 1.0, reward: str = "combined", seed: int = 0, device: str = "auto",
            top: int = 5) -> dict:
    """Roll out ``steps`` independent batches from ``ckpt`` and return :func:`noise_statistics` plus
    the ``top`` parameters by mean gradient norm and the mean rollout accuracy."""
    from nanoseek.rl.config import build_run_config
    from nanoseek.rl.grpo import GRPOTrainer
    from nanoseek.rl.rollout import completion_logprobs
    from nanoseek.rl.objective import group_advantages, grpo_loss

    cfg = build_run_config(dict(init_from=str(Path(ckpt).resolve()), task=task, steps=steps,
                                prompts_per_step=prompts, group_size=group_size, max_tokens=max_tokens,
                                temperature=temperature, reward=reward, beta=0.0, seed=seed, device=device,
                                report=False))
    with tempfile.TemporaryDirectory(prefix="grpo-noise-") as tmp:
        trainer = GRPOTrainer(cfg, Path(tmp), False, lambda _: None)
        model, tok = trainer.model, trainer.tokenizer
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        flat, per_param, accuracy = [], {n: 0.0 for n, _ in params}, []
        for batch in range(steps):
            roll = trainer.rollout(batch)
            accuracy.append(roll.accuracy)
            adv = group_advantages(roll.rewards, group_size)
            logp, mask, _ = completion_logprobs(
                model, [roll.prompt_ids[n // group_size] for n in range(len(roll.completions))],
                [c.token_ids for c in roll.completions], temperature, trainer.n_usable, pad_id=tok.pad_id or 0)
            loss, _ = grpo_loss(logp, None, None, adv.to(logp.device), mask, beta=0.0)
            model.zero_grad(set_to_none=False)
            loss.backward()
            grads = [p.grad.detach().flatten().float().cpu() if p.grad is not None
                     else torch.zeros(p.numel()) for _, p in params]
            for (name, _), gr in zip(params, grads):
                per_param[name] += float(gr.norm()) / steps
            flat.append(torch.cat(grads))
    stats = noise_statistics(torch.stack(flat), prompts * group_size)
    stats["rollout_accuracy"] = sum(accuracy) / len(accuracy)
    stats["largest_gradients"] = [{"param": n, "mean_norm": v}
                                  for n, v in sorted(per_param.items(), key=lambda kv: -kv[1])[:top]]
    return stats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="policy checkpoint directory (model + tokenizer)")
    p.add_argument("--task", default="arithmetic:2", help="NAME or NAME:DIFFICULTY")
    p.add_argument("--steps", type=int, default=12, help="independent rollout batches (>= 2)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=110)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reward", default="combined")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be >= 2 (the estimators compare batches), got {args.steps}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    stats = measure(args.ckpt, args.task, args.steps, args.prompts, args.group_size, args.max_tokens,
                    args.temperature, args.reward, args.seed, args.device)
    result = {"commit": git_commit(), "command": command_line(), "ckpt": args.ckpt, **stats}
    print(f"{args.steps} batches of {stats['batch_samples']} samples (rollout accuracy "
          f"{stats['rollout_accuracy']:.1%}): mean pairwise cosine {stats['mean_pairwise_cosine']:.3f}, "
          f"cosine of two {stats['halves_samples']}-sample halves {stats['halves_cosine']:.3f}, "
          f"noise/signal {stats['noise_to_signal']:.2f}, B_simple {stats['b_simple_samples']:.0f} samples")
    for row in stats["largest_gradients"]:
        print(f"  {row['mean_norm']:.4f}  {row['param']}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
