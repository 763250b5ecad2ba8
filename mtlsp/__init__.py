"""mtlsp: completions from a memorizing transformer that reads your workspace."""

__version__ = "0.1.0"
