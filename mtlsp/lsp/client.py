"""Helpers for driving ``mtlsp serve`` from Python as an LSP client (the demo, benchmarks, tests)."""

from __future__ import annotations

import asyncio
from typing import Any

from pygls.lsp.client import LanguageClient


def plain(o: Any) -> Any:
    """pygls turns results of custom requests into named tuples; this gives dicts and lists."""
    if hasattr(o, "_asdict"):
        return {k: plain(v) for k, v in o._asdict().items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    return o


async def request(client: LanguageClient, method: str, params: Any) -> Any:
    return plain(await client.protocol.send_request_async(method, params))


async def close(client: LanguageClient) -> None:
    """Shut the server down (it applies pending edits first), killing it if it does not exit."""
    server = client._server  # pygls keeps the process here; stop() alone waits for it forever
    try:
        await asyncio.wait_for(client.shutdown_async(None), 30)
        client.exit(None)
        if server is not None:
            await asyncio.wait_for(server.wait(), 10)
    except Exception:  # it hung or died: do not leave it behind
        if server is not None and server.returncode is None:
            server.kill()
    await client.stop()
