"""nanoseek: the DeepSeek-V3 / R1 recipe as one compact, hardware-agnostic PyTorch stack.

Public entry points::

    import nanoseek
    model = nanoseek.load("path/to/checkpoint")          # config.json + *.safetensors
    model, tok = nanoseek.load_with_tokenizer("ckpt")     # the same, with its tokenizer
    nanoseek.save(model, "out/dir", max_shard_size="2GB") # loads in transformers too
    cfg = nanoseek.get_preset("small"); m = nanoseek.DeepSeekV3(cfg)
"""

from .config import ModelConfig, get_preset
from .errors import CheckpointError, ConfigError, NanoseekError

__version__ = "0.1.0"
__all__ = ["DeepSeekV3", "ModelConfig", "get_preset", "load", "load_with_tokenizer", "save", "pick_device",
           "NanoseekError", "ConfigError", "CheckpointError"]


def __getattr__(name: str):
    # Lazy: importing the package stays cheap for the CLI and for tools that only read configs.
    if name == "DeepSeekV3":
        from .model import DeepSeekV3
        return DeepSeekV3
    if name in ("load", "load_with_tokenizer", "save"):
        from . import hf
        return getattr(hf, name)
    if name == "pick_device":
        from .device import pick_device
        return pick_device
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
