"""dira3d.visual_words: TransVW self-discovery (see docs/visual_words.md and docs/architecture.md).

Embed volumes → nearest neighbours of seeded references → patch centres under the sampling
rules → crops of every neighbour at the same centre → float16 shards + manifest + datalist →
:class:`VisualWordPairDataset` for the pretraining engine.
"""

from dira3d.visual_words.coordinates import (
    CoordinateRules,
    CoordinateSamplingError,
    VolumeTooSmallError,
    dense_fraction,
    hu_to_unit,
    is_mostly_lung,
    sample_coordinate,
)
from dira3d.visual_words.dataset import VisualWordPairDataset, has_validation_words, load_visual_word_classes
from dira3d.visual_words.discover import discover_visual_words
from dira3d.visual_words.extractor import VolumeAutoencoder, embed_volumes, extractor_from_checkpoint, train_extractor
from dira3d.visual_words.neighbours import ReferenceSampler, nearest_neighbours, pairwise_distances
from dira3d.visual_words.transforms import VisualWordCrop, VisualWordCropd
from dira3d.visual_words.writer import ShardWriter, read_manifest

__all__ = [
    "CoordinateRules",
    "CoordinateSamplingError",
    "VolumeTooSmallError",
    "dense_fraction",
    "hu_to_unit",
    "is_mostly_lung",
    "sample_coordinate",
    "VisualWordPairDataset",
    "load_visual_word_classes",
    "has_validation_words",
    "discover_visual_words",
    "VolumeAutoencoder",
    "embed_volumes",
    "extractor_from_checkpoint",
    "train_extractor",
    "ReferenceSampler",
    "nearest_neighbours",
    "pairwise_distances",
    "VisualWordCrop",
    "VisualWordCropd",
    "ShardWriter",
    "read_manifest",
]
