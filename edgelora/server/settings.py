"""What ``edgelora serve`` is told, checked before the model is opened."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import EdgeLoraError

ADAPTER_FOLDER = "served-adapters"  # inside the package, unless --adapter-dir says otherwise
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    keys: Path | None = None  # TOML keys file; without one, loopback only and every caller is admin
    adapter_dir: Path | None = None  # uploaded adapters; default PACKAGE/served-adapters
    model_name: str | None = None  # the base's name in `model`; default the package folder's name
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    chat_max_tokens: int = 256  # a chat request's max_tokens when it gives none
    max_body_bytes: int = 1 * MIB
    max_upload_bytes: int = 256 * MIB
    body_timeout_s: float = 30.0  # a request body that takes longer gets 408
    grace_s: float = 30.0  # on SIGTERM, how long running requests may take to finish

    def adapter_folder(self, package: Path) -> Path:
        return Path(self.adapter_dir) if self.adapter_dir is not None else Path(package) / ADAPTER_FOLDER

    def check(self) -> "Settings":
        if self.keys is None and not is_loopback(self.host):
            raise EdgeLoraError(f"--host {self.host}: without --keys the server binds only to loopback "
                                "(127.0.0.1, ::1, localhost); give a keys file to serve other hosts")
        for name in ("max_tokens", "chat_max_tokens", "max_body_bytes", "max_upload_bytes"):
            if getattr(self, name) < 1:
                raise EdgeLoraError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "grace_s"):
            if not getattr(self, name) > 0:
                raise EdgeLoraError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
