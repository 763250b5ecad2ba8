"""mtlsp's engine: a memorizing transformer for code (installed as ``mtlsp_model``)."""

from .memory import Memory, Retrieved, TensorMemory
from .model import KV, MemorizingTransformer, ModelConfig
from .tokenizer import CodeTokenizer

__all__ = ["KV", "CodeTokenizer", "MemorizingTransformer", "Memory", "ModelConfig", "Retrieved", "TensorMemory"]
