"""Merged graphs keep the base's unchanged tensors on disk once.

A merged graph differs from the base only in the projections its adapter touched; embeddings, norms
and the LM head are byte-for-byte the base's. onnxruntime refuses external data outside a graph's own
folder, so each ``merged/NAME/`` holds a hard link to the base's data file, and every tensor of the
merged graph whose bytes equal a base tensor points into that link instead of into its own data file.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

SHARED_DATA = "base.onnx.data"


def _key(tensor: onnx.TensorProto, payload) -> tuple:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(payload).digest()


def base_tensors(base_graph: Path) -> tuple[Path, dict[tuple, tuple[int, int]]]:
    """The base's data file and, per (dtype, shape, digest), where that tensor's bytes lie in it.

    Hashing the whole base is the expensive part: build this once per export, for every merged graph.
    """
    proto = onnx.load(str(base_graph), load_external_data=False)
    data = base_graph.with_name(base_graph.name + ".data")
    where = {}
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        for tensor in proto.graph.initializer:
            info = {e.key: e.value for e in tensor.external_data}
            if tensor.data_location == onnx.TensorProto.EXTERNAL and info.get("location") == data.name:
                offset, length = int(info.get("offset", 0)), int(info["length"])
                where[_key(tensor, view[offset:offset + length])] = (offset, length)
    return data, where


def share_base_tensors(graph: Path, base: tuple[Path, dict[tuple, tuple[int, int]]]) -> int:
    """Point ``graph``'s tensors that equal the base's (``base_tensors``) at a hard link of the base's data;
    returns the bytes saved."""
    base_data, where = base
    proto = onnx.load(str(graph))
    saved = 0
    for tensor in proto.graph.initializer:
        found = where.get(_key(tensor, tensor.raw_data)) if tensor.HasField("raw_data") else None
        if found is not None:
            set_external_data(tensor, SHARED_DATA, offset=found[0], length=found[1])
            tensor.ClearField("raw_data")
            saved += found[1]
    link = graph.parent / SHARED_DATA
    try:
        os.link(base_data, link)
    except OSError:  # a filesystem without hard links: correct, just not smaller
        shutil.copyfile(base_data, link)
    own_data = graph.with_name(graph.name + ".data")
    own_data.unlink(missing_ok=True)
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=own_data.name, size_threshold=1024)
    return saved
