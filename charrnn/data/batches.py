"""Batches: B contiguous streams through the training ids, read T steps at a time.

Not here: the ids themselves (tokenfile.py), masks or models (train.py).
"""

from __future__ import annotations

import numpy as np

from charrnn.errors import DataError


class BatchStream:
    """B contiguous streams through a token sequence, read T steps at a time.

    The token sequence of length N is cut into B streams of S = (N - 1) // B steps each; stream b
    holds tokens [b*S, b*S + S] (one extra for the last target). A batch at position p
    (0 <= p < S) is gathered straight from the ids, which may be a memory-mapped token file:
    x[t, b] = ids[b*S + p + t] and y[t, b] = ids[b*S + p + t + 1], so nothing the size of the
    corpus is copied. The position p is all that is needed to resume.
    """

    def __init__(self, ids: np.ndarray, batch: int):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        self.B = batch
        self.S = (len(self.ids) - 1) // batch
        if self.S < 1:
            raise DataError(
                f"the training text is too small: {len(self.ids)} tokens cannot make {batch} streams of at least "
                "one step; use a smaller --batch or a larger corpus"
            )
        self._starts = np.arange(batch, dtype=np.int64) * self.S  # (B,) where each stream begins
        self.n_tokens = len(self.ids)

    def batches_per_epoch(self, T: int) -> int:
        return -(-self.S // T)

    def get(self, p: int, T: int, b0: int = 0, b1: int | None = None):
        """Inputs and targets for steps p .. p+T-1 (shorter at the end of an epoch), as int32 (T, B);
        with b0, b1: streams b0 .. b1-1 only, (T, b1-b0), gathered alone (a data-parallel worker
        reads only the pages of its own streams)."""
        if not 0 <= p < self.S:
            raise IndexError(f"position {p} outside [0, {self.S})")
        end = min(p + T, self.S)
        starts = self._starts[b0:b1]
        grid = self.ids[np.arange(p, end + 1, dtype=np.int64)[:, None] + starts[None, :]]  # (T+1, B)
        grid = grid.astype(np.int32)
        return grid[:-1], grid[1:]
