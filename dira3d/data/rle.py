"""Run-length encoding of the SIIM-ACR pneumothorax masks (Kaggle's "relative" format).

A mask of ``rows × cols`` pixels is flattened in COLUMN-MAJOR order (down the first column, then
the second …: flat index ``col · rows + row``). The string is pairs ``start length``, where each
``start`` counts the pixels skipped since the END of the previous run (since index 0 for the first
run). ``"-1"`` (or an empty string) means an empty mask.

Example: on a 4 × 4 mask, ``"5 2 6 1"`` sets flat indices 5, 6 (column 1, rows 1–2) and, after
skipping 6 more pixels from index 7, index 13 (column 3, row 1).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMPTY", "decode_rle", "encode_rle"]

EMPTY = "-1"


def decode_rle(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode one RLE string into a ``uint8`` 0/1 mask of ``shape = (rows, cols)``.

    Args:
        rle: ``"start length start length …"`` (relative starts), ``"-1"`` or ``""`` for empty.
        shape: ``(rows, cols)`` of the image the mask belongs to.

    Returns:
        ``(rows, cols)`` ``uint8`` array of 0/1.

    Raises:
        ValueError: non-integer tokens, an odd count, negative starts, non-positive lengths, or runs
            that go past the end of the image (the message quotes the string's start).
    """
    rows, cols = int(shape[0]), int(shape[1])
    text = rle.strip()
    if text in ("", EMPTY):
        return np.zeros((rows, cols), np.uint8)
    try:
        numbers = np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"RLE {text[:40]!r}… holds a token that is not an integer") from err
    if numbers.size % 2:
        raise ValueError(f"RLE {text[:40]!r}… has an odd number of values; it must be start/length pairs")
    offsets, lengths = numbers[0::2], numbers[1::2]
    if (offsets < 0).any() or (lengths <= 0).any():
        raise ValueError(f"RLE {text[:40]!r}… has a negative start or a non-positive length")
    ends = np.cumsum(offsets + lengths)  # absolute end (exclusive) of each run
    starts = ends - lengths
    if ends[-1] > rows * cols:
        raise ValueError(f"RLE {text[:40]!r}… runs to pixel {int(ends[-1])}, past the {rows}×{cols} image; "
                         "is the shape right?")
    # +1 at each start, −1 at each end, cumulative sum = inside a run (no Python loop over runs)
    edges = np.zeros(rows * cols + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = np.cumsum(edges[:-1]) > 0
    return flat.reshape(cols, rows).T.astype(np.uint8)  # column-major flattening


def encode_rle(mask: np.ndarray) -> str:
    """Encode a 2D mask (non-zero = foreground) as a relative column-major RLE string.

    Returns:
        ``"start length …"`` with starts relative to the end of the previous run; ``"-1"`` for an
        empty mask. ``decode_rle(encode_rle(m), m.shape) == (m > 0)``.

    Raises:
        ValueError: ``mask`` is not 2D.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    flat = (mask.T.reshape(-1) > 0).astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    if changes.size == 0:
        return EMPTY
    starts, ends = changes[0::2], changes[1::2]
    previous_ends = np.concatenate([[0], ends[:-1]])
    pairs = np.stack([starts - previous_ends, ends - starts], axis=1).reshape(-1)
    return " ".join(str(int(v)) for v in pairs)
