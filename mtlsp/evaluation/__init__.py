"""Headless evaluation of the memory on real repositories (``mtlsp eval``)."""
