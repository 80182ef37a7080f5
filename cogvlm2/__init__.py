"""CogVLM2 on MindSpore: config, tokenizer, processor, model, weights."""
from cogvlm2.config import CogVLM2Config, VisionConfig

__all__ = ["CogVLM2Config", "VisionConfig", "CogVLM2Processor"]


def __getattr__(name: str):
    # Lazy so that `import cogvlm2` stays light (no MindSpore import for the processor-only user).
    if name == "CogVLM2Processor":
        from cogvlm2.processor import CogVLM2Processor
        return CogVLM2Processor
    raise AttributeError(name)
