"""The Hugging Face base folder: refused early when it cannot be exported, loaded in fp32, fingerprinted.

Export, ``add-adapter``'s quality report and training all start here, so a wrong folder gets the same
one-line error whichever command meets it first, and no model folder's own Python code ever runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgelora.errors import EdgeLoraError

from .causal_lm import FAMILIES
from .encoder import ARCHITECTURES

AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def check_base_dir(base_dir: Path) -> str:
    """Refuse a wrong base folder before minutes of work start, from its config alone; returns its task."""
    from transformers import AutoConfig

    if not (base_dir / "config.json").is_file():
        raise EdgeLoraError(f"{base_dir / 'config.json'}: missing; {base_dir} is not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)  # never run a folder's code, nor ask to
    except Exception as e:
        raise EdgeLoraError(f"{base_dir / 'config.json'}: cannot be read ({str(e).splitlines()[0]})") from None
    archs = config.architectures or []
    for arch in archs:
        if arch in FAMILIES:
            return "causal-lm"
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch][1]
    raise EdgeLoraError(
        f"{base_dir / 'config.json'}: architecture {archs or config.model_type} is not supported yet; "
        f"supported: {', '.join(sorted([*FAMILIES, *ARCHITECTURES]))}"
    )


def load_base(base_dir: Path, task: str = "causal-lm"):
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own step line already says what is loading
    try:
        return getattr(transformers, AUTO_CLASSES[task]).from_pretrained(base_dir, dtype="float32",
                                                                           trust_remote_code=False).eval()
    except Exception as e:
        raise EdgeLoraError(f"{base_dir}: cannot load the model weights ({str(e).splitlines()[0]})") from None


def base_fingerprint(model) -> str:
    """sha256 over the base weights (names, shapes, bytes), so adapters can be tied to the base they fit."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def generation_info(base_dir: Path, config) -> dict:
    """The manifest's ``generation``: EOS ids from generation_config.json when the folder has one (it
    overrides the model config there, as in transformers' own generate)."""
    eos = config.eos_token_id
    gen_path = base_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"eos_token_ids": eos_ids, "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}
