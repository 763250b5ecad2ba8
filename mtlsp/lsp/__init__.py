"""The Language Server Protocol surface: handlers (``server``), their configuration
(``settings``) and the client helpers that drive a server from Python (``client``).
"""
