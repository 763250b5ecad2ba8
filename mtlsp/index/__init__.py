"""Workspace files into the memory: the edit-to-memory path.

``watch`` (events) → ``indexer`` (what changed) → ``scan`` (which files count) → ``chunks``
(cut at definitions) → ``encode`` (model keys and values) → a ``store.MemoryStore``.
"""
