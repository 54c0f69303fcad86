"""Synthetic-CT export: NIfTI + sidecar and a DICOM series, read back by independent readers.

Every DICOM series is read by SimpleITK's ImageSeriesReader (GDCM), by ctprep's strict reader
and ``dicom_to_nifti``, and tag by tag by pydicom; voxels must match the NIfTI that nibabel
reads exactly and geometry to 1e-4 mm. Affines are non-identity, anisotropic, flipped,
permuted and (one) oblique, so a swapped or dropped axis cannot pass.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from ctgen.data.layout import from_model_layout, to_model_layout
from ctgen.export.dicom import DISPLAY_AXES
from ctgen.export import (
    ExportConfig,
    save_synthetic_dicom,
    save_synthetic_nifti,
)
from ctprep.dicom import dicom_to_nifti, read_series
from ctprep.geometry import reorient
from ctprep.volume import Volume, load_nifti

TOL_MM = 1e-4
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # the test's own RAS <-> LPS flip, independent of the code under test
SIDECAR = {
    "prompt": "Bilateral ground-glass opacities. No pleural effusion.",
    "seed": 1234,
    "settings": {"guidance_scale": 5.0, "steps": 18, "slices": 7},
    "checkpoint_hashes": {"ctvit": "a" * 64, "maskgit": "b" * 64},
    "config_hash": "c" * 16,
    "code_version": "0.1.0+test",
}


def _rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix about ``axis``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _affine(kind: str) -> np.ndarray:
    """Voxel-to-RAS affines: columns are the i, j, k steps (mm), anisotropic throughout."""
    a = np.eye(4)
    a[:3, 3] = [120.3, -95.1, -310.7]
    if kind == "canonical":  # RAS, k along the DICOM normal
        a[:3, :3] = np.diag([0.75, 0.9, 2.0])
    elif kind == "flipped":  # LAS: det < 0, so readers sort k the other way
        a[:3, :3] = np.diag([-0.7, 0.8, 2.5])
    elif kind == "permuted":  # coronal slices: i -> L, j -> S, k -> P (non-axial stack)
        a[:3, :3] = np.array([[-0.8, 0, 0], [0, 0, -3.0], [0, 1.1, 0]])
    elif kind == "oblique":  # flipped anisotropic grid rotated by 7 degrees about a skew axis
        a[:3, :3] = _rotation([0.3, -0.5, 1.0], 7.0) @ np.diag([0.75, -0.9, 2.0])
    else:
        raise ValueError(kind)
    return a


def _volume(kind: str, shape=(12, 9, 7), seed: int = 0) -> Volume:
    """Random whole-HU volume (distinct slices) that hits both int16 clip ends."""
    rng = np.random.default_rng(seed)
    data = rng.integers(-1024, 3072, size=shape).astype(np.int16)
    data[0, 0, 0], data[-1, -1, -1] = -1024, 3071
    return Volume.from_3d(data, _affine(kind), source="test")


def _sitk_volume(series_dir) -> Volume:
    """SimpleITK's (GDCM's) reading of a series, as a RAS volume with array axes (x, y, z)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    img = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return Volume.from_3d(sitk.GetArrayFromImage(img).transpose(2, 1, 0), LPS @ lps)


def _assert_same(read: Volume, ref: Volume, who: str) -> None:
    """Same voxels at the same places: reorient ``read`` to ``ref``'s axes, then exact HU and 1e-4 mm."""
    read = reorient(read, ref.orientation)
    assert read.shape == ref.shape, who
    np.testing.assert_array_equal(read.data, ref.data, err_msg=who)
    np.testing.assert_allclose(read.affine, ref.affine, atol=TOL_MM, rtol=0, err_msg=who)


def _nibabel_volume(path) -> tuple[Volume, nib.Nifti1Image]:
    img = nib.load(str(path))
    return Volume.from_3d(np.asanyarray(img.dataobj), img.affine), img


# --- layout -------------------------------------------------------------------------------
def test_from_model_layout_inverts_to_model_layout():
    vol = _volume("oblique", shape=(5, 4, 3))
    x = to_model_layout(vol.data)  # (1, D=3, H=4, W=5)
    assert x.shape == (1, 3, 4, 5)
    back = from_model_layout(x, vol.affine, prompt="p")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.meta["prompt"] == "p" and back.meta["history"][-1]["op"] == "from_model_layout"
    # torch input (float, as a generator emits) and several channels
    t = torch.from_numpy(np.stack([x[0], x[0] * 2]).astype(np.float32))  # (C=2, D, H, W)
    two = from_model_layout(t, vol.affine)
    assert two.array.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(two.array[1], vol.data * 2)
    with pytest.raises(ValueError, match="C, D, H, W"):
        from_model_layout(x[0], vol.affine)


# --- NIfTI --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_nifti_geometry_markers_and_sidecar(tmp_path, kind):
    vol = _volume(kind)
    nii, side = save_synthetic_nifti(vol, tmp_path / "scan_001.nii.gz", SIDECAR)
    assert nii == tmp_path / "scan_001.nii.gz" and side == tmp_path / "scan_001.json"
    read, img = _nibabel_volume(nii)
    hdr = img.header
    assert img.get_data_dtype() == np.int16
    assert np.isnan(hdr["scl_slope"]) or hdr["scl_slope"] in (0, 1)  # no scaling: stored value = HU
    np.testing.assert_array_equal(read.data, vol.data)
    np.testing.assert_allclose(img.get_sform(), vol.affine, atol=TOL_MM, rtol=0)
    np.testing.assert_allclose(img.get_qform(), vol.affine, atol=TOL_MM, rtol=0)
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1  # scanner
    assert hdr.get_xyzt_units()[0] == "mm"
    descrip = hdr["descrip"].item().decode()
    assert descrip.startswith("SYNTHETIC ctgen") and "not a real patient" in descrip

    content = json.loads(side.read_text())
    assert {k: content[k] for k in SIDECAR} == SIDECAR  # what was passed, unchanged
    assert content["synthetic"] is True
    geo = content["geometry"]
    assert geo["shape"] == list(img.shape) and geo["space"] == "RAS"
    np.testing.assert_allclose(geo["spacing"], hdr.get_zooms(), atol=TOL_MM)
    np.testing.assert_allclose(geo["origin"], img.affine[:3, 3], atol=TOL_MM)
    np.testing.assert_allclose(geo["affine"], img.get_sform(), atol=TOL_MM)
    assert geo["orientation"] == "".join(nib.aff2axcodes(img.affine))
    assert content["export"]["n_clipped"] == 0 and content["export"]["file"] == "scan_001.nii.gz"


def test_nifti_rounds_and_clips_to_the_given_range(tmp_path):
    data = np.linspace(-1500.0, 1500.0, 5 * 4 * 3).reshape(5, 4, 3)
    data[0, 0, 0], data[1, 0, 0], data[2, 0, 0] = 10.6, -20.4, np.nan
    vol = Volume.from_3d(data.astype(np.float32), _affine("canonical"))
    config = ExportConfig(hu_range=(-1000, 1000), descrip="SYNTHETIC test {version}")
    nii, side = save_synthetic_nifti(vol, tmp_path / "c.nii", SIDECAR, config=config)
    read, img = _nibabel_volume(nii)
    assert read.data.dtype == np.int16
    assert read.data.min() == -1000 and read.data.max() == 1000
    assert read.data[0, 0, 0] == 11 and read.data[1, 0, 0] == -20 and read.data[2, 0, 0] == -1000  # NaN -> floor
    expected = int((np.abs(np.rint(data[np.isfinite(data)])) > 1000).sum()) + 1
    assert json.loads(side.read_text())["export"]["n_clipped"] == expected
    assert json.loads(side.read_text())["export"]["hu_range"] == [-1000, 1000]
    assert img.header["descrip"].item().decode().startswith("SYNTHETIC test 0")
    with pytest.raises(ValueError, match="hu_range"):
        ExportConfig(hu_range=(0, 40000))


def test_sidecar_refuses_reserved_and_unserialisable_values(tmp_path):
    vol = _volume("canonical", shape=(3, 3, 2))
    with pytest.raises(ValueError, match="reserved"):
        save_synthetic_nifti(vol, tmp_path / "a.nii.gz", {**SIDECAR, "synthetic": False})
    with pytest.raises(TypeError, match="not JSON"):
        save_synthetic_nifti(vol, tmp_path / "b.nii.gz", {"prompt": "x", "bad": object()})
    assert not (tmp_path / "b.nii.gz").exists()  # no NIfTI without its sidecar
    nii, side = save_synthetic_nifti(vol, tmp_path / "n.nii.gz", {"seed": np.int64(3), "w": np.ones(2)})
    assert json.loads(side.read_text())["seed"] == 3


# --- DICOM read-back ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["canonical", "flipped", "permuted", "oblique", "real"])
def test_dicom_reads_back_as_the_nifti(tmp_path, data_dir, kind):
    if kind == "real":  # a real chest CT (30 slices, 3 mm, RAS)
        vol = load_nifti(data_dir / "example_ct_sm.nii.gz")
    else:
        vol = _volume(kind)
    nii, _ = save_synthetic_nifti(vol, tmp_path / "s.nii.gz", SIDECAR)
    files = save_synthetic_dicom(vol, tmp_path / "dcm", SIDECAR)
    # axial slices (the display axes) whatever the volume's axis order: a permuted volume's k is not its slices
    assert len(files) == reorient(vol, DISPLAY_AXES).shape[2] and all(f.parent == tmp_path / "dcm" for f in files)
    ref, _ = _nibabel_volume(nii)

    _assert_same(_sitk_volume(tmp_path / "dcm"), ref, "SimpleITK")
    _assert_same(read_series(tmp_path / "dcm"), ref, "ctprep.read_series")
    dicom_to_nifti(tmp_path / "dcm", tmp_path / "back.nii.gz")
    _assert_same(_nibabel_volume(tmp_path / "back.nii.gz")[0], ref, "ctprep.dicom_to_nifti + nibabel")

    # pydicom, file by file in k order: pixels, positions and cosines from the test's own LPS maths, on the
    # series' display axes (columns to the patient's left, rows to posterior, slices upward) whatever the volume's
    ref = reorient(ref, DISPLAY_AXES)
    lps = LPS @ ref.affine
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, ref.data[:, :, k].T)
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   lps[:3, 3] + k * lps[:3, 2], atol=TOL_MM, rtol=0)
        assert ds.InstanceNumber == k + 1
    iop = [float(v) for v in ds.ImageOrientationPatient]
    np.testing.assert_allclose(iop[:3], lps[:3, 0] / np.linalg.norm(lps[:3, 0]), atol=1e-6)
    np.testing.assert_allclose(iop[3:], lps[:3, 1] / np.linalg.norm(lps[:3, 1]), atol=1e-6)
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], ref.spacing[[1, 0]], atol=TOL_MM)
    assert float(ds.SliceThickness) == pytest.approx(ref.spacing[2], abs=TOL_MM)
    assert float(ds.SpacingBetweenSlices) == pytest.approx(ref.spacing[2], abs=TOL_MM)
    assert (ds.Rows, ds.Columns) == (ref.shape[1], ref.shape[0])
    if kind != "oblique":  # as scanners write axial CT: a viewer drawing the pixels as stored shows it the right way
        assert iop == [1, 0, 0, 0, 1, 0]
        assert float(pydicom.dcmread(files[0]).SliceLocation) < float(ds.SliceLocation)  # instance 1 lowest


def test_dicom_tags_mark_synthetic_and_carry_provenance(tmp_path):
    vol = _volume("flipped")
    long_prompt = "Consolidation in the right lower lobe. " * 400  # ~15,600 characters, over LT's 10,240
    config = ExportConfig(windows=(("MEDIASTINUM", 50.0, 350.0),), patient_id="SYNTH-42")
    files = save_synthetic_dicom(vol, tmp_path / "d", {**SIDECAR, "prompt": long_prompt},
                                 series_description="SYNTHETIC my series", patient_name="SYNTHETIC^TEST",
                                 config=config)
    today = dt.date.today().strftime("%Y%m%d")
    series = [pydicom.dcmread(f) for f in files]
    for ds in series:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and ds.Modality == "CT"
        assert ds.SeriesDescription == "SYNTHETIC my series" and str(ds.PatientName) == "SYNTHETIC^TEST"
        assert ds.PatientID == "SYNTH-42"
        assert ds.PatientIdentityRemoved == "YES" and "synthetic" in ds.DeidentificationMethod
        assert ds.BurnedInAnnotation == "NO"
        assert "PatientPosition" in ds and ds.PatientPosition == ""  # Type 2C: present, claiming nothing
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (50.0, 350.0)
        assert ds.StudyDate == today and ds.SeriesDate == today
        assert len(ds.ImageComments) == 10240 and ds.ImageComments.startswith("SYNTHETIC (ctgen)")
        assert "Consolidation in the right lower lobe." in ds.ImageComments
    private = json.loads(series[0][0x0011, 0x1010].value)  # the sidecar, in a private tag
    assert private["seed"] == SIDECAR["seed"] and private["synthetic"] is True
    assert private["geometry"]["shape"] == list(vol.shape)
    # slice locations follow the normal, upward from the first slice (the flipped grid's k ran against it: the series
    # is written on its display axes)
    locs = [float(ds.SliceLocation) for ds in series]
    assert np.allclose(np.diff(locs), 2.5, atol=TOL_MM)

    # UIDs: one study/series/frame per call, one SOP instance per file, all fresh on the next call
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[key].value for ds in series}) == 1
    sops = {ds.SOPInstanceUID for ds in series}
    assert len(sops) == len(files)
    again = [pydicom.dcmread(f, stop_before_pixels=True) for f in save_synthetic_dicom(vol, tmp_path / "e", SIDECAR)]
    assert not sops & {ds.SOPInstanceUID for ds in again}
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert again[0][key].value != series[0][key].value
    # the defaults say synthetic too, with both windows (lung first)
    assert "SYNTHETIC" in again[0].SeriesDescription and str(again[0].PatientName) == "SYNTHETIC^CTGEN"
    assert list(again[0].WindowCenterWidthExplanation) == ["LUNG", "MEDIASTINUM"]
    assert again[0].ImageComments == f"SYNTHETIC (ctgen) from prompt: {SIDECAR['prompt']}"


def test_dicom_stores_the_whole_int16_range_signed(tmp_path):
    vol = _volume("canonical", shape=(4, 3, 2))
    data = vol.data.copy()
    data[0, 0, 0], data[1, 0, 0] = -2048, 4095
    vol = vol.new_like(data[None])
    files = save_synthetic_dicom(vol, tmp_path / "d", SIDECAR, config=ExportConfig(hu_range=(-2048, 4095)))
    first = pydicom.dcmread(files[0]).pixel_array  # (rows: posterior, columns: to the left) of the RAS array
    assert first.dtype == np.int16 and first[-1, -1] == -2048 and first[-1, -2] == 4095
    clipped = save_synthetic_dicom(vol, tmp_path / "c", SIDECAR)  # default range: -1024 .. 3071
    px = pydicom.dcmread(clipped[0]).pixel_array
    assert px[-1, -1] == -1024 and px[-1, -2] == 3071


def test_dicom_refuses_sheared_grids_and_foreign_folders(tmp_path):
    vol = _volume("canonical", shape=(4, 3, 2))
    sheared = vol.affine.copy()
    sheared[0, 1] = 0.2  # j leans towards i: in-plane shear
    with pytest.raises(ValueError, match="not orthogonal"):
        save_synthetic_dicom(Volume(vol.array, sheared), tmp_path / "x", SIDECAR)
    tilted = vol.affine.copy()
    tilted[1, 2] = 0.3  # k leans off the normal: gantry tilt
    with pytest.raises(ValueError, match="off the slice normal"):
        save_synthetic_dicom(Volume(vol.array, tilted), tmp_path / "x", SIDECAR)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))

    first = save_synthetic_dicom(vol, tmp_path / "d", SIDECAR)
    uid_first = pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(FileExistsError, match="not empty"):
        save_synthetic_dicom(vol, tmp_path / "d", SIDECAR)
    second = save_synthetic_dicom(vol, tmp_path / "d", SIDECAR, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [p.name for p in second]
    assert read_series(tmp_path / "d").meta["series_uid"] == pydicom.dcmread(second[0]).SeriesInstanceUID != uid_first
    (tmp_path / "d" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="other than"):
        save_synthetic_dicom(vol, tmp_path / "d", SIDECAR, overwrite=True)
    assert (tmp_path / "d" / "notes.txt").exists() and len(first) == 2
    assert len(list((tmp_path / "d").glob("*.dcm"))) == 2  # the series is left as it was


def test_latent_samples_name_their_report_in_the_dicom_and_a_nifti_converts_with_its_sidecar(tmp_path):
    from ctgen.export import dicom_from_nifti
    from ctgen.export.sidecar import sidecar_path

    vol = _volume("flipped")
    latent = {k: v for k, v in SIDECAR.items() if k != "prompt"}
    latent["report"] = {"findings": "Right pleural effusion.", "impression": ""}
    nifti, _ = save_synthetic_nifti(vol, tmp_path / "s.nii.gz", latent)
    files = dicom_from_nifti(nifti, tmp_path / "d")
    ds = pydicom.dcmread(files[0])
    assert ds.ImageComments == "SYNTHETIC (ctgen) from prompt: Findings: Right pleural effusion."
    assert json.loads(ds[0x0011, 0x1010].value)["seed"] == SIDECAR["seed"]
    _assert_same(read_series(tmp_path / "d"), _nibabel_volume(nifti)[0], "ctprep.read_series")
    sidecar_path(nifti).write_text('{"seed": 3,')  # a hand edit cut short: the sidecar named
    with pytest.raises(ValueError, match=r"s.json is not valid sample sidecar"):
        dicom_from_nifti(nifti, tmp_path / "d2")


def test_a_sheared_volumes_sidecar_says_the_qform_it_has(tmp_path):
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[1, 2] = 0.6  # a gantry tilt: k steps along y as well
    vol = Volume.from_3d(np.zeros((4, 5, 6), np.int16), affine)
    nifti, side = save_synthetic_nifti(vol, tmp_path / "t.nii.gz", SIDECAR)
    header = nib.load(nifti).header
    recorded = json.loads(side.read_text())["export"]
    assert (recorded["qform_code"], recorded["sform_code"]) == (int(header["qform_code"]), int(header["sform_code"]))
    assert recorded["qform_code"] == 0



def test_a_rerun_into_the_same_folder_removes_the_last_runs_volumes(tmp_path, caplog):
    """Seeds 11 then 20 into one folder: the first run's volumes, sidecars and DICOM series go with its manifest
    (a folder-based evaluation would have scored them beside the new ones), and the log says so (a user who split
    a prompts file into runs into one folder would lose them unawares); files it did not write stay."""
    from ctgen.export.samples import write_samples

    def generate(request, seed):
        return _volume("flipped"), dict(SIDECAR, seed=seed), request

    out, dicom = tmp_path / "s", tmp_path / "dicom"
    write_samples([("p0", "effusion")], generate, out, seed=11, dicom_dir=dicom)
    (out / "notes.txt").write_text("mine")
    assert (out / "p0_s11.nii.gz").is_file() and (dicom / "p0_s11").is_dir()
    (out / "samples.csv").unlink()  # Snakemake removes a job's declared output (the manifest) before a rerun
    with caplog.at_level("WARNING", logger="ctgen.export.samples"):
        write_samples([("p0", "effusion")], generate, out, seed=20, dicom_dir=dicom)
    assert f"removed 1 volume(s) an earlier run wrote into {out}" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [".ctgen-written.txt", "notes.txt", "p0_s20.json",
                                                     "p0_s20.nii.gz", "samples.csv"]
    assert sorted(p.name for p in dicom.iterdir()) == ["p0_s20"]

    def dies_after_one(request, seed):
        if seed > 30:
            raise MemoryError("killed")
        return generate(request, seed)

    with pytest.raises(MemoryError):  # a run killed part-way (out of memory, out of time) ...
        write_samples([("p0", "a"), ("p1", "b")], dies_after_one, out, seed=30)
    write_samples([("p0", "effusion")], generate, out, seed=40)  # ... has its volume removed by the next run
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".gz") == ["p0_s40.nii.gz"]


def test_a_killed_sampling_run_resumes_keeping_what_it_wrote(tmp_path):
    """Killed after two of four volumes (a Slurm time limit), the rerun samples the other two only; another seed or
    identity (weights, settings, code) samples again, and what the earlier run wrote but this one does not is removed
    once this run is complete."""
    from ctgen.export.samples import WRITTEN, write_samples

    calls = []
    identity = {"weights_sha256": {"generator": "abc"}, "settings": {"steps": 2}}

    def generate(request, seed):
        calls.append(seed)
        if len(calls) == 3 and seed == 12:  # the third volume of the first attempt: killed
            raise MemoryError("killed")
        return _volume("canonical", shape=(4, 3, 2), seed=seed), dict(SIDECAR, seed=seed), request

    out, dicom = tmp_path / "s", tmp_path / "d"
    requests = [(f"p{i}", f"prompt {i}") for i in range(4)]
    with pytest.raises(MemoryError):
        write_samples(requests, generate, out, seed=10, dicom_dir=dicom, identity=identity)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert sorted(first) == ["p0_s10.nii.gz", "p1_s11.nii.gz"]
    calls.clear()
    manifest = write_samples(requests, generate, out, seed=10, dicom_dir=dicom, identity=identity)
    assert calls == [12, 13] and list(manifest["seed"]) == [10, 11, 12, 13]  # the first two kept as they were
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first
    assert list(manifest["prompt"]) == [f"prompt {i}" for i in range(4)] and len(list(dicom.iterdir())) == 4
    assert len((out / WRITTEN).read_text().splitlines()) == 12  # nifti, sidecar, dicom of each: this run's alone
    # another identity: nothing kept; fewer requests: the rest of the earlier run removed at the end
    calls.clear()
    write_samples(requests[:2], generate, out, seed=10, dicom_dir=dicom, identity={**identity, "settings": {"steps": 3}})
    assert calls == [10, 11]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p0_s10.nii.gz", "p1_s11.nii.gz"]
    assert sorted(p.name for p in dicom.iterdir()) == ["p0_s10", "p1_s11"]
    # the super-resolution batch size decides the speed, not the voxels: lowered after an out-of-memory, all kept
    from ctgen.export.samples import sample_identity

    fields = {"settings": {"steps": 3, "sr_batch_size": 64}, "seed": 1, "provenance": {"seed": 1, "torch": "2"}}
    smaller = {**fields, "settings": {"steps": 3, "sr_batch_size": 4}}
    assert sample_identity(fields) == sample_identity(smaller) == {"settings": {"steps": 3},
                                                                   "provenance": {"torch": "2"}}
    assert sample_identity(fields) != sample_identity({**fields, "settings": {"steps": 4, "sr_batch_size": 64}})
    # the same request under another seed is another volume
    calls.clear()
    write_samples(requests[:1], generate, out, seed=20, identity={**identity, "settings": {"steps": 3}})
    assert calls == [20] and sorted(p.name for p in out.glob("*.nii.gz")) == ["p0_s20.nii.gz"]


def test_a_resumed_run_keeps_only_its_own_complete_files(tmp_path, monkeypatch):
    """A volume is kept only at this run's own paths, whole, with the DICOM folder this run asks for."""
    from ctgen.export.samples import write_samples

    calls = []

    def generate(request, seed):
        calls.append(seed)
        return _volume("canonical", shape=(4, 3, 2), seed=seed), dict(SIDECAR, seed=seed), request

    requests, identity = [("p0", "a"), ("p1", "b")], {"weights_sha256": {"generator": "abc"}}
    for run in ("A", "B"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        write_samples(requests, generate, Path("out"), seed=0, dicom_dir=Path("dicom_a"), identity=identity)
    # from another working directory, the same folder: kept, under this run's spelling of its paths
    monkeypatch.chdir(tmp_path / "B")
    calls.clear()
    manifest = write_samples(requests, generate, tmp_path / "A" / "out", seed=0, dicom_dir=tmp_path / "A" / "dicom_a",
                             identity=identity)
    assert calls == [] and all(Path(p).is_relative_to(tmp_path / "A") for p in manifest["nifti"])
    assert (tmp_path / "A" / "out" / "p0_s0.nii.gz").is_file() and (tmp_path / "B" / "out" / "p0_s0.nii.gz").is_file()
    # another DICOM folder: sampled again, written there
    calls.clear()
    manifest = write_samples(requests, generate, tmp_path / "A" / "out", seed=0, dicom_dir=tmp_path / "A" / "dicom_b",
                             identity=identity)
    assert calls == [0, 1] and all("dicom_b" in p for p in manifest["dicom"])
    # a NIfTI damaged outside ctgen (a partial copy): sampled again
    nifti = tmp_path / "A" / "out" / "p1_s1.nii.gz"
    nifti.write_bytes(nifti.read_bytes()[:100])
    calls.clear()
    write_samples(requests, generate, tmp_path / "A" / "out", seed=0, dicom_dir=tmp_path / "A" / "dicom_b",
                  identity=identity)
    assert calls == [1] and nifti.stat().st_size > 100


def test_each_series_names_its_case_in_a_worklist(tmp_path):
    """Every synthetic series had one SeriesDescription and an empty StudyID, so a PACS worklist of a run showed
    rows that could not be told apart: both name ``<id>_s<seed>``, StudyID within its 16 characters."""
    from ctgen.export.samples import write_samples

    def generate(request, seed):
        return _volume("canonical", shape=(4, 3, 2)), dict(SIDECAR, seed=seed), request

    long = ["patient_from_site_one_a", "patient_from_site_one_b"]
    write_samples([("p0", "x"), *((pid, "x") for pid in long)], generate, tmp_path / "s", seed=11,
                  dicom_dir=tmp_path / "d")
    first = [pydicom.dcmread(sorted(d.glob("*.dcm"))[0], stop_before_pixels=True)
             for d in sorted((tmp_path / "d").iterdir())]
    by_case = {ds.SeriesDescription.split()[1]: ds for ds in first}
    assert set(by_case) == {"p0_s11", "patient_from_site_one_a_s12", "patient_from_site_one_b_s13"}
    p0 = by_case["p0_s11"]
    assert p0.SeriesDescription == "SYNTHETIC p0_s11 - CT ctgen - not a real patient" and p0.StudyID == "p0_s11"
    ids = [by_case[f"{pid}_s{s}"].StudyID for pid, s in zip(long, (12, 13))]
    assert all(len(i) == 16 and i.startswith("patient") for i in ids) and ids[0] != ids[1]
    assert all(len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("SYNTHETIC ") for ds in first)
    # the series names its case as the NIfTI is named (the VLM3D contract names files by the entry alone; an id
    # written with .nii.gz was named "x.nii.gz_s0" in the series, "x_s0" on disk)
    write_samples([("x.nii.gz", "x")], generate, tmp_path / "v", seed=0, dicom_dir=tmp_path / "dv")
    write_samples([("c1", "x")], generate, tmp_path / "e", seed=0, dicom_dir=tmp_path / "de", exact_names=True)
    for folder, case in (("dv", "x_s0"), ("de", "c1")):
        assert (tmp_path / folder / case).is_dir()
        ds = pydicom.dcmread(sorted((tmp_path / folder / case).glob("*.dcm"))[0], stop_before_pixels=True)
        assert ds.StudyID == case and ds.SeriesDescription.split()[1] == case


def test_a_series_left_half_written_by_a_killed_job_is_cleared(tmp_path):
    """SIGKILL (Slurm's hard kill) runs no except clause, so the temporary folder of the series being written stayed
    beside the output for good; the next write of that series clears it (another series' is left alone)."""
    from ctgen.export.dicom import save_synthetic_dicom

    out = tmp_path / "dicom" / "p0_s0"
    stale = tmp_path / "dicom" / f".p0_s0.{'0123abcd' * 4}.part"
    other = tmp_path / "dicom" / f".p1_s1.{'0123abcd' * 4}.part"
    dotted = tmp_path / "dicom" / f".p0_s0.v2.{'0123abcd' * 4}.part"  # series "p0_s0.v2", being written
    for d in (stale, other, dotted):
        d.mkdir(parents=True)
        (d / "IM00001.dcm").write_bytes(b"half")
    files = save_synthetic_dicom(_volume("canonical", shape=(4, 3, 2)), out, dict(SIDECAR, seed=0))
    assert len(files) == 2 and not stale.exists() and other.is_dir() and dotted.is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([other.name, dotted.name, "p0_s0"])
