"""Worker for tests/test_distributed.py's GRPO test: ``python grpo_dist_worker.py INIT OUT`` (one
process) or the same under ``torchrun --nproc_per_node 2`` (gloo, CPU). Registers a toy task whose
reward pays for a completion that starts with a lowercase letter (about a fifth of a random tiny
model's samples, so every step has reward variance and a real update), then runs ``nanoseek.rl.grpo``
with the same settings whatever the number of processes."""

from __future__ import annotations

import sys

from nanoseek.rl.grpo import grpo
from nanoseek.tasks import Problem, Task, Verdict, register_reward, register_task

TASK = "dist_first_lower"


class FirstLowerTask(Task):
    """Any prompt; the answer does not matter, only the completion's first character."""

    name = TASK

    def make_problem(self, rng, difficulty):
        return Problem(prompt=f"Say word {rng.randint(0, 99)}.", answer="x")

    def check(self, answer, fields):
        return Verdict.WRONG


def first_lower_reward(prompt, completion, fields):
    return 1.0 if completion[:1].islower() else 0.0


if __name__ == "__main__":
    register_task(FirstLowerTask(), overwrite=True)
    register_reward(TASK, first_lower_reward, overwrite=True)
    grpo(sys.argv[2], init_from=sys.argv[1], task=TASK, reward=TASK, steps=3, prompts_per_step=4, group_size=4,
         max_tokens=8, lr=1e-2, seed=3, checkpoint_every=100, report=False, device="cpu", log=lambda s: None)
