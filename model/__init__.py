"""mtlsp's engine: a memorizing transformer for code on a pretrained base (installed as ``mtlsp_model``)."""

from .memory import Memory, Retrieved, TensorMemory
from .model import KV, Entries, MemorizingTransformer, ModelConfig
from .tokenizer import Tokenizer

__all__ = ["KV", "Entries", "MemorizingTransformer", "Memory", "ModelConfig", "Retrieved", "TensorMemory", "Tokenizer"]
