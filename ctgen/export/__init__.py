"""Export of synthetic CT volumes: NIfTI + JSON sidecar, and a DICOM CT series, all marked synthetic."""

from ctgen.export.config import ExportConfig, to_int16_hu
from ctgen.export.dicom import SliceGeometry, dicom_from_nifti, dicom_geometry, save_synthetic_dicom
from ctgen.export.nifti import save_synthetic_nifti, stored_as
from ctgen.export.sidecar import build_sidecar, geometry, sidecar_path, to_json, write_sidecar

__all__ = [
    "ExportConfig",
    "SliceGeometry",
    "build_sidecar",
    "dicom_from_nifti",
    "dicom_geometry",
    "geometry",
    "save_synthetic_dicom",
    "save_synthetic_nifti",
    "sidecar_path",
    "stored_as",
    "to_int16_hu",
    "to_json",
    "write_sidecar",
]
