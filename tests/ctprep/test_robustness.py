"""Robustness of ctprep on the variety of scanners, files and report wording that real data brings.

Every input is synthetic, built in ``tmp_path``: small DICOM series (pydicom), NIfTI files (nibabel) and
report sentences written for these tests. Geometry and HU are checked against independent readers
(SimpleITK's ImageSeriesReader for DICOM, nibabel for NIfTI) or against the pixels the test wrote;
refusals must be a :class:`~ctprep.volume.VolumeError` with a one-line reason, so that they land in
the rejects table while the rest goes on.
"""

from __future__ import annotations

import shutil
import struct

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from ctprep.cli import main as ctprep_main
from ctprep.dicom import SeriesError, convert_folder, read_series
from ctprep.geometry import reorient
from ctprep.reports import parse_report
from ctprep.reports.sections import split_sections
from ctprep.volume import VolumeError, load_nifti, lps_to_ras

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# --- synthetic DICOM ------------------------------------------------------------------------
def ct_slice(pixels, ipp, iop=AXIAL, spacing=(0.7, 0.8), series_uid="1.2.826.0.1.1", slope=1, intercept=-1024,
             signed=True, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), number=1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality, ds.ImageType, ds.InstanceNumber = "CT", list(image_type), number
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID = series_uid, "1.2.826.0.1", "anon"
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write_series(folder, n=6, iop=AXIAL, step=(0.0, 0.0, 2.5), origin=(-10.0, -20.0, 30.0), seed=0, names=None,
                 shape=(8, 10), **tags):
    """``n`` slices at ``origin + k * step`` (LPS mm); returns the stored pixels, (n, rows, columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 2000, size=(n, *shape))
    for k in range(n):
        ds = ct_slice(pixels[k], np.asarray(origin) + k * np.asarray(step), iop=iop, number=k + 1, **tags)
        ds.save_as(folder / (names[k] if names else f"IM{k:04d}.dcm"), enforce_file_format=True)
    return pixels


def sitk_series(folder):
    """SimpleITK's (GDCM's) reading: (i, j, k) voxels and the voxel-to-RAS affine."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), lps_to_ras(lps)


def assert_like_simpleitk(folder, vol=None):
    vol = read_series(folder) if vol is None else vol
    data, affine = sitk_series(folder)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    return vol


def expected_hu(pixels, slope=1, intercept=-1024):
    """What the test wrote, as HU in ctprep's (column, row, slice) axes."""
    return (pixels.astype(np.float64) * slope + intercept).transpose(2, 1, 0)


def _oblique_iop():
    c, s, t = np.cos(0.3), np.sin(0.3), 0.2
    return (c, s, 0.0, -s * np.cos(t), c * np.cos(t), np.sin(t))


def _normal(iop):
    return np.cross(iop[:3], iop[3:])


def _strip_preamble(path):
    """The data set alone: no 128-byte preamble, no "DICM", no file meta (implicit VR little endian)."""
    ds = pydicom.dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    path.write_bytes(buf.getvalue())


def _rle(path):
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path)


SERIES = {  # name -> write_series arguments, and an edit of the written files
    "random-file-order": (dict(names=["z.dcm", "a.dcm", "m7.dcm", "c", "IM9", "b.dcm"]), None),
    "descending-positions": (dict(step=(0.0, 0.0, -2.5)), None),
    "oblique": (dict(iop=_oblique_iop(), step=tuple(2.5 * _normal(_oblique_iop()))), None),
    "coronal": (dict(iop=(1, 0, 0, 0, 0, -1), step=(0.0, 2.0, 0.0)), None),
    "slope-2.5-unsigned": (dict(slope=2.5, intercept=-1000, signed=False), None),
    "slope-2-signed": (dict(slope=2, intercept=-1024), None),
    "no-rescale-tags": (dict(slope=None, intercept=None), None),
    "rle-lossless": ({}, _rle),
    "no-preamble": ({}, _strip_preamble),
}


@pytest.mark.parametrize("case", list(SERIES))
def test_synthetic_series_read_like_simpleitk(tmp_path, case):
    kwargs, edit = SERIES[case]
    folder = tmp_path / case
    pixels = write_series(folder, **kwargs)
    if edit is not None:
        for path in folder.iterdir():
            edit(path)
    vol = assert_like_simpleitk(folder)
    slope = kwargs.get("slope", 1) or 1
    intercept = kwargs.get("intercept", -1024) if "intercept" in kwargs else -1024
    order = slice(None, None, -1) if kwargs.get("step", (0, 0, 1))[2] < 0 else slice(None)
    np.testing.assert_array_equal(vol.data, expected_hu(pixels[order], slope, intercept or 0))
    assert vol.data.dtype == (np.float32 if case == "slope-2.5-unsigned" else np.int16)
    assert vol.meta["slice_step_mm"] == pytest.approx(2.0 if case == "coronal" else 2.5)
    assert vol.meta["slice_tilt_deg"] == pytest.approx(0, abs=1e-3)


def test_negative_stored_values_and_hu_beyond_int16(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "signed").mkdir()
    for k in range(4):
        ct_slice(rng.integers(-2000, 2000, (8, 10)), (0, 0, 2.0 * k), intercept=0).save_as(
            tmp_path / "signed" / f"{k}.dcm", enforce_file_format=True)
    assert assert_like_simpleitk(tmp_path / "signed").data.min() < -1024
    # unsigned 60000 with intercept -1024 is 58976 HU: kept exactly (float32), not wrapped into int16
    (tmp_path / "unsigned").mkdir()
    for k in range(3):
        pixels = np.full((8, 10), 60000)
        pixels[0, 0] = k
        ct_slice(pixels, (0, 0, 2.0 * k), signed=False).save_as(tmp_path / "unsigned" / f"{k}.dcm",
                                                                 enforce_file_format=True)
    vol = assert_like_simpleitk(tmp_path / "unsigned")
    assert vol.data.dtype == np.float32 and vol.data.max() == 58976


def test_gantry_tilt_affine_hits_every_slice_position(tmp_path):
    # SimpleITK puts slices along the normal; the truth is ImagePositionPatient, which a sheared affine keeps
    pixels = write_series(tmp_path / "tilt", step=(0.0, 0.6, 2.5))
    vol = read_series(tmp_path / "tilt")
    np.testing.assert_array_equal(vol.data, expected_hu(pixels))
    for k in range(6):
        x, y, z = np.array([-10.0, -20.0, 30.0]) + k * np.array([0.0, 0.6, 2.5])
        np.testing.assert_allclose(vol.affine @ [3, 5, k, 1], [-(x + 3 * 0.8), -(y + 5 * 0.7), z, 1], atol=1e-6)
    assert vol.meta["slice_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.6 / 2.5)), abs=1e-3)


def test_non_dicom_files_beside_the_series_are_ignored(tmp_path):
    folder = tmp_path / "s"
    write_series(folder)
    (folder / "notes.txt").write_text("DICM, but only text")
    (folder / "DICOMDIR").write_bytes(b"\0" * 200)
    (folder / "thumbs.db").write_bytes(bytes(range(256)) * 4)
    (folder / "raw.bin").write_bytes(b"\x08\x00" + bytes(range(256)))  # starts like a data set, is none
    (folder / "empty").write_bytes(b"")
    assert_like_simpleitk(folder, read_series(folder))


def test_an_empty_or_cut_short_dcm_file_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    """A file named .dcm that is empty or cut inside its preamble (a failed copy) was skipped at DEBUG level,
    unseen; it is still skipped (the rest of the series reads), now with a warning. Other files stay quiet."""
    folder = tmp_path / "s"
    pixels = write_series(folder)
    (folder / "IM0098.dcm").write_bytes(b"")
    (folder / "IM0099.DCM").write_bytes((folder / "IM0002.dcm").read_bytes()[:100])
    (folder / "notes.txt").write_text("no image")
    with caplog.at_level("WARNING", logger="ctprep.dicom"):
        vol = read_series(folder)
    np.testing.assert_array_equal(vol.data, expected_hu(pixels))
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("IM0098.dcm" in m and "(0 bytes)" in m for m in warned)
    assert any("IM0099.DCM" in m and "(100 bytes)" in m for m in warned)
    assert not any("notes.txt" in m for m in warned)


def test_file_meta_without_preamble_is_read(tmp_path):
    folder = tmp_path / "s"
    pixels = write_series(folder)
    for path in folder.iterdir():
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        path.write_bytes(raw[132:])  # the file meta group first, without preamble and prefix
    np.testing.assert_array_equal(read_series(folder).data, expected_hu(pixels))


def test_localizer_inside_the_series_is_skipped(tmp_path, caplog):
    folder = tmp_path / "s"
    pixels = write_series(folder)
    ct_slice(np.zeros((8, 10)), (0, 0, 0), iop=(1, 0, 0, 0, 0, -1),
             image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")).save_as(folder / "scout.dcm", enforce_file_format=True)
    with caplog.at_level("WARNING", logger="ctprep.dicom"):
        vol = read_series(folder)
    assert "scout.dcm" in caplog.text
    np.testing.assert_array_equal(vol.data, expected_hu(pixels))
    (folder / "scout.dcm").unlink()
    np.testing.assert_allclose(vol.affine, sitk_series(folder)[1], atol=1e-4)


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "s"
    write_series(folder, series_uid="1.2.826.0.1.1")
    second = write_series(folder, series_uid="1.2.826.0.1.2", names=[f"B{k}.dcm" for k in range(6)], seed=3)
    with pytest.raises(SeriesError, match=r"folder holds 2 series: .*a folder of its own \(or pick one: ctprep dicom2nifti --series-uid UID\)"):
        read_series(folder)
    np.testing.assert_array_equal(read_series(folder, series_uid="1.2.826.0.1.2").data, expected_hu(second))


def test_gaps_duplicates_and_irregular_steps_are_refused_with_a_reason(tmp_path):
    pixels = write_series(tmp_path / "gap")
    (tmp_path / "gap" / "IM0003.dcm").unlink()
    with pytest.raises(SeriesError, match=r"missing slice\(s\) between positions 35\.000 and 40\.000 mm"):
        read_series(tmp_path / "gap")
    vol = read_series(tmp_path / "gap", allow_gaps=True)
    np.testing.assert_array_equal(vol.data, expected_hu(pixels[[0, 1, 2, 4, 5]]))
    assert vol.meta["gaps"][0]["missing"] == 1 and vol.meta["slice_step_mm"] == pytest.approx(2.5)

    write_series(tmp_path / "dup")
    shutil.copy(tmp_path / "dup" / "IM0002.dcm", tmp_path / "dup" / "IM0002 copy.dcm")
    with pytest.raises(SeriesError, match="duplicate slice position 35.000 mm"):
        read_series(tmp_path / "dup")

    write_series(tmp_path / "irregular")
    ds = pydicom.dcmread(tmp_path / "irregular" / "IM0003.dcm")
    ds.ImagePositionPatient = [-10.0, -20.0, 38.2]
    ds.save_as(tmp_path / "irregular" / "IM0003.dcm")
    with pytest.raises(SeriesError, match="non-uniform slice spacing: step of 3.200 mm"):
        read_series(tmp_path / "irregular")


def test_convert_folder_rejects_broken_series_and_goes_on(tmp_path):
    root = tmp_path / "in"
    good = write_series(root / "a_good")
    raw = write_series(root / "b_no_preamble", seed=5)
    for path in (root / "b_no_preamble").iterdir():
        _strip_preamble(path)
    write_series(root / "c_two_series", series_uid="1.1", seed=7)
    write_series(root / "c_two_series", series_uid="1.2", names=[f"B{k}.dcm" for k in range(6)], seed=7)
    write_series(root / "d_bad_header")
    path = root / "d_bad_header" / "IM0002.dcm"
    path.write_bytes(path.read_bytes()[:-20])  # cut inside the pixel data
    (root / "e_text_only").mkdir()
    (root / "e_text_only" / "readme.txt").write_text("no images")
    metadata, rejects = convert_folder(root, tmp_path / "out")
    # two series in one folder: a reconstruction each, here the same pixels and geometry, so the second is a copy
    assert list(metadata["VolumeName"]) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    for name, pixels in (("train_1_a_1.nii.gz", good), ("train_2_a_1.nii.gz", raw)):
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "out" / name).dataobj), expected_hu(pixels))
    reasons = dict(zip(rejects["VolumeName"], rejects["reason"]))
    assert sorted(reasons) == ["train_3_a_2.nii.gz", "train_4_a_1.nii.gz", "train_5_a_1.nii.gz"]
    assert reasons["train_3_a_2.nii.gz"].startswith("series 1.2: the same voxels and geometry as train_3_a_1.nii.gz")
    assert "cannot decode pixel data of IM0002.dcm" in reasons["train_4_a_1.nii.gz"]
    assert "no DICOM files" in reasons["train_5_a_1.nii.gz"]
    assert all("\n" not in r for r in reasons.values())


def test_cli_reports_a_bad_series_in_one_line(tmp_path, capsys):
    write_series(tmp_path / "s", series_uid="1.1")
    write_series(tmp_path / "s", series_uid="1.2", names=[f"B{k}.dcm" for k in range(6)])
    assert ctprep_main(["dicom2nifti", str(tmp_path / "s"), str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ctprep: error: folder holds 2 series") and "Traceback" not in "".join(err)
    assert ctprep_main(["dicom2nifti", str(tmp_path / "missing"), str(tmp_path / "x.nii.gz")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"not a folder: {tmp_path / 'missing'}")


def _damage_vr(path, keyword):
    """One damaged byte in a header: the VR of ``keyword``'s element (explicit VR) no longer names a VR.

    pydicom reads the file and converts the element only when it is first read."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    raw = bytearray(path.read_bytes())
    at = raw.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + pydicom.datadict.dictionary_VR(tag).encode())
    raw[at + 5] ^= 0xFF  # "DS" -> "D\xac"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("keyword", "file"), [
    ("PixelSpacing", "IM0003.dcm"),  # geometry, read from every slice
    ("RescaleSlope", "IM0003.dcm"),  # read again beside the pixels
    ("SliceThickness", "IM0000.dcm"),  # the first slice's tags fill the metadata row
    ("MediaStorageSOPClassUID", "IM0003.dcm"),  # file meta
])
def test_a_damaged_header_element_rejects_its_series_and_the_folder_goes_on(tmp_path, capsys, keyword, file):
    """A corrupted VR byte raised NotImplementedError from deep inside the checks (pydicom parses values lazily)
    and ended the whole folder conversion with a traceback; now the series is refused as an unreadable file."""
    root = tmp_path / "in"
    good = write_series(root / "a_good")
    write_series(root / "b_damaged", seed=1)
    last = write_series(root / "c_good", seed=2)
    _damage_vr(root / "b_damaged" / file, keyword)
    metadata, rejects = convert_folder(root, tmp_path / "out")
    assert list(metadata["VolumeName"]) == ["train_1_a_1.nii.gz", "train_3_a_1.nii.gz"]
    for name, pixels in (("train_1_a_1.nii.gz", good), ("train_3_a_1.nii.gz", last)):
        np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "out" / name).dataobj), expected_hu(pixels))
    assert list(rejects["VolumeName"]) == ["train_2_a_1.nii.gz"]
    reason = rejects["reason"][0]
    assert reason.startswith(f"unreadable DICOM file {file}: Unknown Value Representation") and "\n" not in reason
    assert ctprep_main(["dicom2nifti", str(root / "b_damaged"), str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ctprep: error: unreadable DICOM file {file}") and "Traceback" not in "".join(err)


def test_a_damaged_element_that_is_never_read_is_not_parsed(tmp_path):
    """Only the tags the pipeline reads are converted up front (converting every element of a header costs ~3 ms
    a file, 5x reading it): a damaged tag no step reads, outside the first slice, leaves the series readable."""
    pixels = write_series(tmp_path / "s")
    _damage_vr(tmp_path / "s" / "IM0003.dcm", "SliceThickness")
    np.testing.assert_array_equal(read_series(tmp_path / "s").data, expected_hu(pixels))


@pytest.mark.parametrize("keyword", ["PixelSpacing", "RescaleSlope"])
def test_a_damaged_element_of_a_skipped_file_refuses_nothing(tmp_path, keyword):
    """A scout of its own series beside the CT series is skipped: its damaged geometry or rescale tag refused the
    whole series once every file's tags were converted before the series was chosen."""
    pixels = write_series(tmp_path / "s")
    ct_slice(np.zeros((8, 10)), (0, 0, 0), iop=(1, 0, 0, 0, 0, -1), series_uid="9.9.9",
             image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")).save_as(tmp_path / "s" / "scout.dcm",
                                                                      enforce_file_format=True)
    _damage_vr(tmp_path / "s" / "scout.dcm", keyword)
    np.testing.assert_array_equal(read_series(tmp_path / "s").data, expected_hu(pixels))
    _damage_vr(tmp_path / "s" / "IM0002.dcm", keyword)  # in the series read: refused, naming the file
    with pytest.raises(SeriesError, match="unreadable DICOM file IM0002.dcm"):
        read_series(tmp_path / "s")


# --- NIfTI ------------------------------------------------------------------------------------
AFFINE = np.array([[-0.7, 0, 0, 100], [0, -0.8, 0, 120], [0, 0, 2.5, -50], [0, 0, 0, 1.0]])
ROT = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])


def _nifti(case, data):
    shifted = AFFINE.copy()
    shifted[:3, 3] += 10
    oblique = AFFINE.copy()
    oblique[:3, :3] = ROT @ AFFINE[:3, :3]
    if case == "nifti2":
        return nib.Nifti2Image(data, AFFINE)
    if case == "big-endian":
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(np.int16)
        return nib.Nifti1Image(data, AFFINE, header)
    img = nib.Nifti1Image({"4d-singleton": data[..., None], "float32": data.astype(np.float32) + 0.25,
                           "uint16": (data + 1024).astype(np.uint16)}.get(case, data),
                          oblique if case == "oblique" else None if case in ("sform-only", "qform-only", "disagree",
                                                                                 "no-codes") else AFFINE)
    if case == "sform-only":
        img.set_sform(AFFINE, 1)
        img.set_qform(None, 0)
    elif case == "qform-only":
        img.set_sform(None, 0)
        img.set_qform(AFFINE, 1)
    elif case == "disagree":  # nibabel (and the NIfTI standard's advice) takes the sform
        img.set_sform(shifted, 2)
        img.set_qform(AFFINE, 1)
    elif case == "no-codes":
        img.set_sform(None, 0)
        img.set_qform(None, 0)
    elif case == "scaled":
        img.header.set_slope_inter(0.5, -1000.25)
    elif case == "nan-scaling":  # NaN slope means "no scaling"
        img.header["scl_slope"], img.header["scl_inter"] = np.nan, np.nan
    return img


NIFTI_CASES = ["sform-only", "qform-only", "disagree", "no-codes", "scaled", "nan-scaling", "4d-singleton", "float32",
               "uint16", "oblique", "big-endian", "nifti2"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("case", NIFTI_CASES)
def test_nifti_variants_read_like_nibabel(tmp_path, case, suffix):
    data = np.random.default_rng(0).integers(-1024, 1500, (6, 7, 5)).astype(np.int16)
    path = tmp_path / f"ct{suffix}"
    nib.save(_nifti(case, data), path)
    vol = load_nifti(path)
    ref = nib.load(path)
    expected = np.asarray(ref.dataobj)
    np.testing.assert_array_equal(vol.data, expected[..., 0] if expected.ndim == 4 else expected)
    assert vol.data.dtype == expected.dtype
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    assert vol.meta["header_sform_code"] == int(ref.header["sform_code"])


@pytest.mark.parametrize("affine", [
    AFFINE,  # LPS-ordered (the DICOM way)
    np.array([[0, 0, -2.5, 0], [0.7, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 0, 1.0]]),  # permuted and flipped axes
    np.diag([0.7, 0.8, -2.5, 1.0]),  # slices head to feet
])
def test_reorient_matches_nibabel_canonical(tmp_path, affine):
    nib.save(nib.Nifti1Image(np.arange(210, dtype=np.int16).reshape(6, 7, 5), affine), tmp_path / "ct.nii.gz")
    vol = reorient(load_nifti(tmp_path / "ct.nii.gz"))
    ref = nib.as_closest_canonical(nib.load(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(vol.data, np.asarray(ref.dataobj))
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert vol.orientation == ("R", "A", "S")


def test_unusable_nifti_files_are_refused_with_a_reason(tmp_path):
    data = np.zeros((6, 7, 5), np.int16)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), AFFINE), tmp_path / "4d.nii.gz")
    nib.save(nib.Nifti1Image(data[..., 0], AFFINE), tmp_path / "2d.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(b"hello")
    (tmp_path / "zeros.nii").write_bytes(b"\0" * 400)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "cut.nii")
    (tmp_path / "cut.nii").write_bytes((tmp_path / "cut.nii").read_bytes()[:500])
    for name, reason in [("4d.nii.gz", "expected a 3D volume"), ("2d.nii.gz", "expected a 3D volume"),
                         ("text.nii.gz", "unreadable NIfTI"), ("zeros.nii", "unreadable NIfTI"),
                         ("cut.nii", "truncated NIfTI"), ("absent.nii.gz", "file not found")]:
        with pytest.raises(VolumeError, match=reason):
            load_nifti(tmp_path / name)


# --- reports ----------------------------------------------------------------------------------
EFFUSION = "Pleural effusion"


@pytest.mark.parametrize(("text", "label", "value"), [
    ("No evidence of pleural effusion.", EFFUSION, 0),
    ("Pleural effusion is not seen.", EFFUSION, 0),
    ("Pleural effusion has not been seen.", EFFUSION, 0),
    ("Negative for pleural effusion.", EFFUSION, 0),
    ("NO PLEURAL EFFUSION.", EFFUSION, 0),
    ("The lungs are clear without consolidation, effusion or pneumothorax.", EFFUSION, 0),
    ("There is no pleural or pericardial effusion.", "Pericardial effusion", 0),
    ("Cannot exclude a small pleural effusion.", EFFUSION, 1),
    ("Pleural effusion cannot be excluded.", EFFUSION, 1),
    ("Tiny right pleural effusion cannot be ruled out.", EFFUSION, 1),
    ("Possible small effusion on the left.", EFFUSION, 1),
    ("Pleural effusion? ", EFFUSION, 1),
    ("The previously noted pleural effusion has resolved.", EFFUSION, 0),
    ("Previously noted right pleural effusion is no longer seen.", EFFUSION, 0),
    ("Pleural effusion, which was present on the prior study, has resolved.", EFFUSION, 0),
    ("Interval resolution of the left pleural effusion.", EFFUSION, 0),
    ("Left pleural effusion has decreased in size.", EFFUSION, 1),
    ("Right pleural effusion is again seen.", EFFUSION, 1),
    ("SMALL LEFT PLEURAL EFFUSION.", EFFUSION, 1),
    ("Small Left Pleural Effusion.", EFFUSION, 1),
    ("Small pleural effusion\u00a0on the left.", EFFUSION, 1),
    ("Haemothorax on the right.", EFFUSION, 1),  # British spelling
    ("Dependent changes, likely atelectasis, no consolidation.", "Atelectasis", 1),
    ("Dependent changes, likely atelectasis, no consolidation.", "Consolidation", 0),
    ("Consolidation is seen, no effusion.", "Consolidation", 1),
    ("Mediastinal lymphadenopathy is not identified.", "Lymphadenopathy", 0),
    ("Hiatus hernia.", "Hiatal hernia", 1),
    # templated reports: the colon ended the negation's scope, so these read as present
    ("Pleural effusion: none.", EFFUSION, 0),
    ("Pleural effusion: absent.", EFFUSION, 0),
    ("Pleural effusion - none.", EFFUSION, 0),
    ("Pericardial effusion: none. Pleural effusion: small, left.", EFFUSION, 1),
    ("Small pleural effusion, pneumothorax: none.", EFFUSION, 1),  # the value answers its own item only
    ("Pleural effusion: no change.", EFFUSION, 1),
    # probable negation (NegEx): unlikely is read as absent, not as a hedge
    ("Pleural effusion is unlikely.", EFFUSION, 0),
    ("Consolidation unlikely.", "Consolidation", 0),
    ("A small effusion is considered unlikely.", EFFUSION, 0),
    ("Pleural effusion is not likely.", EFFUSION, 0),
    ("Atelectasis is likely; pleural effusion unlikely.", "Atelectasis", 1),
])
def test_negation_uncertainty_and_wording(text, label, value):
    for report in (text, {"findings": text}, {"Impressions_EN": text}):
        assert parse_report(report).labels[label] == value, report


@pytest.mark.parametrize("text", [
    "FINDINGS: Small left pleural effusion.\nIMPRESSION: Left pleural effusion.",
    "Findings: Small left pleural effusion. Impression: Left pleural effusion.",
    "FINDINGS\nSmall left pleural effusion.\n\nIMPRESSION\nLeft pleural effusion.",
    "Findings - Small left pleural effusion.\nImpression - Left pleural effusion.",
    "Findings \u2014 Small left pleural effusion.\nImpression \u2013 Left pleural effusion.",
    "Findings -\nSmall left pleural effusion.\nImpression -\nLeft pleural effusion.",
    "Findings.\nSmall left pleural effusion.\nImpression.\nLeft pleural effusion.",
    "Report: Small left pleural effusion.\nConclusion: Left pleural effusion.",
])
def test_header_forms(text):
    sections = split_sections(text)
    assert sections["findings"] == "Small left pleural effusion."
    assert sections["impression"] == "Left pleural effusion."
    parsed = parse_report(text)
    assert [m.section for m in parsed.mentions] == ["findings", "impression"] and parsed.labels[EFFUSION] == 1


@pytest.mark.parametrize("text", [
    "COMPARISON: CT of 2019, which showed a right pleural effusion.\nFINDINGS: No pleural effusion.",
    "Comparison: prior CT with pleural effusion\nFindings: The lungs are clear, no effusion.\nImpression: Normal.",
])
def test_the_comparison_section_sets_no_label(text):
    sections = split_sections(text)
    assert "2019" in sections["technique"] or "prior CT" in sections["technique"]
    assert parse_report(text).labels[EFFUSION] == 0


def test_comparison_in_prose_is_not_a_header():
    text = "The examination was evaluated in comparison with the previous CT. Right pleural effusion."
    assert split_sections(text)["findings"].startswith("The examination")
    assert parse_report(text).labels[EFFUSION] == 1


def test_missing_headers_and_empty_reports():
    assert split_sections("Small left pleural effusion. No pneumothorax.")["findings"].startswith("Small left")
    assert split_sections("IMPRESSION: Emphysema.") == {"clinical_information": "", "technique": "", "findings": "",
                                                        "impression": "Emphysema."}
    assert parse_report("IMPRESSION: Emphysema.").labels["Emphysema"] == 1
    for empty in ("", "   \n\n ", "Findings:\n\nImpression:\n", None, {}):
        parsed = parse_report(empty)
        assert parsed.mentions == [] and not any(parsed.labels.values())
    # the indication is why the scan was made, not what it shows
    assert parse_report("Clinical history: ?effusion.\nFindings: Lungs clear.").labels[EFFUSION] == 0


def test_non_ascii_reports():
    for text in ("Fındıngs: Plevral efüzyon yok. Sonuç: normal.", "Befund: Kein Pleuraerguss.", "肺结节 ??? ...",
                 "Pleural effusion \u2014 left side \u2265 2 cm; \u00b5m \u2018quoted\u2019 text \ufeff\u200b."):
        parsed = parse_report(text)
        assert set(parsed.labels) and all(v in (0, 1) for v in parsed.labels.values())
    assert parse_report("Bilateral pleural effusion\u00a0\u2014 moderate.").labels[EFFUSION] == 1


# --- review mends: spacing drift, tilted NIfTI, spatial units, integer clipping ---------------------
@pytest.mark.parametrize("steps", [np.r_[np.full(20, 1.0), np.full(20, 1.015)], np.linspace(0.985, 1.015, 40)],
                         ids=["step-changes-once", "steps-drift"])
def test_slices_that_drift_from_the_uniform_grid_are_refused(tmp_path, steps):
    """Every step within the per-step tolerance of the median, yet slices up to 0.15 mm off the grid the affine
    describes: refused naming the slice, not placed where they are not."""
    z = np.r_[0.0, np.cumsum(steps)] + 30.0
    pixels = np.random.default_rng(0).integers(0, 2000, size=(len(z), 8, 10))
    (tmp_path / "s").mkdir()
    for k, zk in enumerate(z):
        ct_slice(pixels[k], (-10.0, -20.0, zk), number=k + 1).save_as(tmp_path / "s" / f"IM{k:04d}.dcm",
                                                                     enforce_file_format=True)
    with pytest.raises(SeriesError, match=r"non-uniform slice spacing: IM\d+\.dcm lies 0\.\d+ mm from where"):
        read_series(tmp_path / "s")


def test_a_tilted_series_as_nifti_keeps_its_shear_in_the_sform_only(tmp_path):
    """The qform cannot hold a gantry tilt's shear: written there, ITK tools would read the slices 1-2 mm off
    each (nibabel drops the shear). The NIfTI holds it in the sform alone; ITK then refuses the file."""
    from ctprep.dicom import dicom_to_nifti

    write_series(tmp_path / "tilt", step=(0.0, 0.6, 2.5))
    out = tmp_path / "tilt.nii.gz"
    dicom_to_nifti(tmp_path / "tilt", out)
    img = nib.load(out)
    assert int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 1
    vol = read_series(tmp_path / "tilt")
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    np.testing.assert_allclose(load_nifti(out).affine, vol.affine, atol=1e-5)
    with pytest.raises(RuntimeError):
        sitk.ReadImage(str(out))
    # an upright series keeps both, as before
    write_series(tmp_path / "upright")
    dicom_to_nifti(tmp_path / "upright", tmp_path / "upright.nii.gz")
    img = nib.load(tmp_path / "upright.nii.gz")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


@pytest.mark.parametrize("decimals", [2, 1])
def test_an_oblique_series_with_rounded_positions_is_no_tilt_and_itk_reads_its_nifti(tmp_path, decimals):
    """Positions written to 0.01 or 0.1 mm, as scanners write them, put an oblique series' measured step a tiny angle
    off the normal: it was kept as a shear (no qform, ITK refused the NIfTI) and 6-decimal cosines, unit to ~1e-6
    only, reported ~0.06 deg of tilt. Within the rounding the step is taken on the normal; a small real tilt
    (0.02 mm sideways a slice, 0.9 deg) is still one."""
    from ctprep.dicom import dicom_to_nifti
    from ctprep.volume import is_sheared

    c, s = np.cos(0.3), np.sin(0.3)
    iop = (1.0, 0.0, 0.0, 0.0, round(c, 6), round(-s, 6))
    normal = np.cross(iop[:3], iop[3:])
    for name, sideways in (("upright", 0.0), ("tilted", 0.02)):
        folder = tmp_path / name
        folder.mkdir()
        pixels = np.random.default_rng(0).integers(0, 2000, size=(20, 8, 10))
        ipps = [np.round(np.array([-200.0, -150.0, 100.0]) + k * (1.25 * normal + [0.0, sideways, 0.0]), decimals)
                for k in range(20)]
        for k, ipp in enumerate(ipps):
            ct_slice(pixels[k], ipp, iop=iop, number=k + 1).save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
        vol = dicom_to_nifti(folder, tmp_path / f"{name}.nii.gz")
        for k, ipp in enumerate(ipps):  # every slice where its header puts it, within the rounding
            assert np.linalg.norm((vol.affine @ [0, 0, k, 1])[:3] - ipp * [-1, -1, 1]) <= 1.5 * 10.0 ** -decimals
        if name == "tilted":
            assert is_sheared(vol.affine)
            assert vol.meta["slice_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.02 * c / 1.25)), abs=0.05)
            continue
        assert not is_sheared(vol.affine) and vol.meta["slice_tilt_deg"] == 0
        assert vol.meta["slice_step_mm"] == pytest.approx(1.25, abs=10.0 ** -decimals / 19)
        assert int(nib.load(tmp_path / f"{name}.nii.gz").header["qform_code"]) == 1
        img = sitk.ReadImage(str(tmp_path / f"{name}.nii.gz"))  # refused before ("orthonormal direction cosines")
        lps = np.eye(4)
        lps[:3, :3] = np.reshape(img.GetDirection(), (3, 3)) * np.asarray(img.GetSpacing())
        lps[:3, 3] = img.GetOrigin()
        np.testing.assert_allclose(lps_to_ras(lps), vol.affine, atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), expected_hu(pixels))


@pytest.mark.parametrize("unit", ["meter", "micron", "mm", "unknown"])
def test_nifti_spatial_units_are_read_in_mm_like_simpleitk(tmp_path, unit):
    scale = {"meter": 1e-3, "micron": 1e3, "mm": 1.0, "unknown": 1.0}[unit]
    affine = np.diag([0.7 * scale, 0.8 * scale, 2.5 * scale, 1.0])
    affine[:3, 3] = np.array([-100.0, -120.0, 40.0]) * scale
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    img.header.set_xyzt_units(unit, "sec")
    nib.save(img, tmp_path / "u.nii.gz")
    vol = load_nifti(tmp_path / "u.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "u.nii.gz"))
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.8, 2.5], rtol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 3], [-100.0, -120.0, 40.0], rtol=1e-5)


def test_clip_hu_takes_float_bounds_on_integer_hu():
    from ctprep.intensity import clip_hu
    from ctprep.volume import Volume

    vol = Volume.from_3d(np.array([-3000, -1000, 0, 999, 1000, 3000], np.int16).reshape(1, 2, 3), np.eye(4))
    out = clip_hu(vol, -1000.0, 999.5)
    assert out.data.dtype == np.int16 and out.data.ravel().tolist() == [-1000, -1000, 0, 999, 999, 999]


def test_a_qform_and_sform_that_disagree_are_said(tmp_path, caplog):
    s_affine = np.diag([0.7, 0.8, 2.5, 1.0])
    q_affine = s_affine.copy()
    q_affine[:3, 3] = [5.0, 0.0, 0.0]  # 5 mm apart
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), s_affine)
    img.header.set_sform(s_affine, code=2)
    img.header.set_qform(q_affine, code=1)
    nib.save(img, tmp_path / "two.nii.gz")
    with caplog.at_level("WARNING"):
        vol = load_nifti(tmp_path / "two.nii.gz")
    np.testing.assert_allclose(vol.affine, s_affine)
    assert "qform and sform place the volume up to 5.0 mm apart" in caplog.text
    caplog.clear()
    img.header.set_qform(s_affine, code=1)
    nib.save(img, tmp_path / "one.nii.gz")
    with caplog.at_level("WARNING"):
        load_nifti(tmp_path / "one.nii.gz")
    assert "qform and sform" not in caplog.text


def test_a_2d_nifti_is_refused_as_such_with_both_transforms_set(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5), np.int16), np.diag([0.7, 0.8, 1.0, 1.0]))
    img.header.set_sform(np.diag([0.7, 0.8, 1.0, 1.0]), code=1)
    nib.save(img, tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        load_nifti(tmp_path / "flat.nii.gz")


def test_odd_nifti_headers_are_prepared_or_rejected_without_ending_the_chunk(tmp_path, caplog):
    """prep_chunk catches VolumeError alone, and headers nibabel reads fine raised other types and ended the whole
    chunk job: an undefined time code in xyzt_units (KeyError from nibabel's get_xyzt_units), a qform quaternion
    that is not unit beside the sform that is read (ValueError from get_qform), srow values of 1e30 (ValueError
    from nibabel's orientation). The first two are read (their space is plain), the third lands in the rejects."""
    import pandas as pd

    from ctprep.chunks import prep_chunk

    data = np.random.default_rng(0).integers(-1000, 1000, size=(20, 18, 16)).astype(np.int16)
    edits = {"good": {}, "time_code_56": {"xyzt_units": 2 | 56}, "space_code_7": {"xyzt_units": 7},
             "quaternion": {"quatern_b": 1.5}, "srow_1e30": {"srow_x": [-0.7, 1e30, 0.0, 100.0]}}
    rows = []
    for n, (name, edit) in enumerate(edits.items(), start=1):
        header = nib.Nifti1Image(data, AFFINE).header
        header.set_qform(AFFINE, 1)
        header.set_sform(AFFINE, 1)
        for field, value in edit.items():
            header[field] = value
        nib.Nifti1Image(data, None, header).to_filename(tmp_path / f"{name}.nii.gz")  # the header as edited
        assert nib.load(tmp_path / f"{name}.nii.gz").shape == data.shape  # nibabel reads each
        rows.append({"VolumeName": f"train_{n}_a_1.nii.gz", "split": "train", "chunk": 0,
                     "path": str(tmp_path / f"{name}.nii.gz")})
    pd.DataFrame(rows).to_parquet(tmp_path / "cohort.parquet")
    preset = {"mode": "spacing", "spacing": [2.0, 2.0, 4.0], "shape": [16, 16, 12], "clip": [-1000, 1000]}
    with caplog.at_level("WARNING"):
        table = prep_chunk(tmp_path / "cohort.parquet", 0, preset, {"geometry": "header"}, tmp_path / "prep",
                           tmp_path / "prep.parquet", tmp_path / "rejects.parquet")
    assert list(table["VolumeName"]) == [f"train_{n}_a_1.nii.gz" for n in (1, 2, 3, 4)]
    rejects = pd.read_parquet(tmp_path / "rejects.parquet")
    assert list(rejects["VolumeName"]) == ["train_5_a_1.nii.gz"]
    assert rejects["reason"][0].startswith("no orientation can be read from the affine of srow_1e30.nii.gz")
    assert "undefined spatial unit code 7" in caplog.text and "its qform is unreadable" in caplog.text
    for name in ("time_code_56", "space_code_7", "quaternion"):  # read as nibabel and ITK read them, in mm
        vol = load_nifti(tmp_path / f"{name}.nii.gz")
        np.testing.assert_allclose(vol.affine, AFFINE)
        np.testing.assert_allclose(vol.spacing, sitk.ReadImage(str(tmp_path / f"{name}.nii.gz")).GetSpacing())


@pytest.mark.parametrize("trailing", [(1,), (1, 1), (1, 1, 1)])
def test_trailing_singleton_dimensions_are_dropped_like_simpleitk(tmp_path, trailing):
    """A 3D volume stored with empty 4th to 6th dimensions, (x, y, z, 1, 1) as some ITK writers give, was refused
    from the 5th on; nibabel and SimpleITK read it as the 3D volume it is. More than one time point still is."""
    data = np.random.default_rng(0).integers(-1000, 1000, size=(6, 7, 5)).astype(np.int16)
    nib.save(nib.Nifti1Image(data.reshape(data.shape + trailing), AFFINE), tmp_path / "ct.nii.gz")
    vol = load_nifti(tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz"))).T, data)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1).reshape(data.shape + (2,) + trailing), AFFINE),
             tmp_path / "4d.nii.gz")
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        load_nifti(tmp_path / "4d.nii.gz")
