"""DICOM series -> Volume / NIfTI, checked against SimpleITK (GDCM) on real series.

The reference is SimpleITK's ImageSeriesReader, an independent reader with its own sorting,
rescale and geometry; ITK speaks LPS, so its affine is flipped with ``lps_to_ras`` here.
Broken series are made by editing copies in a temporary folder; tests/data stays untouched.
"""

from __future__ import annotations

import copy

import re
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from ctprep import dicom, geometry
from ctprep.ctrate import METADATA_COLUMNS
from ctprep.dicom import SeriesError, convert_folder, dicom_to_nifti, metadata_row, read_series
from ctprep.volume import VolumeError, lps_to_ras

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLE = DATA / "example_ct_dicom"  # 20 Siemens slices, JPEG 2000 lossless, step 2 mm, thickness 3 mm
LUNG = DATA / "lungmask_slices"  # header-stripped, both files hold the same image


# --- references ---------------------------------------------------------------------------
def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def sitk_affine_ras(img: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return lps_to_ras(lps)


def sitk_ijk(img: sitk.Image) -> np.ndarray:
    """SimpleITK's (z, y, x) array as (i, j, k) = (x, y, z)."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


@pytest.fixture(scope="module")
def example():
    return read_series(EXAMPLE)


@pytest.fixture(scope="module")
def example_sitk():
    return sitk_series(EXAMPLE)


def by_position(folder: Path) -> list[Path]:
    """Files of an axial series from feet to head (ImagePositionPatient z)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


# --- the real series against SimpleITK ----------------------------------------------------
def test_voxels_equal_simpleitk(example, example_sitk):
    ref = sitk_ijk(example_sitk)
    assert example.shape == ref.shape == (512, 512, 20)
    assert example.data.dtype == np.int16
    np.testing.assert_array_equal(example.data, ref)


def test_affine_equals_simpleitk(example, example_sitk):
    np.testing.assert_allclose(example.affine, sitk_affine_ras(example_sitk), atol=1e-4)
    # Index convention, point by point: i runs along x (columns), j along y, k along z.
    for ijk in [(0, 0, 0), (10, 300, 7), (511, 5, 19)]:
        lps = np.asarray(example_sitk.TransformIndexToPhysicalPoint(ijk))
        ras = example.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-4)
        assert example.data[ijk] == example_sitk.GetPixel(ijk)
    assert example.orientation == ("L", "P", "S")


def test_slice_step_is_measured_not_thickness(example):
    np.testing.assert_allclose(example.spacing, [0.9765625, 0.9765625, 2.0])
    assert example.meta["slice_step_mm"] == 2.0
    assert example.meta["slice_thickness_header"] == 3.0
    # k grows towards the head; slice 0 is the lowest position in the files
    np.testing.assert_allclose(example.origin, [249.51171875, 437.51171875, -804.5])


def test_hu_plausible_and_meta(example):
    data = example.data
    assert data.min() == -1024  # stored 0 plus RescaleIntercept -1024
    assert (data < -900).mean() > 0.1  # air around the body
    assert ((data > -200) & (data < 150)).mean() > 0.1  # fat and soft tissue
    assert data.max() > 300  # bone / contrast
    m = example.meta
    assert m["hu"] is True and m["stored_convention"] == "raw" and m["space"] == "RAS"
    assert m["modality"] == "CT" and m["manufacturer"] == "SIEMENS" and m["n_slices"] == 20
    assert m["transfer_syntax"] == ["JPEG 2000 Image Compression (Lossless Only)"]
    assert m["rescale"] == [[1.0, -1024.0]]
    assert [h["op"] for h in m["history"]] == ["read_dicom"]
    assert m["source"] == str(EXAMPLE)


def test_one_slice_matches_pydicom_modality_lut(example):
    # independent of SimpleITK: pydicom's own rescale of the file at the lowest position
    ds = pydicom.dcmread(by_position(EXAMPLE)[0])
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    np.testing.assert_array_equal(example.data[:, :, 0], hu.T)


def test_shuffled_file_names_give_same_volume(example, tmp_path):
    for n, src in enumerate(sorted(EXAMPLE.iterdir())):
        shutil.copy(src, tmp_path / f"{uuid.uuid4().hex}_{19 - n}.dcm")
    (tmp_path / "README.txt").write_text("not DICOM")
    vol = read_series(tmp_path)
    np.testing.assert_array_equal(vol.data, example.data)
    np.testing.assert_array_equal(vol.affine, example.affine)


def test_per_slice_rescale(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    files = by_position(folder)
    edit(files[3], RescaleIntercept="-1000")
    edit(files[4], RescaleSlope="0.5")
    vol = read_series(folder)
    ref = read_series(EXAMPLE)
    assert vol.data.dtype == np.float32  # slope 0.5 makes HU non-integer
    np.testing.assert_array_equal(vol.data[..., 3], ref.data[..., 3] + 24)
    np.testing.assert_array_equal(vol.data[..., 4], (ref.data[..., 4].astype(np.float32) + 1024) * 0.5 - 1024)
    np.testing.assert_array_equal(vol.data[..., 5], ref.data[..., 5])


def test_tilted_stack_affine_hits_every_slice_position(tmp_path):
    # Gantry tilt: positions drift 0.5 mm in y per slice; the affine must follow the positions
    # (a sheared affine), not the slice normal.
    folder = copy_series(EXAMPLE, tmp_path / "s")
    ipps = []
    for k, path in enumerate(by_position(folder)):
        x, y, z = (float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient)
        ipps.append([x, y + 0.5 * k, z])
        edit(path, ImagePositionPatient=ipps[-1])
    vol = read_series(folder)
    for k, ipp in enumerate(ipps):
        np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], [-ipp[0], -ipp[1], ipp[2], 1], atol=1e-6)
    assert vol.meta["slice_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.5 / 2.0)), abs=1e-3)
    assert vol.meta["slice_step_mm"] == 2.0


# --- refusals -----------------------------------------------------------------------------
def enhanced_ct(src: Path, out: Path, per_frame_rescale: bool) -> Path:
    """The classic series ``src`` written as one enhanced (multi-frame) CT file, frames in a shuffled order:
    positions per frame, orientation and pixel measures shared, the rescale shared or per frame (then frame k
    stores its pixels k higher, with an intercept k lower: the same HU)."""
    files = by_position(src)
    order = np.random.default_rng(0).permutation(len(files))
    heads = [pydicom.dcmread(files[k]) for k in order]
    first = heads[0]
    ds = pydicom.Dataset()
    for keyword in ("Modality", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "PatientSex", "PatientAge",
                    "Manufacturer", "Rows", "Columns", "BitsAllocated", "PixelRepresentation", "SamplesPerPixel",
                    "PhotometricInterpretation"):
        setattr(ds, keyword, first.get(keyword))
    ds.BitsStored, ds.HighBit = 16, 15
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = len(heads)

    def item(**tags):
        out = pydicom.Dataset()
        for keyword, value in tags.items():
            setattr(out, keyword, value)
        return out

    def rescale(k):
        return item(RescaleSlope=first.RescaleSlope, RescaleIntercept=float(first.RescaleIntercept) - k,
                    RescaleType="HU")

    shared = item(PlaneOrientationSequence=[item(ImageOrientationPatient=first.ImageOrientationPatient)],
                  PixelMeasuresSequence=[item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = [rescale(0)]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k, h in enumerate(heads):
        groups = item(PlanePositionSequence=[item(ImagePositionPatient=h.ImagePositionPatient)])
        if per_frame_rescale:
            groups.PixelValueTransformationSequence = [rescale(k)]
        frames.append(groups)
    ds.PerFrameFunctionalGroupsSequence = frames
    shift = np.arange(len(heads)) if per_frame_rescale else np.zeros(len(heads), int)
    ds.PixelData = np.stack([h.pixel_array + d for h, d in zip(heads, shift)]).astype(np.uint16).tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    out.mkdir()
    ds.save_as(out / "enhanced.dcm", enforce_file_format=True)
    return out


@pytest.mark.parametrize("per_frame_rescale", [False, True], ids=["shared-rescale", "per-frame-rescale"])
def test_enhanced_multiframe_ct_reads_like_its_classic_series(example, tmp_path, per_frame_rescale):
    folder = enhanced_ct(EXAMPLE, tmp_path / "enhanced", per_frame_rescale)
    vol = read_series(folder)
    np.testing.assert_array_equal(vol.data, example.data)  # example: SimpleITK's voxels (test above)
    np.testing.assert_allclose(vol.affine, example.affine, atol=1e-6)  # and its affine
    assert vol.data.dtype == np.int16 and vol.meta["n_slices"] == 20 and vol.meta["slice_step_mm"] == pytest.approx(2.0)
    assert vol.meta["metadata_row"]["PatientSex"] == example.meta["metadata_row"]["PatientSex"]
    assert len(vol.meta["rescale"]) == (20 if per_frame_rescale else 1)
    # a frame without its functional group is named
    ds = pydicom.dcmread(folder / "enhanced.dcm")
    del ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    ds.save_as(folder / "enhanced.dcm")
    with pytest.raises(SeriesError, match="missing ImagePositionPatient in enhanced.dcm frame 4"):
        read_series(folder)


def test_enhanced_ct_written_one_frame_per_file_reads_like_its_classic_series(example, tmp_path):
    """Some scanners write an enhanced CT series as one single-frame file per image: the geometry is still in
    the functional groups only."""
    whole = pydicom.dcmread(enhanced_ct(EXAMPLE, tmp_path / "enhanced", per_frame_rescale=True) / "enhanced.dcm")
    frames = whole.pixel_array
    out = tmp_path / "single"
    out.mkdir()
    for k, groups in enumerate(whole.PerFrameFunctionalGroupsSequence):
        ds = copy.deepcopy(whole)
        ds.NumberOfFrames = 1
        ds.PerFrameFunctionalGroupsSequence = [groups]
        ds.PixelData = frames[k].astype(np.uint16).tobytes()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(out / f"frame{k:02d}.dcm", enforce_file_format=True)
    vol = read_series(out)
    np.testing.assert_array_equal(vol.data, example.data)
    np.testing.assert_allclose(vol.affine, example.affine, atol=1e-6)


def test_missing_middle_slice_is_refused(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    files = by_position(folder)
    files[10].unlink()
    with pytest.raises(SeriesError, match=r"missing slice\(s\) between positions -786\.500 and -782\.500 mm"):
        read_series(folder)
    vol = read_series(folder, allow_gaps=True)  # recorded, not hidden
    assert vol.shape[2] == 19 and vol.meta["gaps"][0]["missing"] == 1
    assert vol.meta["slice_step_mm"] == 2.0
    # but not written: the NIfTI's uniform step put every slice after the gap 2 mm from its scanned position
    with pytest.raises(SeriesError, match=r"1 missing slice\(s\) .*uniform step would misplace"):
        dicom_to_nifti(folder, tmp_path / "gap.nii.gz", allow_gaps=True)
    assert not (tmp_path / "gap.nii.gz").exists()


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"Modality": "MR"}, r"Modality is 'MR' in .*, not CT"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "mixed ImageOrientationPatient"),
        ({"PixelSpacing": [0.8, 0.8]}, "mixed PixelSpacing"),
        ({"ImagePositionPatient": None}, "missing ImagePositionPatient"),
        ({"ImageOrientationPatient": None}, "missing ImageOrientationPatient"),
        ({"PixelData": None}, "no pixel data"),
        ({"ImagePositionPatient": [-249.51171875, -437.51171875, -785.5]}, "non-uniform slice spacing"),
    ],
)
def test_bad_slice_is_refused(tmp_path, tags, message):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    edit(by_position(folder)[7], **tags)
    with pytest.raises(SeriesError, match=message):
        read_series(folder)


def test_truncated_file_is_refused(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    path = by_position(folder)[9]
    path.write_bytes(path.read_bytes()[:100_000])  # cut inside the JPEG 2000 fragments
    with pytest.raises(SeriesError, match=f"no pixel data in {path.name}"), pytest.warns(UserWarning):
        read_series(folder)


def test_positions_written_to_a_tenth_of_a_millimetre_are_read_within_their_rounding(tmp_path):
    """0.625 mm slices whose positions were written to 0.1 mm (-785.6, -785.0, -784.4, ...): steps of 0.6 and 0.7,
    none off by more than the writer's unit, are one uniform stack at the mean step; a step 0.3 mm off beyond its
    rounding is still refused."""
    folder = copy_series(EXAMPLE, tmp_path / "s")
    files = by_position(folder)
    z0 = float(pydicom.dcmread(files[0]).ImagePositionPatient[2])
    for k, path in enumerate(files):
        x, y, _ = pydicom.dcmread(path).ImagePositionPatient
        edit(path, ImagePositionPatient=[x, y, f"{z0 + 0.625 * k:.1f}"])
    vol = read_series(folder)
    assert vol.affine[2, 2] == pytest.approx(0.625, abs=0.1 / 19)  # (last - first) / 19, each end within 0.05 mm
    x, y, _ = pydicom.dcmread(files[10]).ImagePositionPatient
    edit(files[10], ImagePositionPatient=[x, y, f"{z0 + 0.625 * 10 + 0.3:.1f}"])
    with pytest.raises(SeriesError, match="non-uniform slice spacing"):
        read_series(folder)


def test_duplicate_position_is_refused(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    files = by_position(folder)
    edit(files[5], ImagePositionPatient=list(pydicom.dcmread(files[4]).ImagePositionPatient))
    with pytest.raises(SeriesError, match="duplicate slice position"):
        read_series(folder)


def test_several_series_need_a_choice(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    for n, path in enumerate(by_position(folder)):
        edit(path, SeriesInstanceUID="1.2.3.1" if n < 12 else "1.2.3.2")
    with pytest.raises(SeriesError, match=r"2 series: 1\.2\.3\.1 \(CT, 12 files\); 1\.2\.3\.2 \(CT, 8 files\)"):
        read_series(folder)
    vol = read_series(folder, series_uid="1.2.3.2")
    assert vol.shape == (512, 512, 8) and vol.meta["series_uid"] == "1.2.3.2"
    np.testing.assert_array_equal(vol.data, read_series(EXAMPLE).data[..., 12:])


def test_a_scout_a_dose_report_and_a_screenshot_beside_the_series_are_skipped(tmp_path, caplog):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    files = by_position(folder)
    extras = {"scout_ap.dcm": dict(SeriesInstanceUID="1.2.3.7", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
              "scout_lat.dcm": dict(SeriesInstanceUID="1.2.3.7", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
              "dose.dcm": dict(SeriesInstanceUID="1.2.3.8", Modality="SR"),
              "screen.dcm": dict(SeriesInstanceUID="1.2.3.9", ImageType=["DERIVED", "SECONDARY", "SCREEN SAVE"])}
    for k, (name, tags) in enumerate(extras.items()):
        shutil.copy(files[k], folder / name)
        edit(folder / name, **tags)
    with caplog.at_level("WARNING", logger="ctprep.dicom"):
        vol = read_series(folder)
    np.testing.assert_array_equal(vol.data, read_series(EXAMPLE).data)
    assert vol.meta["n_slices"] == 20
    assert re.search(r"skipped 1\.2\.3\.7 \(localizer images\); 1\.2\.3\.8 \(modality SR\); 1\.2\.3\.9 "
                     r"\(screen captures", caplog.text), caplog.text
    # two series that could each be the volume: still a choice, the skippable ones marked
    for n, path in enumerate(files):
        if n >= 12:
            edit(path, SeriesInstanceUID="1.2.3.2")
    with pytest.raises(SeriesError, match=r"5 series: .*1\.2\.3\.2 \(CT, 8 files\); 1\.2\.3\.7 \(CT, 2 files, "
                                          r"localizer images\).*a folder of its own.*--series-uid"):
        read_series(folder)


def test_a_dose_screen_of_two_pages_without_positions_is_skipped(tmp_path, caplog):
    """A vendor's dose screen of two CT images (SCREEN SAVE, no position or orientation), and the same pages
    without their ImageType: neither could be the volume, so the folder is not refused for holding two series."""
    for image_type in (["DERIVED", "SECONDARY", "SCREEN SAVE"], None):
        folder = copy_series(EXAMPLE, tmp_path / f"s{image_type is None}")
        for k, path in enumerate(by_position(folder)[:2]):
            page = folder / f"dose{k}.dcm"
            shutil.copy(path, page)
            ds = pydicom.dcmread(page)
            ds.SeriesInstanceUID = "1.2.3.8"
            del ds.ImagePositionPatient, ds.ImageOrientationPatient
            if image_type is None:
                del ds.ImageType
            else:
                ds.ImageType = image_type
            ds.save_as(page)
        with caplog.at_level("WARNING", logger="ctprep.dicom"):
            vol = read_series(folder)
        np.testing.assert_array_equal(vol.data, read_series(EXAMPLE).data)
        assert ("screen captures" if image_type else "no image positions") in caplog.text


def test_a_reformat_beside_the_axial_series_is_skipped(tmp_path, caplog):
    """A study's coronal reformat (its ImageType says nothing) beside the axial series is a second view of the same
    scan: the axial series is read and the reformat named as skipped, not a choice to make."""
    folder = copy_series(EXAMPLE, tmp_path / "s")
    for k, path in enumerate(by_position(folder)[:4]):
        shutil.copy(path, folder / f"cor{k}.dcm")
        edit(folder / f"cor{k}.dcm", SeriesInstanceUID="1.2.3.8", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with caplog.at_level("WARNING", logger="ctprep.dicom"):
        vol = read_series(folder)
    np.testing.assert_array_equal(vol.data, read_series(EXAMPLE).data)
    assert "1.2.3.8 (not axial (a coronal or sagittal reformat))" in caplog.text, caplog.text


def test_the_cli_picks_one_of_several_series(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    for n, path in enumerate(by_position(folder)):
        edit(path, SeriesInstanceUID="1.2.3.1" if n < 12 else "1.2.3.2")
    from ctprep.cli import main

    assert main(["dicom2nifti", str(folder), str(tmp_path / "b.nii.gz"), "--series-uid", "1.2.3.2"]) == 0
    assert nib.load(tmp_path / "b.nii.gz").shape == (512, 512, 8)


def test_single_slice_and_empty_folder_are_refused(tmp_path):
    (tmp_path / "one").mkdir()
    shutil.copy(by_position(EXAMPLE)[0], tmp_path / "one" / "x.dcm")
    with pytest.raises(SeriesError, match="fewer than 2 slices"):
        read_series(tmp_path / "one")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match="no DICOM files"):
        read_series(tmp_path / "none")
    assert issubclass(SeriesError, VolumeError)


# --- lungmask: header-stripped files -------------------------------------------------------
def test_lungmask_slices_are_one_image_twice():
    a, b = (pydicom.dcmread(LUNG / f) for f in ("0.dcm", "1.dcm"))
    assert a.PixelData == b.PixelData and a.ImagePositionPatient != b.ImagePositionPatient
    with pytest.raises(SeriesError, match="identical pixel data"):
        read_series(LUNG)


def test_header_stripped_series_reads_like_simpleitk(tmp_path):
    # The same files with the second image shifted by 3 rows: a valid 2-slice series without
    # Modality, signed int16 with -2048 outside the field of view, IPP (0, 0, z).
    folder = copy_series(LUNG, tmp_path / "s")
    ds = pydicom.dcmread(folder / "1.dcm")
    ds.PixelData = np.roll(ds.pixel_array, 3, axis=0).tobytes()
    ds.save_as(folder / "1.dcm")
    vol = read_series(folder)
    ref = sitk_series(folder)
    assert vol.meta["modality"] is None and vol.data.dtype == np.int16
    assert vol.data.min() == -2048  # kept as stored: the reader does not clip
    np.testing.assert_array_equal(vol.data, sitk_ijk(ref))
    np.testing.assert_allclose(vol.affine, sitk_affine_ras(ref), atol=1e-4)
    np.testing.assert_allclose(vol.spacing, [0.625, 0.625, 1.0])


# --- CT-RATE metadata row -----------------------------------------------------------------
def test_metadata_row(example):
    row = metadata_row(EXAMPLE, "train_1_a_1.nii.gz")
    assert list(row) == list(METADATA_COLUMNS)
    assert row["VolumeName"] == "train_1_a_1.nii.gz"
    assert row["ImagePositionPatient"] == "[-249.51171875, -437.51171875, -804.5]"  # first sorted slice
    assert row["ImageOrientationPatient"] == "[1, 0, 0, 0, 1, 0]"
    assert row["XYSpacing"] == "[0.9765625, 0.9765625]"
    assert row["ZSpacing"] == 2.0 and row["SliceThickness"] == 3.0 and row["NumberofSlices"] == 20
    assert row["RescaleIntercept"] == -1024.0 and row["RescaleSlope"] == 1.0 and row["RescaleType"] == "HU"
    assert row["Manufacturer"] == "SIEMENS" and row["ConvolutionKernel"] == "['Br38f', '3']"
    assert row["XRayTubeCurrent"] == 615 and row["CTDIvol"] == pytest.approx(18.5418, abs=1e-4)
    assert row["PatientAge"] is None and row["PatientSex"] is None  # empty in the anonymised files
    assert row["RevolutionTime"] is None  # absent tag
    assert row["StudyDate"] == "20221208"
    # From datasets (headers only) the row is the same, and the meta copy only lacks the name.
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in EXAMPLE.iterdir()]
    assert metadata_row(headers, "train_1_a_1.nii.gz") == row
    assert example.meta["metadata_row"] == {**row, "VolumeName": None}
    # The row reproduces the volume's affine through the metadata route, with this reader's axes.
    np.testing.assert_allclose(
        geometry.affine_from_ctrate_row(row, dicom.ARRAY_AXES, slice_direction=1), example.affine, atol=1e-6
    )


def test_metadata_row_patient_age_as_written(tmp_path):
    folder = copy_series(EXAMPLE, tmp_path / "s")
    for path in folder.iterdir():
        edit(path, PatientAge="036Y", PatientSex="F")
    row = metadata_row(folder, "x.nii.gz")
    assert row["PatientAge"] == "036Y" and row["PatientSex"] == "F"


# --- NIfTI round trip -----------------------------------------------------------------------
def test_nifti_round_trip(example_sitk, tmp_path):
    out = tmp_path / "ct.nii.gz"
    vol = dicom_to_nifti(EXAMPLE, out)
    assert [h["op"] for h in vol.meta["history"]] == ["read_dicom", "write_nifti"]
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), sitk_ijk(example_sitk))
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetOrigin(), example_sitk.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), example_sitk.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), example_sitk.GetSpacing(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(example_sitk))


# --- folders of series --------------------------------------------------------------------
@pytest.fixture()
def series_folder(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    copy_series(EXAMPLE, root / "a_good")
    copy_series(EXAMPLE, root / "b_mr")
    edit(by_position(root / "b_mr")[0], Modality="MR")
    copy_series(EXAMPLE, root / "c_gap")
    by_position(root / "c_gap")[5].unlink()
    copy_series(LUNG, root / "d_lungmask")
    (root / "e_empty").mkdir()
    return root


def test_convert_folder_keeps_going_and_rejects(series_folder, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "train_2_a_1.nii.gz").write_bytes(b"stale")  # from an earlier run; b_mr is bad now
    metadata, rejects = convert_folder(series_folder, out)
    assert sorted(p.name for p in out.iterdir()) == ["train_1_a_1.nii.gz"]
    assert list(metadata.columns) == list(METADATA_COLUMNS) and len(metadata) == 1
    assert metadata.loc[0, "VolumeName"] == "train_1_a_1.nii.gz" and metadata.loc[0, "ZSpacing"] == 2.0
    assert list(rejects.columns) == ["VolumeName", "stage", "reason"]
    assert (rejects["stage"] == "dicom").all()
    reasons = dict(zip(rejects["VolumeName"], rejects["reason"]))
    assert list(reasons) == ["train_2_a_1.nii.gz", "train_3_a_1.nii.gz", "train_4_a_1.nii.gz", "train_5_a_1.nii.gz"]
    assert "not CT" in reasons["train_2_a_1.nii.gz"]
    assert "missing slice" in reasons["train_3_a_1.nii.gz"]
    assert "identical pixel data" in reasons["train_4_a_1.nii.gz"]
    assert "no DICOM files" in reasons["train_5_a_1.nii.gz"]
    assert rejects.attrs["source"]["train_2_a_1.nii.gz"].endswith("b_mr")
    assert metadata.attrs["source"]["train_1_a_1.nii.gz"].endswith("a_good")
    vol = nib.load(out / "train_1_a_1.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(vol.dataobj), read_series(EXAMPLE).data)
    # tables round-trip through CSV like CT-RATE's
    metadata.to_csv(tmp_path / "m.csv", index=False)
    assert pd.read_csv(tmp_path / "m.csv").shape == (1, 44)


def test_convert_folder_strict_and_names(series_folder, tmp_path):
    with pytest.raises(SeriesError, match="not CT"):
        convert_folder(series_folder, tmp_path / "strict", strict=True)
    metadata, rejects = convert_folder(series_folder, tmp_path / "named", split="valid",
                                       name_format="{split}_{index}_b_2.nii.gz", start_index=10)
    assert list(metadata["VolumeName"]) == ["valid_10_b_2.nii.gz"]
    assert list(rejects["VolumeName"]) == [f"valid_{i}_b_2.nii.gz" for i in (11, 12, 13, 14)]
    with pytest.raises(ValueError, match="duplicate names"):
        convert_folder(series_folder, tmp_path / "dup", name_format="{split}.nii.gz")
    with pytest.raises(ValueError, match="bare"):
        convert_folder(series_folder, tmp_path / "dup", name_format="../{index}.nii.gz")


def test_a_study_folder_of_several_series_gives_one_reconstruction_each(tmp_path):
    """A study exported whole (two CT series, a scout and a reformat in one folder) was rejected for holding two
    series: each series that could be the volume becomes a reconstruction of the scan (_a_1, _a_2 in SeriesNumber
    order, as CT-RATE names them), read exactly as --series-uid reads it; the scout and the reformat are skipped; a
    bad series is a reject of its own, named by UID, and a series exported twice into one folder counts once."""
    root = tmp_path / "in"
    copy_series(EXAMPLE, root / "a_single")
    study = copy_series(EXAMPLE, root / "b_study")
    files = by_position(study)
    for n, path in enumerate(files):  # the later SeriesNumber on the first 12 slices: it is reconstruction 2
        edit(path, **({"SeriesInstanceUID": "1.2.3.1", "SeriesNumber": 5} if n < 12
                      else {"SeriesInstanceUID": "1.2.3.2", "SeriesNumber": 3}))
    shutil.copy(files[0], study / "scout.dcm")
    edit(study / "scout.dcm", SeriesInstanceUID="1.2.3.7", SeriesNumber=1,
         ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    for k in range(3):  # a multiplanar reformat of the scan: a second view of it, skipped
        shutil.copy(files[k], study / f"mpr{k}.dcm")
        edit(study / f"mpr{k}.dcm", SeriesInstanceUID="1.2.3.8", SeriesNumber=9,
             ImageType=["DERIVED", "SECONDARY", "MPR"])
    twice = copy_series(EXAMPLE, root / "d_twice")  # one series exported twice into one folder: a copy
    for path in by_position(twice)[:5]:  # (another scan than a_single's: its last 15 slices)
        path.unlink()
    for path in by_position(twice):
        shutil.copy(path, twice / f"again_{path.name}")
        edit(twice / f"again_{path.name}", SeriesInstanceUID="1.2.3.6", SeriesNumber=2)
        edit(path, SeriesInstanceUID="1.2.3.5", SeriesNumber=1)
    bad = copy_series(EXAMPLE, root / "c_study")
    for n, path in enumerate(by_position(bad)):
        edit(path, SeriesInstanceUID="1.2.3.3" if n < 10 else "1.2.3.4", SeriesNumber=2 if n < 10 else 4)
    by_position(bad)[4].unlink()  # a gap in its first series (SeriesNumber 2): that reconstruction alone is rejected
    out = tmp_path / "out"
    metadata, rejects = convert_folder(root, out, workers=2)  # a worker converts a folder's series, in order
    assert list(metadata["VolumeName"]) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_2_a_2.nii.gz",
                                            "train_3_a_2.nii.gz", "train_4_a_1.nii.gz"]
    assert list(rejects["VolumeName"]) == ["train_3_a_1.nii.gz", "train_4_a_2.nii.gz"]
    assert re.match(r"series 1\.2\.3\.3: .*missing slice", rejects.loc[0, "reason"]), rejects.loc[0, "reason"]
    assert rejects.loc[1, "reason"] == ("series 1.2.3.6: the same voxels and geometry as train_4_a_1.nii.gz of this "
                                        "folder: a copy of that series would count the scan twice")
    assert rejects.attrs["uids"]["train_3_a_1.nii.gz"][0] == "1.2.3.3"  # sources.csv names a rejected one's UID
    whole = read_series(EXAMPLE).data
    for name, expected in (("train_2_a_1", whole[..., 12:]), ("train_2_a_2", whole[..., :12]),
                           ("train_3_a_2", whole[..., 10:])):
        np.testing.assert_array_equal(np.asanyarray(nib.load(out / f"{name}.nii.gz").dataobj), expected)
    assert metadata.attrs["uids"]["train_2_a_2.nii.gz"][0] == "1.2.3.1"
    assert metadata.attrs["source"]["train_2_a_2.nii.gz"] == str(study)
    assert sorted(p.name for p in out.iterdir()) == sorted(metadata["VolumeName"])
    # a name format without {recon} cannot name two: the folder is rejected, its series named, as before
    metadata, rejects = convert_folder(root, tmp_path / "one", name_format="{split}_{index}_a_1.nii.gz")
    assert list(metadata["VolumeName"]) == ["train_1_a_1.nii.gz"]
    assert list(rejects["VolumeName"]) == ["train_2_a_1.nii.gz", "train_3_a_1.nii.gz", "train_4_a_1.nii.gz"]
    assert re.search(r"4 series: 1\.2\.3\.1 \(CT, 12 files\); 1\.2\.3\.2 \(CT, 8 files\); 1\.2\.3\.7 .*localizer"
                     r".*1\.2\.3\.8 \(CT, 3 files, a reformat \(ImageType MPR\)\).*has no \{recon\} field",
                     rejects.loc[0, "reason"]), rejects.loc[0, "reason"]


def test_a_study_folders_reconstructions_in_series_order_and_its_headers_read_once(tmp_path, monkeypatch):
    """Series numbered alike (an export that renumbers) take their series time, then their UID by its numbers
    ("1.2.3.10" after "1.2.3.9", which text order reverses); and each file's header is read once for the whole
    folder (it was read once to find the series and once more for each of them)."""
    root = tmp_path / "in"
    study = copy_series(EXAMPLE, root / "study")
    files = by_position(study)
    for n, path in enumerate(files):  # thirds: ".10" at 09:00, ".9" at 08:00 and ".11" at 08:00, all number 2
        uid, time = ("1.2.3.10", "090000") if n < 7 else ("1.2.3.9", "080000") if n < 14 else ("1.2.3.11", "080000")
        edit(path, SeriesInstanceUID=uid, SeriesNumber=2, SeriesDate="20240102", SeriesTime=time)
    reads = []
    real = dicom._dcmread
    monkeypatch.setattr(dicom, "_dcmread", lambda path, **kw: reads.append((Path(path).name, kw)) or real(path, **kw))
    metadata, rejects = convert_folder(root, tmp_path / "out")
    assert rejects.empty and list(metadata.attrs["uids"][n][0] for n in metadata["VolumeName"]) == \
        ["1.2.3.9", "1.2.3.11", "1.2.3.10"]
    headers = [name for name, kw in reads if kw.get("stop_before_pixels")]
    assert sorted(headers) == sorted(p.name for p in files)  # each once
    assert dicom._KEPT_SCANS.get() is None  # nothing kept after the folder
    reads.clear()
    read_series(study, series_uid="1.2.3.9")  # outside a folder's conversion: scanned afresh
    assert len([name for name, kw in reads if kw.get("stop_before_pixels")]) == len(files)


def test_the_series_order_is_total_for_odd_uids_and_series_numbers():
    """UIDs an export mangled (empty, letters, empty components, a Latin-1 byte read as "²", a digit int() refuses)
    and a SeriesNumber of "inf" (pydicom's IS overflows) order without an error: one bad header stopped the whole
    conversion."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def header(number: bytes | None):
        ds = pydicom.Dataset()
        if number is not None:
            ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", len(number), number, 0, True, True)
        return [("x.dcm", None, ds)]

    uids = ["1.2.10", "1.2.9", "", "1.2.a", "1..2", "1.2.\u00b3", "1.2.9.0"]
    order = sorted(uids, key=lambda uid: dicom._series_order(uid, header(b"2 ")))
    assert order.index("1.2.9") < order.index("1.2.9.0") < order.index("1.2.10")
    assert dicom._series_order("1.2", header(b"inf "))[0] == float("inf")
    assert dicom._series_order("1.2", header(b"3 ")) < dicom._series_order("1.1", header(None))


def test_convert_folder_in_worker_processes_gives_the_same_tables_and_files(series_folder, tmp_path):
    """A hospital archive of thousands of series converted on one thread took hours: workers convert series side by
    side, and the results are taken in name order, so tables, names, rejects and bytes do not depend on them."""
    copy_series(EXAMPLE, series_folder / "f_copy")  # a copy of a_good: rejected whichever worker finishes first
    serial = convert_folder(series_folder, tmp_path / "serial")
    parallel = convert_folder(series_folder, tmp_path / "parallel", workers=3)
    for one, other in zip(serial, parallel):
        pd.testing.assert_frame_equal(one, other)
        assert one.attrs == other.attrs
    assert "train_6_a_1.nii.gz" in set(parallel[1]["VolumeName"])
    files = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "parallel").iterdir()) == ["train_1_a_1.nii.gz"]
    assert ((tmp_path / "serial" / files[0]).read_bytes() == (tmp_path / "parallel" / files[0]).read_bytes())
    with pytest.raises(SeriesError, match="not CT"):  # strict: the first bad series in name order
        convert_folder(series_folder, tmp_path / "strict", strict=True, workers=3)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unexpected_error_in_a_series_names_its_folder(tmp_path, monkeypatch, workers):
    """An error the reader did not expect stops the run naming the folder, in a worker too: an exception that does
    not pickle (its __init__ takes two arguments) broke the whole pool, and the message and the folder were lost."""
    import ctprep.dicom as dicom

    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}:{b}")

    real = dicom.dicom_to_nifti

    def failing(folder, out, **kw):
        if Path(folder).name == "b":
            raise Odd(1, 2)
        return real(folder, out, **kw)

    monkeypatch.setattr(dicom, "dicom_to_nifti", failing)  # the workers are forked: they see it too
    for name in ("a", "b"):
        copy_series(EXAMPLE, tmp_path / "in" / name)
    with pytest.raises(RuntimeError, match=r"in/b: Odd: 1:2"):
        convert_folder(tmp_path / "in", tmp_path / "out", workers=workers)


def test_a_copied_series_is_rejected_and_every_name_traces_to_its_folder(tmp_path):
    """The same series in two folders became two volumes (a scan counted twice, or in both splits); and a name
    (the folder's sorted position) could not be traced back to its series once the archive grew: the rule writes
    sources.csv, the folder and UIDs of every name."""
    from ctprep.dicom import convert_folder_to_outputs

    root = tmp_path / "in"
    copy_series(EXAMPLE, root / "a_scan")
    copy_series(EXAMPLE, root / "b_copy")
    copy_series(EXAMPLE, root / "c_mr")
    edit(by_position(root / "c_mr")[0], Modality="MR")
    out = tmp_path / "volumes"
    metadata = convert_folder_to_outputs(root, out, tmp_path / "metadata.csv", tmp_path / "rejects.parquet",
                                         sources_csv=tmp_path / "sources.csv")
    assert list(metadata["VolumeName"]) == ["train_1_a_1.nii.gz"]
    assert sorted(p.name for p in out.iterdir()) == ["train_1_a_1.nii.gz"]  # the copy's file is not left behind
    rejects = pd.read_parquet(tmp_path / "rejects.parquet").set_index("VolumeName")["reason"]
    first = pydicom.dcmread(by_position(root / "a_scan")[0], stop_before_pixels=True)
    # by content: this anonymised series has blank UIDs (a re-export would have new ones)
    assert rejects["train_2_a_1.nii.gz"] == (f"the same voxels and geometry as {root / 'a_scan'}: a copy of that "
                                             "series would count the scan twice")
    sources = pd.read_csv(tmp_path / "sources.csv", dtype=str)
    assert list(sources["VolumeName"]) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    assert list(sources["status"]) == ["converted", "rejected", "rejected"]
    assert [Path(f).name for f in sources["folder"]] == ["a_scan", "b_copy", "c_mr"]
    assert first.SeriesInstanceUID == "" and sources.loc[0, ["SeriesInstanceUID", "StudyInstanceUID"]].isna().all()
    # a series with UIDs has them in the table; one refused before it was read has none
    for path in by_position(root / "a_scan"):
        edit(path, SeriesInstanceUID="1.2.826.0.1.3680043.8.498.1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.2")
    convert_folder_to_outputs(root, tmp_path / "v2", tmp_path / "m2.csv", tmp_path / "r2.parquet",
                              sources_csv=tmp_path / "s2.csv")
    again = pd.read_csv(tmp_path / "s2.csv", dtype=str)
    assert list(again.loc[0, ["SeriesInstanceUID", "StudyInstanceUID"]]) == ["1.2.826.0.1.3680043.8.498.1",
                                                                            "1.2.826.0.1.3680043.8.498.2"]
    assert again.loc[2, ["SeriesInstanceUID", "StudyInstanceUID"]].isna().all()
