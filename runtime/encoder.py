"""Encoder packages (feature-extraction, sequence-classification): batches of texts in, embeddings or labels out.

``EncoderTasks`` holds the methods ``EdgeModel`` gains for them; the adapter is chosen per call
exactly as for generation, through ``EdgeModel.call``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora.errors import EdgeLoraError


@dataclass
class Classification:
    """One row per text: the raw logits, the arg-max class ids and their names from the model's id2label."""

    logits: np.ndarray  # [n, num_labels]
    label_ids: list[int]
    labels: list[str]

    @property
    def probabilities(self) -> np.ndarray:
        shifted = np.exp(self.logits - self.logits.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the mask keeps, as sentence-transformers' Pooling(mode="mean") computes it."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def pad_batches(tokenizer, manifest) -> None:
    """Pad each batch to its longest text (a tokenizer.json may pad everything to a fixed length) and
    truncate to what the position embeddings cover, or to the tokenizer's own limit when it is lower.

    The pad id is the model's own (RoBERTa derives positions from it), else the tokenizer's.
    """
    own_padding = tokenizer.padding or {}
    pad_id = manifest.generation.get("pad_token_id")
    if pad_id is None:
        pad_id = own_padding.get("pad_id", 0)
    pad_token = tokenizer.id_to_token(pad_id) or own_padding.get("pad_token", "[PAD]")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=own_padding.get("pad_type_id", 0))
    limit = manifest.graph["max_length"]
    own_limit = (tokenizer.truncation or {}).get("max_length", limit)
    tokenizer.enable_truncation(max_length=min(limit, own_limit))


class EncoderTasks:
    """``embed`` and ``classify`` (and the raw ``encoder_output``) for encoder packages."""

    def tokenize(self, texts) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch of texts, padded to the longest one."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise EdgeLoraError("texts must be a string or a non-empty list of strings")
        if self.tokenizer is None:
            raise EdgeLoraError(f"{self.package}: the package has no tokenizer.json; pass token ids to encoder_output")
        encodings = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.asarray([e.ids for e in encodings], np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int64),
        }

    def encoder_output(self, input_ids, attention_mask=None, token_type_ids=None, adapter=None) -> np.ndarray:
        """The graph's output for token ids [batch, seq]: last_hidden_state [batch, seq, hidden] or logits
        [batch, num_labels]. The mask defaults to all ones, token types to zeros."""
        self._require_task("encoder_output", "feature-extraction", "sequence-classification")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise EdgeLoraError(f"input_ids must be [seq] or [batch, seq] with seq > 0, got shape {ids.shape}")
        graph = self.manifest.graph
        if ids.shape[1] > graph["max_length"] or ids.min() < 0 or ids.max() >= graph["vocab_size"]:
            raise EdgeLoraError(f"input_ids must be ids in [0, {graph['vocab_size']}) and at most "
                                f"{graph['max_length']} per row, got shape {ids.shape}")
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        defaults = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds = {"input_ids": ids}
        for name in graph["inputs"][1:]:
            value = defaults[name] if given[name] is None else np.asarray(given[name], dtype=np.int64)
            if value.shape != ids.shape:
                raise EdgeLoraError(f"{name} has shape {value.shape}, input_ids {ids.shape}; they must match")
            feeds[name] = value
        with self.call(adapter) as call:
            for name, value in feeds.items():
                call.binding.bind_cpu_input(name, value)
            call.binding.bind_output(graph["outputs"][0])
            return call.run()[0].numpy()

    def embed(self, texts, adapter=None, normalize: bool = False) -> np.ndarray:
        """Sentence embeddings [n, hidden]: the last hidden state mean-pooled over each text's tokens.

        Not normalized unless ``normalize=True`` (unit L2 length, as all-MiniLM-L6-v2's sentence-transformers
        pipeline does); with normalized vectors a dot product is the cosine similarity.
        """
        self._require_task("embed", "feature-extraction")
        batch = self.tokenize(texts)
        hidden = self.encoder_output(**batch, adapter=adapter)
        pooled = mean_pool(hidden, batch["attention_mask"])
        if normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)
        return pooled

    def classify(self, texts, adapter=None) -> Classification:
        """Logits and arg-max labels per text (names from the model config's id2label)."""
        self._require_task("classify", "sequence-classification")
        logits = self.encoder_output(**self.tokenize(texts), adapter=adapter)
        id2label = self.manifest.graph["id2label"]
        label_ids = [int(i) for i in logits.argmax(axis=-1)]
        return Classification(logits=logits, label_ids=label_ids, labels=[id2label[str(i)] for i in label_ids])
