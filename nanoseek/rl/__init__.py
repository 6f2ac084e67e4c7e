"""Reinforcement learning for reasoning (DeepSeek-R1 recipe): the GRPO objective and its variants."""
