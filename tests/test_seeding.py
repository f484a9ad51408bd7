"""Seed derivation (dira3d.utils.seeding): the values are pinned, since reruns and resumes rely on them.

The expected numbers were computed with the two functions this module replaced (the engines'
63-bit ``derive_seed(seed, stream, counter)`` and visual-word discovery's 32-bit
``derive_seed(*parts)``), so a pass proves that every caller still gets the same seeds.
"""

from __future__ import annotations

import pytest
import torch

from dira3d.utils.seeding import derive_seed, stream_seed

STREAM_SEEDS = [  # (seed, stream, counter) -> 63-bit seed, as the training engines draw them
    ((0, 0, 0), 6375474603054492659),
    ((0, 1, 5), 7532623729652383484),
    ((7, 3, 123), 4173029106930519486),
    ((-1, 2, 9), 3197289349625823266),  # a negative seed is folded to its low 32 bits
    ((2**40 + 5, 4, 0), 597502436369142635),  # so is a seed wider than 32 bits
    ((12345, 16 + 2, 2**33), 1642408488993129705),
]
SEEDS_32 = [  # parts -> 32-bit seed, as visual-word discovery draws them
    ((0, 1, 0, 0), 3964924996),
    ((0, 2, 3), 3842683572),
    ((7, 1, 12, 2), 639460671),
    ((2**40 + 5, 2, 1), 711797098),  # not folded: every bit of every part counts
    ((3735928559, 0, 4), 1481066310),
    ((1,), 1835504127),
]


@pytest.mark.parametrize("args, expected", STREAM_SEEDS)
def test_stream_seed_keeps_the_engines_values(args, expected):
    assert stream_seed(*args) == expected
    assert 0 <= expected < 2**63
    torch.Generator().manual_seed(expected)  # fits a torch generator


@pytest.mark.parametrize("parts, expected", SEEDS_32)
def test_32_bit_seed_keeps_the_visual_word_values(parts, expected):
    assert derive_seed(*parts, bits=32) == expected


def test_63_bit_seed_is_the_stream_seed_without_folding():
    assert derive_seed(7, 3, 123, bits=63) == stream_seed(7, 3, 123)
    assert derive_seed(2**32 - 1, 2, 9, bits=63) == stream_seed(-1, 2, 9)


def test_order_and_every_part_matter():
    seeds = {derive_seed(0, 1, 5, bits=32), derive_seed(0, 5, 1, bits=32), derive_seed(0, 1, 6, bits=32),
             derive_seed(1, 1, 5, bits=32)}
    assert len(seeds) == 4
    # SeedSequence pads its input with zeros: trailing zero parts do not change the seed
    assert derive_seed(0, 1, 5, 0, bits=32) == derive_seed(0, 1, 5, bits=32)


def test_bad_width_and_negative_parts_are_refused():
    with pytest.raises(ValueError, match="bits=64 is not supported; choose 32 or 63"):
        derive_seed(0, 1, bits=64)
    with pytest.raises(ValueError):
        derive_seed(-1, 1, bits=32)
