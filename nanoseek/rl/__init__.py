"""Reinforcement learning for reasoning (DeepSeek-R1 recipe): the GRPO objective and its variants
(:mod:`.objective`), the GRPO loop (:mod:`.grpo`), the RL guard (:mod:`.guard`) and ``nanoseek grpo``
(:mod:`.cli`)."""
