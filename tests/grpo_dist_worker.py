"""Worker for tests/test_distributed.py's GRPO tests: ``python grpo_dist_worker.py INIT OUT`` (one
process) or the same under ``torchrun --nproc_per_node 2`` (gloo, CPU): the toy task of
tests/grpo_toy.py through ``nanoseek.rl.grpo`` with the same settings whatever the number of
processes (problems screened by the policy's greedy answers, 2 candidates per kept one,
with grpo_toy's parity + first-letter reward);
``python grpo_dist_worker.py - OUT --resume`` continues the run in OUT."""

from __future__ import annotations

import sys

from grpo_toy import SCREEN_REWARD, TASK, register

from nanoseek.rl.grpo import grpo

if __name__ == "__main__":
    register()
    if sys.argv[3:] == ["--resume"]:
        grpo(sys.argv[2], resume=True)
    else:
        grpo(sys.argv[2], init_from=sys.argv[1], task=TASK, reward=SCREEN_REWARD, steps=3, prompts_per_step=4,
             screen_factor=2, group_size=4, max_tokens=8, lr=1e-2, seed=3, checkpoint_every=2, report=False,
             device="cpu", log=lambda s: None)
