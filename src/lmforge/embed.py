"""Texts to vectors with an encoder-only model: sentence embeddings, cosine similarity, classification.

    >>> enc = lmforge.load("all-minilm-l6-v2")
    >>> vecs = enc.embed(["A man is eating food.", "A man is eating a piece of bread."])  # (2, 384)
    >>> float(vecs[0] @ vecs[1])     # normalised, so the dot product is the cosine

Texts longer than the encoder's positions are cut to fit, with a warning on stderr
(``truncate=False`` makes that an error instead).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.models.heads import POOLING, SequenceClassifier, pool
from lmforge.tokenizer import Tokenizer


class Encoder:
    """A loaded encoder-only model with its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, name: str = "encoder"):
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @property
    def config(self):
        return self.model.config

    def _batch(self, texts: Sequence[str], truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.config.max_seq_len
        ids = self.tokenizer.encode_batch(list(texts))
        too_long = [i for i, row in enumerate(ids) if len(row) > limit]
        if too_long:
            if not truncate:
                raise LmforgeError(f"text {too_long[0]} is {len(ids[too_long[0]])} tokens, more than the encoder's "
                                   f"{limit} positions (pass truncate=True / --truncate to cut it)")
            print(f"warning: {len(too_long)} text(s) longer than {limit} tokens were truncated", file=sys.stderr)
            # keep the end token (e.g. [SEP]) the post-processor appended
            ids = [row if len(row) <= limit else row[: limit - 1] + row[-1:] for row in ids]
        device = next(self.model.parameters()).device
        width = max(len(r) for r in ids)
        pad = self.tokenizer.pad_id or 0
        idx = torch.full((len(ids), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        for i, row in enumerate(ids):
            idx[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return idx, mask

    @torch.inference_mode()
    def embed(self, texts: str | Sequence[str], pooling: str = "mean", normalize: bool = True,
              batch_size: int = 32, truncate: bool = True) -> torch.Tensor:
        """Sentence embeddings (N, C), float32: mean (or CLS) pooling, L2-normalised by default."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise LmforgeError("embed needs a non-empty list of strings")
        if pooling not in POOLING:
            raise LmforgeError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLING)}")
        encoder = self.model.encoder if isinstance(self.model, SequenceClassifier) else self.model
        out = []
        for start in range(0, len(texts), batch_size):
            idx, mask = self._batch(texts[start:start + batch_size], truncate)
            vecs = pool(encoder(idx, mask), mask, pooling).float()
            out.append(torch.nn.functional.normalize(vecs, dim=-1) if normalize else vecs)
        return torch.cat(out)

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings."""
        va, vb = self.embed([a, b])
        return float(va @ vb)

    @torch.inference_mode()
    def classify(self, texts: str | Sequence[str], batch_size: int = 32, truncate: bool = True) -> torch.Tensor:
        """Class probabilities (N, num_labels) from a sequence-classification model."""
        if not isinstance(self.model, SequenceClassifier):
            raise LmforgeError(f"{self.name} has no classification head (its config has no labels)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        probs = []
        for start in range(0, len(texts), batch_size):
            idx, mask = self._batch(texts[start:start + batch_size], truncate)
            probs.append(self.model(idx, mask).float().softmax(-1))
        return torch.cat(probs)
