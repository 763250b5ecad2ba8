"""The server's settings, from ``initializationOptions`` and ``workspace/didChangeConfiguration``.

Clients send either the settings object itself or one nested under ``"mtlsp"`` (what VS Code
sends for a ``mtlsp.*`` configuration section); both are accepted.  A bad value is reported and
ignored, keeping the previous one: a typo in a settings file must not take completions away.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    enable: bool = True
    languages: dict[str, bool] = field(default_factory=dict)  # languageId -> enabled
    max_tokens: int = 48  # per ghost-text completion
    device: str = "auto"  # auto | cpu | cuda
    memory_cap: int = 1_000_000  # tokens per workspace folder
    store_path: str | None = None  # where stores live (default: the user cache directory)
    debounce_ms: int = 250  # quiet time before an edited buffer is written into the memory
    context_tokens: int = 384  # prompt tokens before the cursor

    def enabled_for(self, language_id: str | None) -> bool:
        if not self.enable:
            return False
        return self.languages.get(language_id or "", self.languages.get("*", True))


_NAMES = {  # client spelling -> field
    "enable": "enable",
    "languages": "languages",
    "maxTokens": "max_tokens",
    "device": "device",
    "memoryCap": "memory_cap",
    "storePath": "store_path",
    "debounceMs": "debounce_ms",
    "contextTokens": "context_tokens",
}
_RANGES = {"max_tokens": (1, 512), "memory_cap": (1_000, 100_000_000), "debounce_ms": (0, 10_000),
           "context_tokens": (16, 896)}


def parse(raw: Any, base: Settings) -> tuple[Settings, list[str]]:
    """``base`` updated from a client's settings object, and a message per value ignored."""
    if raw is None:
        return base, []
    if not isinstance(raw, dict):
        return base, [f"settings must be an object, got {type(raw).__name__}"]
    if isinstance(raw.get("mtlsp"), dict):
        raw = raw["mtlsp"]
    changes: dict[str, Any] = {}
    problems = []
    known = {f.name for f in fields(Settings)}
    for key, value in raw.items():
        name = _NAMES.get(key, key if key in known else None)
        if name is None:
            problems.append(f"unknown setting {key!r}")
            continue
        problem = _check(name, value)
        if problem:
            problems.append(f"setting {key!r}: {problem}; keeping {getattr(base, name)!r}")
        else:
            changes[name] = dict(value) if name == "languages" else value
    return replace(base, **changes), problems


def _check(name: str, value: Any) -> str | None:
    if name == "enable":
        return None if isinstance(value, bool) else "expected true or false"
    if name == "languages":
        ok = isinstance(value, dict) and all(isinstance(v, bool) for v in value.values())
        return None if ok else 'expected an object such as {"python": true, "markdown": false}'
    if name == "device":
        return None if value in ("auto", "cpu", "cuda") else 'expected "auto", "cpu" or "cuda"'
    if name == "store_path":
        return None if value is None or (isinstance(value, str) and value) else "expected a directory path"
    lo, hi = _RANGES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return f"expected an integer from {lo} to {hi}"
    return None
