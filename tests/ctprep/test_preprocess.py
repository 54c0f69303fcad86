import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctprep.preprocess import preprocess_volume, stored_to_geometry
from ctprep.volume import Volume, VolumeError, load_nifti

SPACING = {"mode": "spacing", "spacing": [2.0, 2.0, 3.0], "shape": [96, 96, 64], "center": "volume",
           "clip": [-1000, 1000], "pad_hu": -1024, "antialias": False}


def test_spacing_preset_on_real_scans_matches_simpleitk(real_nifti):
    out = preprocess_volume(load_nifti(real_nifti), None, SPACING, {"geometry": "header"})
    assert out.shape == (96, 96, 64) and out.orientation == ("R", "A", "S")
    np.testing.assert_allclose(out.spacing, [2.0, 2.0, 3.0])
    assert out.data.min() >= -1000 and out.data.max() <= 1000
    # independent: SimpleITK reads the file and samples it at our output voxel centres
    img = sitk.Cast(sitk.ReadImage(str(real_nifti)), sitk.sitkFloat32)
    lps = np.diag([-1.0, -1, 1, 1]) @ out.affine
    ref = sitk.Resample(img, [96, 96, 64], sitk.Transform(), sitk.sitkLinear, lps[:3, 3].tolist(),
                        [2.0, 2.0, 3.0], (lps[:3, :3] / [2.0, 2.0, 3.0]).flatten().tolist(), -5000.0)
    ref = sitk.GetArrayFromImage(ref).transpose(2, 1, 0)
    inside = ref > -5000
    assert inside.sum() > 10_000
    np.testing.assert_allclose(out.data[inside], np.clip(ref[inside], -1000, 1000), atol=0.05)
    steps = [h["op"] for h in out.meta["history"]]
    assert steps == ["geometry", "to_hu", "reorient", "resample", "clip"]


def test_generatect_preset_shape_and_extent(real_nifti):
    preset = {"mode": "resize", "shape": [128, 128, 201], "clip": [-1000, 1000]}
    vol = load_nifti(real_nifti)
    out = preprocess_volume(vol, None, preset, {"geometry": "header"}, normalise=True)
    assert out.shape == (128, 128, 201)
    assert -1.0 <= out.data.min() and out.data.max() <= 1.0
    extent_in = np.sort(np.abs(vol.affine[:3, :3] @ vol.shape))
    extent_out = np.sort(np.abs(out.affine[:3, :3] @ out.shape))
    np.testing.assert_allclose(extent_out, extent_in, rtol=1e-6)


def _ctrate_row(manufacturer="SIEMENS", n=12):
    return {"Manufacturer": manufacturer, "ImagePositionPatient": "[-100.0, -120.0, 40.0]",
            "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "XYSpacing": "[0.8, 0.8]", "ZSpacing": "2.5",
            "RescaleSlope": "1", "RescaleIntercept": "-1024", "NumberofSlices": str(n)}


def test_reversed_slice_order_is_fixed_for_listed_manufacturers():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2000, (10, 11, 12)).astype(np.int16)
    siemens = stored_to_geometry(Volume.from_3d(data, np.eye(4)), _ctrate_row(), {})
    pnms = stored_to_geometry(Volume.from_3d(data[:, :, ::-1], np.eye(4)), _ctrate_row("PNMS"), {})
    np.testing.assert_array_equal(pnms.data, siemens.data)
    np.testing.assert_allclose(pnms.affine, siemens.affine)
    assert pnms.meta["history"][-1]["reversed_slices"] is True


def test_slice_count_mismatch_and_missing_row_are_rejected():
    vol = Volume.from_3d(np.zeros((4, 4, 5), np.int16), np.eye(4))
    with pytest.raises(VolumeError, match="12 slices"):
        stored_to_geometry(vol, _ctrate_row(n=12), {})
    with pytest.raises(VolumeError, match="no metadata row"):
        stored_to_geometry(vol, None, {"geometry": "metadata"})


def test_cli_preprocess_writes_hu_nifti_with_truthful_affine(tmp_path, repo_config):
    src = "tests/data/example_ct_sm.nii.gz"
    out = tmp_path / "out.nii.gz"
    res = subprocess.run([sys.executable, "-m", "ctprep.cli", "preprocess", src, str(out), "--preset", "generatect",
                          "--config", str(repo_config)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    img = nib.load(out)
    assert img.shape == (128, 128, 201) and img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asanyarray(img.dataobj)
    assert data.min() >= -1000 and data.max() <= 1000
    # the same physical box as the input (header geometry of a real scan)
    src_img = nib.load(src)
    centre_in = src_img.affine @ [*((np.array(src_img.shape) - 1) / 2), 1]
    centre_out = img.affine @ [*((np.array(img.shape) - 1) / 2), 1]
    np.testing.assert_allclose(centre_out, centre_in, atol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "ctprep.cli", "preprocess", str(tmp_path / "missing.nii.gz"),
                          str(out), "--preset", "generatect", "--config", str(repo_config)], capture_output=True, text=True)
    assert bad.returncode == 2 and "file not found" in bad.stderr


def test_cli_dicom2nifti(tmp_path, data_dir):
    out = tmp_path / "series.nii.gz"
    res = subprocess.run([sys.executable, "-m", "ctprep.cli", "dicom2nifti", str(data_dir / "example_ct_dicom"), str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    img = nib.load(out)
    assert img.shape == (512, 512, 20)
    np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), [0.976562, 0.976562, 2.0], atol=1e-4)


@pytest.mark.parametrize("preset", [SPACING, {"mode": "resize", "shape": [64, 64, 50], "clip": [-900, 600]}])
def test_window_fused_into_the_resampler_equals_separate_clip_and_normalise(real_nifti, preset):
    from ctprep import geometry, intensity, resample
    from ctprep.volume import CANONICAL

    out = preprocess_volume(load_nifti(real_nifti), None, preset, {"geometry": "header"}, normalise=True)
    hu = geometry.reorient(intensity.to_hu(load_nifti(real_nifti), 1.0, 0.0, "auto"), CANONICAL)
    if preset["mode"] == "spacing":
        grid = resample.resample_to_grid(hu, preset["spacing"], preset["shape"], pad_value=-1024, antialias=False)
    else:
        grid = resample.resize_to_shape(hu, preset["shape"])
    lo, hi = preset["clip"]
    ref = intensity.normalise(intensity.clip_hu(grid, lo, hi), lo, hi)
    np.testing.assert_array_equal(out.data, ref.data)
    steps = [h["op"] for h in out.meta["history"]]
    assert steps[-2:] == ["clip", "normalise"]


def test_window_on_the_simpleitk_path_for_oblique_scans(real_nifti):
    """An oblique scan goes through SimpleITK's resampler: the window still applies, padding included."""
    from ctprep import intensity, resample
    from ctprep.geometry import reorient

    vol = load_nifti(real_nifti)
    a = np.radians(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    oblique = Volume(vol.array, rot @ vol.affine, vol.meta)
    preset = {**SPACING, "clip": [-800, 400]}
    out = preprocess_volume(oblique, None, preset, {"geometry": "header"}, normalise=True)
    assert [h for h in out.meta["history"] if h["op"] == "resample"][0]["method"] == "sitk"
    hu = intensity.to_hu(oblique, 1.0, 0.0, "auto")
    grid = resample.resample_to_affine(reorient(hu), out.affine, out.shape, pad_value=-1024, antialias=False)
    ref = intensity.normalise(intensity.clip_hu(grid, -800, 400), -800, 400)
    np.testing.assert_allclose(out.data, ref.data, atol=1e-6)
    assert out.data.min() == -1.0 and out.data.max() <= 1.0


@pytest.mark.parametrize("oblique", [False, True])
def test_int16_output_equals_rounding_the_float_grid(real_nifti, oblique):
    """dtype='int16' rounds inside the resampler (separable and SimpleITK paths): same voxels as
    rounding the float32 result afterwards, the padding included."""
    vol = load_nifti(real_nifti)
    if oblique:
        a = np.radians(9.0)
        rot = np.eye(4)
        rot[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        vol = Volume(vol.array, rot @ vol.affine, vol.meta)
    preset = {**SPACING, "clip": [-1000, 900], "antialias": True}
    ref = preprocess_volume(vol, None, preset, {"geometry": "header"})
    got = preprocess_volume(vol, None, preset, {"geometry": "header"}, dtype="int16")
    assert ref.data.dtype == np.float32 and got.data.dtype == np.int16
    np.testing.assert_array_equal(got.affine, ref.affine)
    np.testing.assert_array_equal(got.data, np.rint(ref.data).astype(np.int16))
    assert got.data.min() == -1000 and got.data.max() <= 900
    assert [h for h in got.meta["history"] if h["op"] == "resample"][0]["dtype"] == "int16"
    with pytest.raises(ValueError, match="float32"):
        preprocess_volume(vol, None, preset, {"geometry": "header"}, normalise=True, dtype="int16")


def test_load_nifti_views_the_file_bytes_with_nibabel_values(real_nifti, tmp_path):
    """load_nifti skips nibabel's voxel copy: the values, dtype and scaling must still be nibabel's."""
    vol = load_nifti(real_nifti)
    img = nib.load(real_nifti)
    ref = np.asanyarray(img.dataobj)
    assert vol.data.dtype == ref.dtype and np.array_equal(vol.data, ref)
    np.testing.assert_array_equal(vol.affine, img.affine)
    # header scaling (scl_slope/scl_inter) applied as nibabel applies it
    scaled = nib.Nifti1Image(ref[:20, :20, :10].astype(np.int16), img.affine)
    scaled.header.set_slope_inter(0.5, -1024.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    ref_scaled = np.asanyarray(nib.load(tmp_path / "scaled.nii.gz").dataobj)
    got = load_nifti(tmp_path / "scaled.nii.gz").data
    assert got.dtype == ref_scaled.dtype and np.array_equal(got, ref_scaled)
    # a file cut short in its voxel data is named, not read past its end
    raw = nib.Nifti1Image(ref[:20, :20, :10].astype(np.int16), img.affine).to_bytes()
    (tmp_path / "short.nii").write_bytes(raw[:-100])
    with pytest.raises(VolumeError, match="truncated NIfTI short.nii"):
        load_nifti(tmp_path / "short.nii")


def test_a_converted_dicom_volume_is_refused_in_metadata_mode_and_read_in_header_mode(tmp_path, data_dir):
    """dicom2nifti writes (column, row, slice) with the scanner's affine: read as CT-RATE's (row, column, slice) by
    the metadata it would be mirrored in-plane and reversed in z, silently; the header is its truth."""
    from ctprep.dicom import dicom_to_nifti, read_series

    path = tmp_path / "series.nii.gz"
    dicom_to_nifti(data_dir / "example_ct_dicom", path)
    vol = load_nifti(path)
    row = {"XYSpacing": "[0.9765625, 0.9765625]", "ZSpacing": 2.0, "ImagePositionPatient": "[-249.5, -437.5, -785.5]",
           "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "NumberofSlices": 20, "Manufacturer": "SIEMENS"}
    with pytest.raises(VolumeError, match="dataset.geometry: header"):
        stored_to_geometry(vol, row, {"geometry": "metadata"})
    np.testing.assert_allclose(stored_to_geometry(vol, row, {"geometry": "header"}).affine,
                               read_series(data_dir / "example_ct_dicom").affine, atol=1e-3)


def test_a_header_without_a_transform_is_refused_in_header_mode(tmp_path):
    """qform and sform codes 0: nibabel guesses LAS and ITK LPS for the same file; no orientation is stated."""
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.set_sform(None, 0)
    img.set_qform(None, 0)
    nib.save(img, tmp_path / "x.nii.gz")
    with pytest.raises(VolumeError, match="states no orientation"):
        stored_to_geometry(load_nifti(tmp_path / "x.nii.gz"), None, {"geometry": "header"})


@pytest.mark.parametrize("shape", [(8, 8, 1), (1, 8, 8)])
def test_a_single_slice_stored_as_3d_is_no_volume(tmp_path, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / "x.nii.gz")
    with pytest.raises(VolumeError, match="at least 2 voxels along each axis"):
        load_nifti(tmp_path / "x.nii.gz")


@pytest.mark.parametrize("manufacturer", ["SIEMENS", "PNMS"])
def test_metadata_mode_says_where_a_stated_header_places_the_volume_elsewhere(tmp_path, caplog, manufacturer,
                                                                            monkeypatch):
    """CT-RATE's identity headers say nothing; a header with the metadata's own geometry agrees (for a reversed
    stack too: the header describes the stored order); one that places the voxels elsewhere (another converter's
    truthful header, or the metadata's error) is named, and the metadata is read as configured."""
    from ctprep import preprocess

    monkeypatch.setattr(preprocess, "_HEADER_WARNINGS", [0])  # the job's count starts here
    data = np.zeros((10, 11, 12), np.int16)
    row = _ctrate_row(manufacturer)
    truth = stored_to_geometry(Volume.from_3d(data, np.eye(4)), row, {})
    stored = truth.affine.copy()
    if manufacturer == "PNMS":  # the header of the stored (reversed) stack
        stored[:3, 3] += 11 * stored[:3, 2]
        stored[:3, 2] *= -1
    for affine, warned in ((np.eye(4), False), (stored, False), (np.diag([-0.8, -0.8, 2.5, 1.0]), True)):
        caplog.clear()
        nib.save(nib.Nifti1Image(data, affine), tmp_path / "x.nii.gz")
        with caplog.at_level("WARNING", logger="ctprep.preprocess"):
            out = stored_to_geometry(load_nifti(tmp_path / "x.nii.gz"), row, {})
        np.testing.assert_allclose(out.affine, truth.affine)
        assert ("its header places the volume" in caplog.text) == warned, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctprep.preprocess"):  # two more disagreeing volumes: the third is the
        for _ in range(3):                                        # last one named, and says so
            stored_to_geometry(load_nifti(tmp_path / "x.nii.gz"), row, {})
    assert caplog.text.count("its header places the volume") == 2 and "not listed" in caplog.text


@pytest.mark.parametrize("mode", ["spacing", "resize"])
def test_padding_outside_the_scan_circle_does_not_darken_the_body(data_dir, mode):
    """A real scan with the scanner's padding (-3024 HU, GE's PixelPaddingValue -2000) outside a scan circle that
    cuts the body: the prepared volume equals the same scan padded with air (-1024 HU). The padding was
    interpolated into the tissue at the circle's edge before the window, a rim up to ~680 HU too dark; measured
    values below -1024 (noise in air) are kept."""
    vol = load_nifti(data_dir / "example_ct_sm.nii.gz")
    a = vol.array.astype(np.int16)  # (1, x, y, z)
    x, y = np.meshgrid(np.arange(a.shape[1]), np.arange(a.shape[2]), indexing="ij")
    outside = (x - a.shape[1] / 2) ** 2 + (y - a.shape[2] / 2) ** 2 > (0.42 * min(a.shape[1:3])) ** 2
    assert (a[:, outside] > -500).mean() > 0.05  # the circle cuts through tissue
    padded, air = a.copy(), a.copy()
    padded[:, outside], air[:, outside] = -3024, -1024
    preset = SPACING if mode == "spacing" else {"mode": "resize", "shape": [48, 48, 32], "clip": [-1000, 1000]}
    out = preprocess_volume(Volume(padded, vol.affine, vol.meta), None, preset, {"geometry": "header"})
    ref = preprocess_volume(Volume(air, vol.affine, vol.meta), None, preset, {"geometry": "header"})
    np.testing.assert_array_equal(out.data, ref.data)
    ops = [h["op"] for h in out.meta["history"]]
    step = out.meta["history"][ops.index("floor_padding")]
    assert step["below"] == -1500 and step["to"] == -1024 and ops[ops.index("floor_padding") + 1] in ("resample",
                                                                                                       "resize")
    # fused into the resampler's reading: the input itself is left as it was (no copy of it was made either)
    assert (padded[:, outside] == -3024).all()
    # the SimpleITK path (an oblique scan) floors a copy of the input: the same as the air-padded scan there too
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]
    tilted = [preprocess_volume(Volume(x, rot @ vol.affine, vol.meta), None, preset, {"geometry": "header"})
              for x in (padded, air)]
    assert [h for h in tilted[0].meta["history"] if h["op"] in ("resample", "resize")][0]["method"] == "sitk"
    np.testing.assert_array_equal(tilted[0].data, tilted[1].data)
    # the noise in air (-1064 to -1207 in the real scans) is data: a scan without padding is not touched
    plain = preprocess_volume(vol, None, preset, {"geometry": "header"})
    assert "floor_padding" not in [h["op"] for h in plain.meta["history"]] and a.min() < -1024
