"""A document and cursor into completions: the keystroke-to-ghost-text path.

``completer`` (``Completer``, caches, provenance) → ``prompt`` (document → token ids) →
``decode`` (scores and evidence, reading the memory through ``retrieval``) → ``stops`` (where
ghost text ends); popup items come from ``candidates`` / ``static`` ranked by ``rank``.
"""
