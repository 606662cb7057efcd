"""The adapters a server shows: the package's, and those uploaded at runtime into the server's adapter folder.

An upload is checked by the runtime itself (``EdgeModel.load_adapter``: base fingerprint from the
sidecar, sha256, slot shapes) while it sits in a staging folder that no request can name; only a
blob that passed is renamed into the adapter folder (sidecar first, blob last: a blob is the
commit) and shown. At start-up every blob in the folder is registered again, so uploads outlive
a restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from edgelora.adapter_specs import parse_generate_adapters
from edgelora.errors import EdgeLoraError
from edgelora.format.fileio import check_name
from edgelora.format.sidecar import sidecar_path

from .api_errors import ApiError, model_not_found
from .keys import Tenant

SUFFIX = ".onnx_adapter"
STAGING_PREFIX = ".upload-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger("edgelora.server")


class AdapterStore:
    def __init__(self, model, folder: Path, base_name: str):
        self.model = model
        self.folder = Path(folder)
        self.base_name = base_name
        self.uploaded: dict[str, Path] = {}
        self._lock = threading.Lock()  # one upload or delete at a time

    def package_adapters(self) -> list[str]:
        return sorted(self.model.manifest.adapters)

    def names(self) -> list[str]:
        return sorted(set(self.model.manifest.adapters) | set(self.uploaded))

    def restore(self) -> None:
        """Register the uploads a previous run kept; a blob that no longer passes its checks is skipped, named."""
        if self.base_name in self.model.manifest.adapters:
            raise EdgeLoraError(f"--model-name {self.base_name!r} is also an adapter's name; pick another")
        self.folder.mkdir(parents=True, exist_ok=True)
        for staging in self.folder.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(staging, ignore_errors=True)  # an upload a crash interrupted
        for blob in sorted(self.folder.glob("*" + SUFFIX)):
            name = blob.name.removesuffix(SUFFIX)
            if name in self.model.manifest.adapters or name == self.base_name:
                log.warning("%s: not served, the package already has a model named %s", blob, name)
                continue
            try:
                self.model.load_adapter(blob, name)
            except EdgeLoraError as e:
                self._forget(name)
                log.warning("%s: not served (%s)", blob, e)
                continue
            self.uploaded[name] = blob

    def spec(self, model: str, tenant: Tenant):
        """The runtime's adapter argument for a request's ``model``: the base's name (None), an adapter's name,
        or the CLI's ``NAME:WEIGHT+NAME:WEIGHT``. A name the tenant may not use is as unknown as a missing one."""
        if model == self.base_name:
            return None
        try:
            spec = parse_generate_adapters(tuple(model.split("+")), what="model")
        except EdgeLoraError as e:
            raise ApiError(400, str(e), code="invalid_value", param="model") from None
        names = [spec] if isinstance(spec, str) else list(spec)
        visible = set(self.names())
        if not all(name in visible and tenant.may_use(name) for name in names):
            raise model_not_found(model)
        return spec

    def upload(self, name: str, blob: bytes, sidecar: bytes) -> dict:
        try:
            check_name(name)
        except EdgeLoraError as e:
            raise ApiError(400, str(e), code="invalid_adapter_name", param="name") from None
        _check_sidecar(sidecar)
        with self._lock:
            if name == self.base_name or name in self.names():
                raise ApiError(409, f"a model named {name!r} already exists; delete it first", code="adapter_exists",
                               param="name")
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.folder))
            try:
                staged = staging / (name + SUFFIX)
                _write_synced(sidecar_path(staged), sidecar)
                _write_synced(staged, blob)
                try:
                    self.model.load_adapter(staged, name)
                except EdgeLoraError as e:
                    self._forget(name)
                    raise ApiError(422, str(e).replace(f"{staging}{os.sep}", ""), code="adapter_refused") from None
                final = self.folder / staged.name
                os.replace(sidecar_path(staged), sidecar_path(final))
                os.replace(staged, final)
                self.model.load_adapter(final, name)  # the same bytes, now at the path that outlives a restart
                self.uploaded[name] = final
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return self.describe(name)

    def delete(self, name: str) -> None:
        with self._lock:
            if name in self.model.manifest.adapters:
                raise ApiError(400, f"adapter {name!r} is part of the package; only uploaded adapters can be deleted",
                               code="adapter_in_package", param="name")
            blob = self.uploaded.pop(name, None)
            if blob is None:
                raise model_not_found(name)
            self._forget(name)
            blob.unlink(missing_ok=True)
            sidecar_path(blob).unlink(missing_ok=True)

    def describe(self, name: str, resident: set[str] | None = None) -> dict:
        if resident is None:
            resident = set(self.model.stats()["resident"])
        entry = self.model.manifest.adapters.get(name)
        if entry is not None:
            size, digest, source = entry.bytes, entry.sha256, "package"
        else:
            blob = self.uploaded[name]
            size, digest, source = blob.stat().st_size, _sidecar_sha256(blob), "uploaded"
        return {"id": name, "object": "adapter", "parent": self.base_name, "source": source, "bytes": size,
                "sha256": digest, "resident": name in resident}

    def listing(self) -> list[dict]:
        resident = set(self.model.stats()["resident"])
        return [self.describe(name, resident) for name in self.names()]

    def _forget(self, name: str) -> None:
        if name in self.model.adapters and name not in self.model.manifest.adapters:
            self.model.unload_adapter(name)


def _check_sidecar(raw: bytes) -> None:
    """The runtime checks a sidecar's fingerprint and sha256 when they are there; an upload must have both."""
    try:
        sidecar = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(422, f"sidecar: not valid JSON ({e})", code="adapter_refused", param="sidecar") from None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("base_fingerprint"), str) \
            or not isinstance(sidecar.get("sha256"), str) or not _SHA256.fullmatch(sidecar["sha256"]):
        raise ApiError(422, "sidecar: expected the JSON object edgelora add-adapter writes, with a base_fingerprint "
                            "and the blob's sha256", code="adapter_refused", param="sidecar")


def _sidecar_sha256(blob: Path) -> str | None:
    try:
        return json.loads(sidecar_path(blob).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
