"""Worker for tests/test_distributed.py's GRPO test: ``python grpo_dist_worker.py INIT OUT`` (one
process) or the same under ``torchrun --nproc_per_node 2`` (gloo, CPU): the toy task of
tests/grpo_toy.py through ``nanoseek.rl.grpo`` with the same settings whatever the number of processes."""

from __future__ import annotations

import sys

from grpo_toy import TASK, register

from nanoseek.rl.grpo import grpo

if __name__ == "__main__":
    register()
    grpo(sys.argv[2], init_from=sys.argv[1], task=TASK, reward=TASK, steps=3, prompts_per_step=4, group_size=4,
         max_tokens=8, lr=1e-2, seed=3, checkpoint_every=100, report=False, device="cpu", log=lambda s: None)
