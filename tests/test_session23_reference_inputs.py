"""Session-23 mutation audit of the inference input checks (dira3d.evaluation.inputs): each test pins a behaviour that
a mutation of that module changed without any other test failing. References: the module and function docstrings (a
volume scaled to [0, 1] given for a raw CT, a CT given to an MRI model: strictly below AIR_HU, as
dira3d.data.modality judges it) on tiny hand-made arrays with the expected outcomes worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dira3d.data.errors import DataError
from dira3d.data.normalize import AIR_HU
from dira3d.evaluation import check_inference_input


def _volume(low: float, high: float) -> torch.Tensor:
    """(1, 4, 4, 4): 64 distinct values from ``low`` to ``high``, both included (no mask, no constant)."""
    return torch.as_tensor(np.linspace(low, high, 64, dtype=np.float32).reshape(1, 4, 4, 4))


def test_a_prepared_volume_with_air_at_exactly_0_is_refused_for_a_raw_ct():
    """``dira3d prepare`` maps air to 0: the usual prepared volume spans exactly [0, 1]."""
    with pytest.raises(DataError, match=r"prepared\.nii\.gz: has intensities from 0 to 1: it looks like a volume already "
                                        r"prepared by `dira3d prepare`"):
        check_inference_input(_volume(0.0, 1.0), "prepared.nii.gz", takes="ct", hu_window=[-1000, 400])
    check_inference_input(_volume(0.0, 1.0), "prepared.nii.gz", takes="ct", hu_window=[0, 1])  # the way out it names
    check_inference_input(_volume(-1000.0, 400.0), "raw.nii.gz", takes="ct", hu_window=[-1000, 400])


def test_an_mri_model_refuses_a_voxel_strictly_below_air_only():
    """A lowest voxel of exactly AIR_HU is no air (the boundary of dira3d.data.modality's check_mr)."""
    check_inference_input(_volume(AIR_HU, 800.0), "mri.nii.gz", takes="mr")
    with pytest.raises(DataError, match=r"ct\.nii\.gz: has voxels down to -501, below -500 \(air in Hounsfield units\)"):
        check_inference_input(_volume(AIR_HU - 1, 800.0), "ct.nii.gz", takes="mr")


def test_the_transform_takes_the_modality_in_any_case():
    """Bundles pass the user's modality setting (``--modality CT``) as ``takes``."""
    from dira3d.evaluation import CheckInferenceInputd

    check = CheckInferenceInputd(keys="image", takes="CT", hu_window=[-1000, 400])
    assert check.takes == "ct"
    with pytest.raises(DataError, match="it looks like a volume already prepared"):
        check({"image": _volume(0.0, 1.0)})


def test_screening_leaves_out_bad_data_only_and_raises_any_other_error():
    """A batch goes on without an input its checks refuse; an error that is no data problem (a bug, a transform
    that fails) is raised, not reported as a bad input."""
    from monai.transforms import Compose

    from dira3d.data.errors import DataWarning
    from dira3d.evaluation import CheckInferenceInputd, screen_inputs

    def fails_on_none(data):
        if data["image"] is None:
            raise ZeroDivisionError("a transform's own failure")
        return data

    preprocessing = Compose([fails_on_none, CheckInferenceInputd(keys="image", takes="ct")])
    good, other, prepared = {"image": _volume(-1000.0, 400.0)}, {"image": _volume(-900.0, 300.0)}, {"image": _volume(0.0, 1.0)}
    left_out: dict[int, str] = {}
    with pytest.warns(DataWarning) as warned:
        assert screen_inputs([good, prepared, other], preprocessing, left_out) == [good, other]
    assert [str(w.message).split(":")[0] for w in warned] == ["left out", "1 of 3 inputs left out (each named above); "
                                                              "inference goes on with the other 2"]
    assert list(left_out) == [1] and "already prepared" in left_out[1]
    with pytest.raises(Exception) as raised:
        screen_inputs([good, {"image": None}], preprocessing)
    chain, error = [], raised.value
    while error is not None:
        chain.append(type(error))
        error = error.__cause__ or error.__context__
    assert ZeroDivisionError in chain and DataError not in chain


def test_without_a_window_the_check_judges_with_the_usual_ct_window():
    """``hu_window`` not given: a raw-CT bundle's window is taken as (-1000, 1000), so a [0, 1] volume is refused."""
    with pytest.raises(DataError, match=r"applies the HU window \[-1000\.0, 1000\.0\] itself, which would make all of it "
                                        r"about 0\.5"):
        check_inference_input(_volume(0.0, 1.0), "prepared.nii.gz", takes="ct")
