"""lmforge: the generative-AI project lifecycle for language models in one readable PyTorch codebase.

    import lmforge
    lm = lmforge.load()          # the embedded SmolLM2-135M-Instruct (GGUF, dequantised)
    print(lm.generate("What is the capital of France?"))
"""

from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LM", "LmforgeError", "ModelConfig", "load", "preset"]


def __getattr__(name: str):
    # Heavy imports (torch, tokenizers) happen on first use, so `lmforge --help` stays fast.
    if name in ("load", "LM"):
        from lmforge import lm

        return getattr(lm, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
