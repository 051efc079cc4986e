"""Random numbers: one counter-based generator for everything random in the kernels, and the
dropout masks.

splitmix64's output function applied to a counter. Dropout masks hash (seed, step, element index),
so they do not depend on the number of threads, and resuming needs only the step number. Sampling
draws from a state of one uint64 (a 1-element array) that the caller seeds and keeps.
"""

import numpy as np

from charrnn.kernels.jit import helper, kernel
from charrnn.kernels.mathf import cast

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@helper
def mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@helper
def uniform(state):
    """A float64 in [0, 1) from the generator state (a 1-element uint64 array), advancing it."""
    state[0] += _GOLDEN
    return float(mix64(state[0]) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@helper
def mask_rows(p, n, masks, seed, step, prob, B_all, b0, locked):
    """Thread p of n: its share of the rows of masks (L, T, B, H) <- 0 with probability prob, else
    1/(1-prob) (inverted dropout). Element e of the mask at training step `step` is decided by
    hash(seed, step, e) alone, e indexing the (L, T, B_all, H) masks of the whole batch: `masks`
    holds its streams b0 .. b0+B-1 (a data-parallel worker's share, the same values the single
    process computes for those streams). `locked`: every time step of a stream gets the mask of
    its step 0 (variational dropout: one mask per layer and stream for the whole batch)."""
    L, T, B, H = masks.shape
    key = mix64(mix64(np.uint64(seed) + _GOLDEN) + np.uint64(step) * _M1)
    keep = cast(masks[0, 0, 0, 0], 1.0 / (1.0 - prob))
    zero = cast(masks[0, 0, 0, 0], 0.0)
    # keep when the top 32 bits, read as a fraction, are >= prob
    threshold = np.uint64(min(int(prob * 4294967296.0), 4294967295))
    n_rows = L * T * B
    flat = masks.reshape((n_rows, H))
    per = (n_rows + n - 1) // n
    for r in range(p * per, min(n_rows, (p + 1) * per)):
        lt, b = divmod(r, B)
        if locked:
            lt -= lt % T  # step 0 of the same layer
        r_all = lt * B_all + b0 + b  # the row's index in the whole batch's masks
        base = key + np.uint64(r_all) * np.uint64(H) * _GOLDEN
        row = flat[r]
        for j in range(H):
            u = mix64(base + np.uint64(j) * _GOLDEN) >> np.uint64(32)
            row[j] = keep if u >= threshold else zero


@kernel
def _masks_thread(p, n, masks, seed, step, prob, B_all, b0, locked):
    mask_rows(p, n, masks, seed, step, prob, B_all, b0, locked)


_WEIGHT_SALT = np.uint64(0xD1B54A32D192ED03)  # weight masks hash apart from the output masks of the same step


@kernel
def _weight_masks_thread(p, n, masks, seed, step, prob):
    """Thread p of n: its share of the rows of masks (L, R, C) <- 0 with probability prob, else
    1/(1-prob): element e of layer k decided by hash(seed, step, k, e) alone."""
    L, R, C = masks.shape
    key = mix64(mix64(np.uint64(seed) + _GOLDEN) + np.uint64(step) * _M1) ^ _WEIGHT_SALT
    keep = cast(masks[0, 0, 0], 1.0 / (1.0 - prob))
    zero = cast(masks[0, 0, 0], 0.0)
    threshold = np.uint64(min(int(prob * 4294967296.0), 4294967295))
    flat = masks.reshape((L * R, C))
    per = (L * R + n - 1) // n
    for r in range(p * per, min(L * R, (p + 1) * per)):
        base = mix64(key + np.uint64(r) * _M2)
        row = flat[r]
        for j in range(C):
            u = mix64(base + np.uint64(j) * _GOLDEN) >> np.uint64(32)
            row[j] = keep if u >= threshold else zero


@kernel
def _seed_state(seed):
    state = np.zeros(1, dtype=np.uint64)
    state[0] = mix64(np.uint64(seed) ^ _M2)
    return state


def seed_state(seed: int) -> np.ndarray:
    """A generator state (1-element uint64 array) seeded from `seed` (any int; taken modulo 2**64)."""
    return _seed_state(np.uint64(int(seed) % 2**64))


def dropout_masks(masks: np.ndarray, seed: int, step: int, prob: float, team, B_all: int | None = None,
                  b0: int = 0, locked: bool = False) -> np.ndarray:
    """Fill masks (L, T, B, H) with the inverted-dropout masks of training step `step`, split over
    the threads of `team` (the result does not depend on how many). With B_all: streams
    b0 .. b0+B-1 of the masks of a batch of B_all streams (a data-parallel worker's columns).
    `locked`: one mask per layer and stream, the same at every time step."""
    if masks.ndim != 4 or masks.dtype not in (np.float32, np.float64) or not masks.flags.c_contiguous:
        raise ValueError("masks must be a C-contiguous (L, T, B, H) float array")
    if not 0.0 <= prob < 1.0:
        raise ValueError("dropout probability must be in [0, 1)")
    B = masks.shape[2]
    B_all = B if B_all is None else int(B_all)
    if not (0 <= b0 and b0 + B <= B_all):
        raise ValueError(f"streams {b0} .. {b0 + B - 1} are not within a batch of {B_all}")
    n = max(1, min(team.size, masks.shape[0] * masks.shape[1] * B))
    team.run(n, _masks_thread, n, masks, np.uint64(int(seed) % 2**64), np.uint64(step), float(prob),
             np.int64(B_all), np.int64(b0), bool(locked))
    return masks


def weight_masks(masks: np.ndarray, seed: int, step: int, prob: float, team) -> np.ndarray:
    """Fill masks (L, R, C) with the inverted-dropout (DropConnect) masks of the recurrent weights
    at training step `step`: one mask per layer for the whole batch, decided by (seed, step) alone,
    so every data-parallel worker draws the same one and a resumed run the same as before."""
    if masks.ndim != 3 or masks.dtype not in (np.float32, np.float64) or not masks.flags.c_contiguous:
        raise ValueError("weight masks must be a C-contiguous (L, R, C) float array")
    if not 0.0 <= prob < 1.0:
        raise ValueError("weight-drop probability must be in [0, 1)")
    n = max(1, min(team.size, masks.shape[0] * masks.shape[1]))
    team.run(n, _weight_masks_thread, n, masks, np.uint64(int(seed) % 2**64), np.uint64(step), float(prob))
    return masks
