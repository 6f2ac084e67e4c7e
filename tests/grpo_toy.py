"""A toy GRPO setting shared by tests/test_grpo.py and the torchrun worker tests/grpo_dist_worker.py:
a task whose reward pays for a completion that starts with a lowercase letter (about a fifth of a
random tiny model's samples, so steps have reward variance and real updates), and a tiny random
policy with a tokenizer whose vocabulary is smaller than the model's (the engine masks the padding
ids; the trainer must do the same)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import nanoseek
from nanoseek.data.tokenizer import padded_vocab_size, train_tokenizer
from nanoseek.tasks import SYSTEM_PROMPT, Problem, Task, Verdict, register_reward, register_task

TASK = "test_first_lower"
#: a reward for screening tests: the prompt's parity (so the greedy rewards of a random policy still
#: differ, and their order is not the generation order) plus half the first-letter reward (so it also
#: depends on what the policy answers)
SCREEN_REWARD = "test_screen"


class FirstLowerTask(Task):
    """Any prompt; only the completion's first character matters (the reward below)."""

    name = TASK

    def make_problem(self, rng, difficulty):
        return Problem(prompt=f"Say word {rng.randint(0, 99)}.", answer="x")

    def check(self, answer, fields):
        return Verdict.WRONG


def first_lower_reward(prompt, completion, fields):
    return 1.0 if completion[:1].islower() else 0.0


def parity_first_lower_reward(prompt, completion, fields):
    number = int(re.search(r"Say word (\d+)", prompt).group(1))
    return number % 2 + 0.5 * first_lower_reward(prompt, completion, fields)


def register() -> None:
    """Make the task and its reward known under :data:`TASK`, and the screening reward under
    :data:`SCREEN_REWARD`."""
    register_task(FirstLowerTask(), overwrite=True)
    register_reward(TASK, first_lower_reward, overwrite=True)
    register_reward(SCREEN_REWARD, parity_first_lower_reward, overwrite=True)


def tiny_policy(path: Path) -> Path:
    """Save a random tiny model with a trained tokenizer into ``path``."""
    texts = [SYSTEM_PROMPT] * 20 + [f"What is {a} + {b}? Give the answer as an integer. <think> {a}+{b} </think> "
                                    f"<answer>{a + b}</answer>" for a in range(30) for b in range(5)]
    tok = train_tokenizer(iter(texts), vocab_size=400, out_dir=None)
    cfg = nanoseek.get_preset("tiny").replace(vocab_size=padded_vocab_size(tok.vocab_size),
                                             max_position_embeddings=512, bos_token_id=tok.bos_id,
                                             eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    nanoseek.save(nanoseek.DeepSeekV3(cfg), path)
    tok.save(path)
    assert tok.vocab_size < cfg.vocab_size
    return path
