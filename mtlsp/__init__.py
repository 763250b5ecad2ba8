"""mtlsp: completions from a memorizing transformer that reads your workspace."""
