"""Shared pieces of the export layer: its config and the conversion to whole int16 HU.

Files are written from a :class:`~ctprep.volume.Volume` whose array is ``(C, I, J, K)`` in affine
order (``ctgen.data.layout.from_model_layout`` brings a generator's output there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ctprep import __version__
from ctprep.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    """What every synthetic file says about itself; one instance serves NIfTI, DICOM and sidecar."""

    hu_range: tuple[int, int] = (-1024, 3071)  # clip (HU, inclusive): the 12-bit CT range, air to dense bone
    patient_name: str = "SYNTHETIC^CTGEN"  # DICOM PN: family^given, says synthetic in any patient list
    patient_id: str = "SYNTHETIC-CTGEN"  # DICOM LO (64 chars): never a real medical record number
    series_description: str = "SYNTHETIC CT ctgen - not a real patient"  # DICOM LO (64 chars)
    descrip: str = "SYNTHETIC ctgen {version} - not a real patient"  # NIfTI descrip (79 bytes); {version} filled
    # DICOM display windows (explanation, centre HU, width HU); the first is what viewers show first.
    windows: tuple[tuple[str, float, float], ...] = (("LUNG", -600.0, 1500.0), ("MEDIASTINUM", 40.0, 400.0))
    manufacturer: str = "ctgen (synthetic)"  # DICOM Manufacturer: the software, not a scanner

    def __post_init__(self) -> None:
        lo, hi = self.hu_range
        if not (-32768 <= lo < hi <= 32767):
            raise ValueError(f"hu_range must be an increasing pair within int16, got {self.hu_range}")

    @property
    def nifti_descrip(self) -> str:
        """The NIfTI ``descrip`` with the code version filled in."""
        return self.descrip.format(version=__version__)


def to_int16_hu(vol: Volume, hu_range: tuple[int, int]) -> tuple[Volume, int]:
    """The single-channel volume rounded to whole HU, clipped to ``hu_range``, as int16.

    Returns the new volume and the number of voxels that were clipped (NaN counts as clipped and
    becomes the lower bound: a generator that emits NaN must not write plausible-looking air).
    """
    data = vol.data
    lo, hi = hu_range
    if data.dtype.kind == "f":
        nan = np.isnan(data)
        rounded = np.rint(np.where(nan, lo, data))
        n_clipped = int(nan.sum() + ((rounded < lo) | (rounded > hi)).sum())
    else:
        rounded = data
        n_clipped = int(((data < lo) | (data > hi)).sum())
    out = np.clip(rounded, lo, hi).astype(np.int16)
    if n_clipped:
        logger.warning("clipped %d of %d voxels to HU range [%d, %d]", n_clipped, data.size, lo, hi)
    return vol.new_like(out[None], op="to_int16_hu", hu_range=[int(lo), int(hi)], n_clipped=n_clipped), n_clipped
