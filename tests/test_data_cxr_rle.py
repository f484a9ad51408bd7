"""SIIM-ACR run-length encoding: decoding against a mask drawn by hand, encoding, round trips."""

import numpy as np
import pytest

from dira3d.data.rle import EMPTY, decode_rle, encode_rle

# 4 rows × 5 columns, drawn by hand. Column-major flat index = col * 4 + row:
# (row 0, col 1) → 4, (1, 1) → 5, (3, 2) → 11, (1, 4) → 17, (2, 4) → 18.
HAND = np.array([
    [0, 1, 0, 0, 0],
    [0, 1, 0, 0, 1],
    [0, 0, 0, 0, 1],
    [0, 0, 1, 0, 0],
], np.uint8)
# runs [4, 5], [11], [17, 18]; starts relative to the previous run's end: 4, 11 − 6 = 5, 17 − 12 = 5
HAND_RLE = "4 2 5 1 5 2"


def test_decode_matches_hand_drawn_mask():
    mask = decode_rle(HAND_RLE, HAND.shape)
    assert mask.dtype == np.uint8 and mask.shape == (4, 5)
    np.testing.assert_array_equal(mask, HAND)
    # the absolute-start form of the same runs overruns the image when read as relative starts
    with pytest.raises(ValueError, match="past the"):
        decode_rle("4 2 11 1 17 2", HAND.shape)
    # a row-major reading of the same flat indices is another mask
    row_major = np.zeros(20, np.uint8)
    row_major[[4, 5, 11, 17, 18]] = 1
    assert not np.array_equal(row_major.reshape(4, 5), HAND)


def test_encode_matches_hand_written_string():
    assert encode_rle(HAND) == HAND_RLE
    assert encode_rle(HAND * 255) == HAND_RLE  # 0/255 masks encode the same


def test_empty_masks():
    assert encode_rle(np.zeros((3, 3))) == EMPTY == "-1"
    np.testing.assert_array_equal(decode_rle("-1", (3, 4)), np.zeros((3, 4)))
    np.testing.assert_array_equal(decode_rle(" ", (3, 4)), np.zeros((3, 4)))


def test_run_touching_the_last_pixel_and_adjacent_runs():
    full = decode_rle("0 6", (2, 3))
    assert full.all()
    # a relative start of 0 continues the previous run: same mask as one longer run
    np.testing.assert_array_equal(decode_rle("1 2 0 2", (2, 3)), decode_rle("1 4", (2, 3)))


@pytest.mark.parametrize("shape", [(1024, 1024), (7, 13), (13, 7)])
def test_round_trip_random_masks(shape):
    rng = np.random.default_rng(sum(shape))
    mask = (rng.random(shape) < 0.3).astype(np.uint8)
    mask[0, 0] = 1  # a run starting at index 0
    mask[-1, -1] = 1  # a run ending at the last pixel
    np.testing.assert_array_equal(decode_rle(encode_rle(mask), shape), mask)


@pytest.mark.parametrize("rle, message", [
    ("4 2 5", "odd number"),
    ("4 x", "not an integer"),
    ("-1 2", "negative start"),
    ("3 0", "non-positive length"),
    ("15 2 3 4", "past the"),
])
def test_bad_strings_raise(rle, message):
    with pytest.raises(ValueError, match=message):
        decode_rle(rle, (4, 5))


def test_encode_rejects_3d():
    with pytest.raises(ValueError, match="2D"):
        encode_rle(np.zeros((2, 2, 2)))
