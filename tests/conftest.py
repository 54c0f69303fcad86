"""Shared fixtures: real scans copied from ../shared (see tests/data/NOTICE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REAL_NIFTI = ["pulmonary_report_ct_cropped.nii.gz", "example_ct_sm.nii.gz", "example_ct.nii.gz"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=REAL_NIFTI)
def real_nifti(request) -> Path:
    return DATA / request.param


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture
def repo_config() -> Path:
    return REPO / "config.yaml"
