"""LIDC-IDRI reader annotations: parse the XML reads, rasterise outlines, group and vote.

The LIDC-IDRI XML files (namespace ``http://www.nih.gov``, root ``LidcReadMessage``) hold one
``readingSession`` per radiologist. Each ``unblindedReadNodule`` is one reader's nodule: a
``noduleID``, ``characteristics`` (subtlety … malignancy, absent for nodules < 3 mm) and one
``roi`` per slice with ``imageZposition``, ``imageSOP_UID``, ``inclusion`` (TRUE = outline of
the nodule, FALSE = a hole to cut out) and the ``edgeMap`` points (``xCoord`` = column,
``yCoord`` = row, 0-based pixels). A nodule < 3 mm is a single edge point; ``nonNodule`` marks
are points too. Only nodules with a real outline (> 1 edge point) are kept here.

This module knows nothing about the image beyond its grid shape: the caller maps each ROI to a
slice index (by SOP instance UID or z position) and turns voxel indices into millimetres.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib.path import Path as PolygonPath

__all__ = [
    "RoiOutline",
    "ReaderNodule",
    "LidcReads",
    "parse_lidc_xml",
    "rasterize_nodule",
    "group_reader_nodules",
    "consensus_fraction",
    "equivalent_radius_mm",
]


@dataclass(frozen=True)
class RoiOutline:
    """One reader's outline of a nodule on one slice.

    Attributes:
        z_mm: ``imageZposition`` of the slice (mm, patient z).
        sop_uid: ``imageSOP_UID`` of the slice ("" when absent).
        inclusion: True for the nodule outline, False for a hole (excluded region).
        points: ``(N, 2)`` int array of (column, row) edge pixels.
    """

    z_mm: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class ReaderNodule:
    """One reader's nodule (an ``unblindedReadNodule`` element).

    Attributes:
        reader: index of the ``readingSession`` (0-based) that drew it.
        nodule_id: the reader's ``noduleID`` text.
        rois: the per-slice outlines.
        characteristics: integer ratings (``malignancy``, ``subtlety`` …); empty for < 3 mm.
    """

    reader: int
    nodule_id: str
    rois: tuple[RoiOutline, ...]
    characteristics: dict[str, int] = field(default_factory=dict)

    @property
    def outlined(self) -> bool:
        """True when the nodule has a real outline (≥ 3 mm), False for a single-point mark."""
        return any(len(roi.points) > 1 for roi in self.rois)


@dataclass(frozen=True)
class LidcReads:
    """All reads of one CT series.

    Attributes:
        path: the XML file.
        series_uid: ``SeriesInstanceUid`` from the response header ("" when absent).
        num_readers: number of ``readingSession`` elements.
        nodules: every reader's outlined nodules (≥ 3 mm), in file order.
        small_nodules: number of single-point (< 3 mm) marks skipped.
    """

    path: Path
    series_uid: str
    num_readers: int
    nodules: list[ReaderNodule]
    small_nodules: int


def _local(tag: str) -> str:
    # Namespaces vary between LIDC releases (and some files have none): match local names only.
    return tag.rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def _text(element: ET.Element, name: str, default: str = "") -> str:
    for child in element:
        if _local(child.tag) == name and child.text is not None:
            return child.text.strip()
    return default


def _parse_roi(roi: ET.Element, path: Path) -> RoiOutline:
    points = []
    for edge in _children(roi, "edgeMap"):
        try:
            points.append((int(float(_text(edge, "xCoord"))), int(float(_text(edge, "yCoord")))))
        except ValueError as err:
            raise ValueError(f"{path}: an edgeMap has a missing or non-numeric xCoord/yCoord ({err}); "
                             "the XML file is damaged, re-download it") from err
    z_text = _text(roi, "imageZposition", "nan")
    try:
        z_mm = float(z_text)
    except ValueError as err:
        raise ValueError(f"{path}: imageZposition {z_text!r} is not a number; the XML file is damaged") from err
    return RoiOutline(
        z_mm=z_mm,
        sop_uid=_text(roi, "imageSOP_UID"),
        inclusion=_text(roi, "inclusion", "TRUE").upper() != "FALSE",
        points=np.asarray(points, dtype=np.int64).reshape(-1, 2),
    )


def _parse_characteristics(nodule: ET.Element) -> dict[str, int]:
    ratings: dict[str, int] = {}
    for block in _children(nodule, "characteristics"):
        for item in block:
            try:
                ratings[_local(item.tag)] = int(float((item.text or "").strip()))
            except ValueError:
                continue  # empty ratings occur in real files; they are simply not recorded
    return ratings


def parse_lidc_xml(path: str | Path) -> LidcReads:
    """Parse one LIDC-IDRI reader XML file.

    Args:
        path: a ``*.xml`` file of the LIDC-IDRI download (``LidcReadMessage`` root).

    Returns:
        The reads: one :class:`ReaderNodule` per outlined nodule of each reader.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not well-formed XML, is not an LIDC CT read (e.g. a chest
            radiograph ``IdriReadMessage``), or has non-numeric coordinates.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LIDC XML file {path} does not exist; check --src / --xml-dir")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path} is not well-formed XML ({err}); re-download the LIDC XML annotations") from err
    if _local(root.tag) != "LidcReadMessage":
        raise ValueError(f"{path} has root <{_local(root.tag)}>, not <LidcReadMessage>: it is not an LIDC CT read "
                         "(radiograph reads are IdriReadMessage); remove it or point --xml-dir elsewhere")
    series_uid = ""
    for header in _children(root, "ResponseHeader"):
        series_uid = _text(header, "SeriesInstanceUid") or _text(header, "SeriesInstanceUID")
    sessions = _children(root, "readingSession")
    nodules: list[ReaderNodule] = []
    small = 0
    for reader, session in enumerate(sessions):
        for element in _children(session, "unblindedReadNodule"):
            nodule = ReaderNodule(
                reader=reader,
                nodule_id=_text(element, "noduleID"),
                rois=tuple(_parse_roi(roi, path) for roi in _children(element, "roi")),
                characteristics=_parse_characteristics(element),
            )
            if nodule.outlined:
                nodules.append(nodule)
            else:
                small += 1
    return LidcReads(path=path, series_uid=series_uid, num_readers=len(sessions), nodules=nodules, small_nodules=small)


def _fill_outline(points: np.ndarray, shape_xy: tuple[int, int], include_outline: bool) -> np.ndarray:
    """Pixels (column, row) inside one closed outline, clipped to the slice."""
    lo = np.maximum(points.min(axis=0), 0)
    hi = np.minimum(points.max(axis=0), np.asarray(shape_xy) - 1)
    if np.any(hi < lo):
        return np.zeros((0, 2), dtype=np.int64)
    cols, rows = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
    centres = np.stack([cols.ravel(), rows.ravel()], axis=1)
    inside = PolygonPath(points.astype(float), closed=True).contains_points(centres)
    on_outline = np.zeros(len(centres), dtype=bool)
    valid = np.all((points >= lo) & (points <= hi), axis=1)
    flat = (points[valid, 0] - lo[0]) * (hi[1] - lo[1] + 1) + (points[valid, 1] - lo[1])
    on_outline[flat] = True
    # LIDC readers were told to draw the outline just outside the nodule, so by default the
    # outline pixels are not nodule; a tiny outline with an empty interior keeps its pixels.
    chosen = (inside | on_outline) if include_outline else (inside & ~on_outline)
    if not chosen.any():
        chosen = on_outline
    return centres[chosen]


def rasterize_nodule(
    nodule: ReaderNodule,
    shape_xyz: Sequence[int],
    slice_index: Callable[[RoiOutline], int | None],
    include_outline: bool = False,
) -> np.ndarray:
    """Voxels of one reader's nodule on the image grid.

    Args:
        nodule: the reader's nodule.
        shape_xyz: image size (columns, rows, slices), SimpleITK index order.
        slice_index: maps an outline to its slice index (``None`` when the slice is not in
            the series; such outlines are skipped).
        include_outline: count the outline pixels as nodule (LIDC outlines lie just outside).

    Returns:
        ``(N, 3)`` int array of unique (column, row, slice) indices; holes (inclusion FALSE)
        are removed from the outlines of the same slice.
    """
    shape_xy = (int(shape_xyz[0]), int(shape_xyz[1]))
    kept: dict[int, set[tuple[int, int]]] = {}
    holes: dict[int, set[tuple[int, int]]] = {}
    for roi in nodule.rois:
        k = slice_index(roi)
        if k is None or not 0 <= k < int(shape_xyz[2]) or len(roi.points) == 0:
            continue
        # A hole's outline is drawn outside the hole, i.e. on nodule: only its interior is cut.
        pixels = _fill_outline(roi.points, shape_xy, include_outline and roi.inclusion)
        target = kept if roi.inclusion else holes
        target.setdefault(k, set()).update(map(tuple, pixels.tolist()))
    voxels = []
    for k, pixels in kept.items():
        for col, row in sorted(pixels - holes.get(k, set())):
            voxels.append((col, row, k))
    return np.asarray(voxels, dtype=np.int64).reshape(-1, 3)


def group_reader_nodules(
    centroids_mm: Sequence[np.ndarray],
    radii_mm: Sequence[float],
    readers: Sequence[int],
    distance_mm: float = 10.0,
) -> list[list[int]]:
    """Group readers' nodules into physical nodules.

    Two marks are linked when their centroids are closer than the larger of ``distance_mm`` and
    the larger equivalent-sphere radius. Links are taken closest first (single linkage) and
    never join two groups that share a reader — one reader cannot outline one nodule twice —
    so two nearby nodules seen by the same readers stay apart.

    Args:
        centroids_mm: per-mark centroid in mm.
        radii_mm: per-mark equivalent-sphere radius in mm.
        readers: per-mark reader index.
        distance_mm: the linking distance (mm).

    Returns:
        Groups of mark indices, each sorted, ordered by their first mark.
    """
    n = len(centroids_mm)
    parent = list(range(n))
    members: dict[int, set[int]] = {i: {readers[i]} for i in range(n)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            dist = float(np.linalg.norm(np.asarray(centroids_mm[i]) - np.asarray(centroids_mm[j])))
            if readers[i] != readers[j] and dist <= max(distance_mm, radii_mm[i], radii_mm[j]):
                pairs.append((dist, i, j))
    for _, i, j in sorted(pairs):
        a, b = find(i), find(j)
        if a == b or members[a] & members[b]:
            continue
        parent[b] = a
        members[a] |= members.pop(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda group: group[0])


def consensus_fraction(masks: Sequence[np.ndarray], margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of readers marking each voxel, on the bounding box of all marks.

    Args:
        masks: per-reader ``(N, 3)`` voxel index arrays (at least one non-empty).
        margin: voxels of zero padding around the box (so linear resampling fades to 0).

    Returns:
        ``(start, fraction)``: the box's first voxel index (may be negative by ``margin``) and a
        float32 array (x, y, z) of votes / number of readers.

    Raises:
        ValueError: every mask is empty.
    """
    non_empty = [m for m in masks if len(m)]
    if not non_empty:
        raise ValueError("no reader marked any voxel of this nodule (all outlines fell outside the series)")
    stacked = np.concatenate(non_empty)
    start = stacked.min(axis=0) - margin
    size = stacked.max(axis=0) - start + 1 + margin
    votes = np.zeros(tuple(int(s) for s in size), dtype=np.float32)
    for mask in non_empty:
        local = mask - start
        votes[local[:, 0], local[:, 1], local[:, 2]] += 1.0
    return start, votes / float(len(masks))


def equivalent_radius_mm(num_voxels: int, voxel_volume_mm3: float) -> float:
    """Radius (mm) of the sphere with the volume of ``num_voxels`` voxels."""
    return (3.0 * num_voxels * voxel_volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
