"""dira3d.visual_words: TransVW self-discovery (see docs/visual_words.md and docs/architecture.md).

Embed volumes → nearest neighbours of seeded references → patch centres under the sampling
rules → crops of every neighbour at the same centre → float16 shards + manifest + datalist →
:class:`VisualWordPairDataset` for the pretraining engine.
"""

from dira3d.utils.lazy import lazy_exports

# Names resolve on first use (PEP 562, :mod:`dira3d.utils.lazy`): ``dira3d visual-words`` (its module is in this
# package) refuses a missing --datalist before torch and MONAI are imported (docs/benchmarks.md).
_EXPORTS = {
    "dira3d.visual_words.coordinates": ("CoordinateRules", "CoordinateSamplingError", "VolumeTooSmallError",
                                        "dense_fraction", "hu_to_unit", "is_mostly_lung", "sample_coordinate"),
    "dira3d.visual_words.dataset": ("VisualWordPairDataset", "has_validation_words", "load_visual_word_classes"),
    "dira3d.visual_words.discover": ("discover_visual_words",),
    "dira3d.visual_words.extractor": ("VolumeAutoencoder", "embed_volumes", "extractor_from_checkpoint", "train_extractor"),
    "dira3d.visual_words.neighbours": ("ReferenceSampler", "nearest_neighbours", "pairwise_distances"),
    "dira3d.visual_words.transforms": ("VisualWordCrop", "VisualWordCropd"),
    "dira3d.visual_words.writer": ("ShardWriter", "read_manifest"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, submodules=True)

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
