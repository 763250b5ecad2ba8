"""Malformed client input costs one log line, and a request an error reply; never a traceback.

pygls logs a traceback for a message it cannot read and answers nothing, so a client whose
request does not parse waits until its own timeout, and the log fills with stack traces that
point into pygls rather than at the client's mistake.  Here each kind of bad input is named in
one line on the ``mtlsp.server`` log (stderr, and the client's ``window/logMessage``):

- a body that is not JSON (pygls' read loop raises; ``report_undecodable`` names it);
- JSON that is not one JSON-RPC object, such as an array (LSP has no batches);
- a message whose params do not have the method's shape, or are missing: a request gets an
  ``InvalidParams`` reply at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from cattrs import transform_error
from lsprotocol.types import ResponseErrorMessage
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
)

log = logging.getLogger("mtlsp.server")

UNDECODABLE = (json.JSONDecodeError, UnicodeDecodeError)  # what pygls' read loop raises for a bad body


class Rejected:
    """A message that did not parse: already logged, and answered if it was a request."""

    jsonrpc = None


class Protocol(LanguageServerProtocol):
    """pygls' protocol, with a message that does not parse rejected in one line (see the module)."""

    def structure_message(self, data: dict[str, Any]) -> Any:
        if "jsonrpc" not in data:  # json.loads calls this hook for every object, the nested ones too
            return data
        try:
            return self._converter.structure(data, self._message_type(data))
        except Exception as e:  # noqa: BLE001 - cattrs raises several kinds for a wrong shape
            return self._reject(data, e)

    def _message_type(self, data: dict[str, Any]) -> type:
        """The type pygls would structure ``data`` as (its ``structure_message``, minus the logging)."""
        if "id" not in data:
            return self.get_message_type(data.get("method", "")) or JsonRPCNotification
        if "error" in data:
            return ResponseErrorMessage
        if "method" in data:
            return self.get_message_type(data["method"]) or JsonRPCRequestMessage
        return self._result_types.pop(data["id"], None) or JsonRPCResponseMessage

    def _reject(self, data: dict[str, Any], error: Exception) -> Rejected:
        method = data.get("method")
        why = "; ".join(transform_error(error)) if hasattr(error, "exceptions") else str(error)
        if "params" not in data and method is not None:
            why = "no params"
        if "id" in data and method is not None:
            log.warning("malformed %s request (id %s), answered InvalidParams: %s", method, data["id"], why)
            self._send_response(data["id"], error=JsonRpcInvalidParams(
                f"malformed {method} request: {why}").to_response_error())
        elif method is not None:
            log.warning("ignoring a malformed %s notification: %s", method, why)
        else:
            log.warning("ignoring a malformed response to request %s: %s", data.get("id"), why)
        return Rejected()

    def handle_message(self, message: Any) -> None:
        if isinstance(message, Rejected):
            return
        if not hasattr(message, "jsonrpc"):  # an array, a number, an object without "jsonrpc"
            kind = type(message).__name__
            log.warning("ignoring a message that is not a JSON-RPC object but a JSON %s",
                        {"list": "array", "dict": "object", "str": "string"}.get(kind, kind))
            return
        super().handle_message(message)


def report_undecodable(error: Exception) -> bool:
    """Log a body that is not JSON in one line; False for any other error (not client input)."""
    if not isinstance(error, UNDECODABLE):
        return False
    log.warning("ignoring a message that is not JSON: %s", error)
    return True


class OneLine(logging.Filter):
    """For pygls' loggers: no traceback for what is the client's mistake, not a server fault.

    A body that is not JSON is dropped here (``report_undecodable`` names it); an error the
    server answered on purpose (a ``JsonRpcException``, such as an unknown document) keeps its
    line without the stack.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UNDECODABLE):
            return False
        if isinstance(error, JsonRpcException):
            record.msg, record.args = f"{record.getMessage()}: {error}", ()
            record.exc_info = record.exc_text = None
        return True


def quiet_pygls() -> None:
    """Install ``OneLine`` on the pygls loggers that report client input (once)."""
    for name in ("pygls.server", "pygls.protocol.json_rpc"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())
