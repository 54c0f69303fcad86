"""Synthetic volume -> int16 HU NIfTI with a truthful affine, marked synthetic, plus its sidecar."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ctprep.errors import UserError
from ctprep.geometry import reorient
from ctprep.volume import Volume, check_nifti_path, is_sheared, save_nifti  # check_nifti_path: ctgen.jobs.sample's too

from ctgen.export.config import ExportConfig, to_int16_hu
from ctgen.export.sidecar import build_sidecar, sidecar_path, write_sidecar

logger = logging.getLogger(__name__)


def save_synthetic_nifti(
    vol: Volume,
    path: str | os.PathLike,
    sidecar: dict[str, Any],
    *,
    config: ExportConfig | None = None,
) -> tuple[Path, Path]:
    """Write ``vol`` (canonical RAS, HU) to ``path`` and ``<name>.json`` beside it.

    Voxels are rounded and clipped to ``config.hu_range`` and stored as int16 (no scaling); the
    affine goes into both sform and qform with code 1 (scanner), units mm; ``descrip`` says the
    volume is synthetic. Returns ``(nifti_path, sidecar_path)``. Both files are written
    atomically, sidecar first, so a NIfTI never exists without its provenance.
    """
    config = config or ExportConfig()
    path = Path(path)
    check_nifti_path(path)
    out, n_clipped = to_int16_hu(vol, config.hu_range)
    content = build_sidecar(out, sidecar, {
        "format": "nifti",
        "file": path.name,
        "dtype": "int16",
        "hu_range": list(config.hu_range),
        "n_clipped": n_clipped,
        "descrip": config.nifti_descrip,
        "qform_code": 0 if is_sheared(out.affine) else 1,  # a shear lives in the sform only (ctprep.volume.to_nifti)
        "sform_code": 1,
    })
    path.unlink(missing_ok=True)  # a rerun that dies in the encode must not leave the old volume under the new sidecar
    json_path = write_sidecar(sidecar_path(path), content)
    save_nifti(out, path, dtype="int16", descrip=config.nifti_descrip)
    logger.info("wrote synthetic NIfTI %s %r", path, out)
    return path, json_path


def check_orientation(orientation: str | None) -> tuple[str, ...] | None:
    """``orientation``'s axis codes (three, one each of R/L, A/P, S/I), None where none is given."""
    if not orientation:
        return None
    codes = tuple(orientation.upper())
    axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    if len(codes) != 3 or any(c not in axis for c in codes) or sorted(axis[c] for c in codes) != [0, 1, 2]:
        raise UserError(f"--orientation {orientation!r}: three axis codes, one each of R/L, A/P and S/I (e.g. PLI)")
    return codes


def stored_as(vol, orientation: str | None):
    """``vol`` with its voxels in the axis order ``orientation`` (three of R/L, A/P, S/I), the affine still true.

    The challenge's FVD_CTNet and CT-CLIP protocols read arrays in file order and ignore the header, so a
    submission must store its voxels as the ground truth does; the truthful affine keeps it a correct NIfTI.
    """
    codes = check_orientation(orientation)
    return vol if codes is None else reorient(vol, codes)
