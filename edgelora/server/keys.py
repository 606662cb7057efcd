"""Tenants and their API keys, from a TOML file that holds only the keys' sha256, never the keys themselves.

```toml
[[key]]
sha256 = "9f86d081…"         # printf %s "$KEY" | sha256sum
tenant = "acme"
adapters = ["legal", "acme-*"]  # names or globs (fnmatch); the base model is open to every key
requests_per_minute = 60        # optional
tokens_per_minute = 20000       # optional: prompt and completion tokens
admin = false                   # optional: may upload, delete and list adapters
```
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.format.fileio import read_object

from .api_errors import ApiError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FIELDS = {"sha256", "tenant", "adapters", "requests_per_minute", "tokens_per_minute", "admin"}


class RateLimit:
    """A token bucket refilled at ``per_minute / 60`` a second, holding at most a minute's worth.

    Tokens are charged after a request ends (its size is known only then), so the bucket may go
    negative; a new request is refused until it is positive again."""

    def __init__(self, per_minute: float):
        self.per_minute = per_minute
        self._level = float(per_minute)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._level = min(self.per_minute, self._level + (now - self._at) * self.per_minute / 60)
        self._at = now

    def wait_s(self, cost: float) -> float:
        """0 when ``cost`` fits now (and is taken), else the seconds until it would."""
        with self._lock:
            self._refill()
            if self._level >= cost and self._level > 0:
                self._level -= cost
                return 0.0
            return (max(cost, 1) - self._level) * 60 / self.per_minute

    def charge(self, cost: float) -> None:
        with self._lock:
            self._refill()
            self._level -= cost


@dataclass
class Tenant:
    name: str
    adapters: list[str] = field(default_factory=lambda: ["*"])
    admin: bool = False
    requests: RateLimit | None = None
    tokens: RateLimit | None = None

    def may_use(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)

    def admit(self) -> None:
        """Count a request against its limits, or refuse it with 429 and when to retry."""
        for limit, what in ((self.requests, "requests"), (self.tokens, "tokens")):
            if limit is None:
                continue
            wait = limit.wait_s(1 if what == "requests" else 0)
            if wait > 0:
                raise ApiError(429, f"tenant {self.name} is over its limit of {limit.per_minute:g} {what} per minute",
                               code="rate_limit_exceeded", retry_after_s=wait)

    def charge_tokens(self, count: int) -> None:
        if self.tokens is not None:
            self.tokens.charge(count)


# Without a keys file the server listens on loopback only, and whoever reaches it may do everything.
LOCAL = Tenant("local", admin=True)


class KeyRing:
    def __init__(self, tenants_by_hash: dict[str, Tenant]):
        self._tenants = tenants_by_hash

    @classmethod
    def load(cls, path: str | Path) -> "KeyRing":
        path = Path(path)
        raw = read_object(path, "keys file not found", "TOML")
        unknown = sorted(set(raw) - {"key"})
        if unknown:
            raise EdgeLoraError(f"{path}: unknown table {unknown[0]!r}; keys are [[key]] tables")
        entries = raw.get("key", [])
        if not isinstance(entries, list) or not entries:
            raise EdgeLoraError(f"{path}: no [[key]] tables")
        tenants: dict[str, Tenant] = {}
        for i, entry in enumerate(entries):
            where = f"{path}: key[{i}]"
            digest, tenant = _key_entry(entry, where)
            if digest in tenants:
                raise EdgeLoraError(f"{where}: the same sha256 is given twice")
            tenants[digest] = tenant
        return cls(tenants)

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer KEY`` header; 401 for a missing or unknown key."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="missing_api_key")
        tenant = self._tenants.get(hashlib.sha256(key.strip().encode()).hexdigest())
        if tenant is None:
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
        return tenant


def _key_entry(entry, where: str) -> tuple[str, Tenant]:
    if not isinstance(entry, dict):
        raise EdgeLoraError(f"{where}: expected a table")
    unknown = sorted(set(entry) - FIELDS)
    if unknown:
        raise EdgeLoraError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
        raise EdgeLoraError(f"{where}: sha256 must be the 64 hex digits of the key's sha256")
    name = entry.get("tenant")
    if not isinstance(name, str) or not name:
        raise EdgeLoraError(f"{where}: tenant must be a non-empty string")
    adapters = entry.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise EdgeLoraError(f"{where}: adapters must be a list of names or globs")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise EdgeLoraError(f"{where}: admin must be true or false")
    limits = []
    for what in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(what)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise EdgeLoraError(f"{where}: {what} must be a positive number")
        limits.append(None if value is None else RateLimit(value))
    return digest.lower(), Tenant(name, adapters, admin, *limits)
