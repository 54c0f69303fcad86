import numpy as np
import pytest
import SimpleITK as sitk

from ctprep.geometry import reorient
from ctprep.resample import resample_to_affine, resample_to_grid, resize_to_shape
from ctprep.volume import Volume, load_nifti, save_nifti


def _sitk_reference(path, affine_ras, shape):
    """Resample with SimpleITK from its own NIfTI reader: an independent path for geometry and values."""
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    lps = np.diag([-1.0, -1, 1, 1]) @ affine_ras
    sp = np.sqrt((lps[:3, :3] ** 2).sum(0))
    out = sitk.Resample(img, [int(s) for s in shape], sitk.Transform(), sitk.sitkLinear, lps[:3, 3].tolist(),
                        sp.tolist(), (lps[:3, :3] / sp).flatten().tolist(), -5000.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


@pytest.mark.parametrize("spacing", [(2.0, 1.7, 2.5), (0.9, 1.1, 1.3)])
def test_separable_matches_simpleitk_on_real_scans(real_nifti, spacing):
    vol = reorient(load_nifti(real_nifti))
    shape = np.floor(np.array(vol.shape) * vol.spacing / spacing).astype(int) - 4
    out = resample_to_grid(vol, spacing, shape, antialias=False)
    assert out.meta["history"][-1]["method"] == "separable"
    ref = _sitk_reference(real_nifti, out.affine, shape)
    inside = ref > -5000
    assert inside.mean() > 0.9
    # identical up to float rounding where SimpleITK found the point inside the input
    np.testing.assert_allclose(out.data[inside], ref[inside], atol=0.05)
    np.testing.assert_allclose(out.spacing, spacing)
    assert out.orientation == ("R", "A", "S")


def test_simpleitk_path_for_oblique_input_agrees_with_reference(tmp_path):
    real = load_nifti("tests/data/pulmonary_report_ct_cropped.nii.gz")
    t = np.deg2rad(12.0)  # a gantry-tilt-like rotation about the left-right axis
    rot = np.array([[1, 0, 0, 0], [0, np.cos(t), -np.sin(t), 0], [0, np.sin(t), np.cos(t), 0], [0, 0, 0, 1]])
    vol = Volume.from_3d(real.data, rot @ real.affine)
    path = tmp_path / "oblique.nii.gz"
    save_nifti(vol, path)
    shape = (40, 30, 20)
    target = np.diag([3.0, 3.0, 4.0, 1.0])
    target[:3, 3] = vol.center - np.array([3.0, 3, 4]) * (np.array(shape) - 1) / 2
    out = resample_to_affine(vol, target, shape, pad_value=-5000.0, antialias=False)
    assert out.meta["history"][-1]["method"] == "sitk"
    ref = _sitk_reference(path, target, shape)
    inside = ref > -5000
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out.data[inside], ref[inside], atol=0.05)


def test_point_lands_where_it_belongs():
    # a bright voxel at a known world point in a flipped, anisotropic grid
    data = np.full((30, 40, 20), -1000, np.int16)
    data[10, 25, 7] = 1000
    aff = np.diag([-0.8, 0.6, 2.5, 1.0]); aff[:3, 3] = [40.0, -12.0, 100.0]
    world = (aff @ [10, 25, 7, 1])[:3]
    out = resample_to_grid(reorient(Volume.from_3d(data, aff)), (0.5, 0.5, 0.5), (40, 40, 60), center=world)
    peak = np.unravel_index(np.argmax(out.data), out.shape)
    np.testing.assert_allclose((out.affine @ [*peak, 1])[:3], world, atol=0.5)


def test_resize_keeps_extent_and_truthful_spacing(real_nifti):
    vol = reorient(load_nifti(real_nifti))
    out = resize_to_shape(vol, (32, 32, 20))
    assert out.shape == (32, 32, 20)
    lo_in = (vol.affine @ [-0.5, -0.5, -0.5, 1])[:3]
    lo_out = (out.affine @ [-0.5, -0.5, -0.5, 1])[:3]
    hi_in = (vol.affine @ [*(np.array(vol.shape) - 0.5), 1])[:3]
    hi_out = (out.affine @ [*(np.array(out.shape) - 0.5), 1])[:3]
    np.testing.assert_allclose(lo_out, lo_in, atol=1e-6)
    np.testing.assert_allclose(hi_out, hi_in, atol=1e-6)
    np.testing.assert_allclose(out.spacing, vol.spacing * np.array(vol.shape) / [32, 32, 20])
    # the mean HU of the whole field of view is preserved by an area-aware resize
    assert abs(float(out.data.mean()) - float(vol.data.mean())) < 15


def test_antialias_reduces_aliased_noise():
    rng = np.random.default_rng(0)
    vol = Volume.from_3d(rng.normal(0, 100, (128, 128, 16)).astype(np.float32), np.diag([0.7, 0.7, 5, 1]))
    plain = resample_to_grid(vol, (5.6, 5.6, 5), (16, 16, 16), antialias=False)
    smooth = resample_to_grid(vol, (5.6, 5.6, 5), (16, 16, 16), antialias=True)
    assert smooth.data.std() < 0.4 * plain.data.std()


@pytest.mark.parametrize("order", ["C", "F"])
def test_padding_surrounds_the_covered_box_in_either_memory_order(real_nifti, order):
    """The output grid is larger than the scan on every side: voxels outside get exactly the pad
    value, voxels inside match SimpleITK, whatever the input's memory layout."""
    vol = reorient(load_nifti(real_nifti))
    vol = Volume(np.asarray(vol.array, order=order), vol.affine, vol.meta)
    shape = np.ceil(np.array(vol.shape) * vol.spacing / 1.9).astype(int) + np.array([9, 14, 5])
    out = resample_to_grid(vol, (1.9, 1.9, 1.9), shape, pad_value=-3000.0, antialias=False)
    ref = _sitk_reference(real_nifti, out.affine, shape)
    inside = ref > -5000
    assert 0.2 < inside.mean() < 0.9
    np.testing.assert_allclose(out.data[inside], ref[inside], atol=0.05)
    assert (out.data[~inside] == -3000.0).all()


def test_value_map_is_applied_to_the_grid_and_the_padding(real_nifti):
    vol = reorient(load_nifti(real_nifti))
    shape = np.array(vol.shape) + 20
    plain = resample_to_grid(vol, vol.spacing, shape, pad_value=-1024.0)

    def halve(block):
        block *= 0.5

    mapped = resample_to_grid(vol, vol.spacing, shape, pad_value=-1024.0, post=halve)
    np.testing.assert_array_equal(mapped.data, plain.data * np.float32(0.5))
    assert mapped.data[0, 0, 0] == mapped.data[-1, -1, -1] == -512.0  # padding, mapped too


def test_resampler_threads_follow_the_jobs_allowance(monkeypatch):
    """A local Snakemake job keeps the machine's affinity and gets its threads as OMP_NUM_THREADS."""
    import os

    from ctprep import resample

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resample._threads() == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resample._threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cores + 8))
    assert resample._threads() == cores
