"""The workspace memory at rest: entries on disk and searched by key (``MemoryStore``).

``files`` is the on-disk format, ``memory_store`` the per-file add / replace / remove with
manifests and eviction, ``knn`` the top-k search indexes.  Nothing here knows about the model
or the editor: the index package writes into a store, the complete package reads from one.
"""
