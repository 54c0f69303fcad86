"""The three VLM3D preprocessings against independent computations on real scans with non-identity affines.

References: SimpleITK reads the file as the challenge's code does; scipy's ``map_coordinates`` does the
linear interpolation at the sample positions torch's ``align_corners=False`` defines; numpy pads; MONAI's
transforms (the ones the challenge's 2.5D FID script composes) check the 2.5D FID grid.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from ctgen.metrics.vlm3d.contract import load_volume
from ctgen.metrics.vlm3d.geometry import (
    CLIP_PAD,
    CLIP_SHAPE,
    CLIP_SPACING,
    FID_SHAPE,
    FID_SPACING,
    FVD_SHAPE,
    clip_size,
    ctclip_volume,
    ctnet_volume,
    fid_volume,
)
from ctprep.volume import Volume


def _sitk_array(path) -> np.ndarray:
    """The challenge's reading: SimpleITK array (z, y, x) transposed to (z, x, y), float32."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32).transpose(0, 2, 1)


def _torch_trilinear_ref(arr: np.ndarray, size) -> np.ndarray:
    """torch's trilinear, align_corners=False, written as sample positions for scipy: (m + 0.5) n / N - 0.5, >= 0."""
    axes = [np.maximum((np.arange(m) + 0.5) * n / m - 0.5, 0.0) for n, m in zip(arr.shape, size)]
    grid = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(arr.astype(np.float64), grid, order=1, mode="nearest")


@pytest.fixture
def anisotropic(tmp_path, data_dir):
    """The LPS pulmonary crop with in-plane spacings that differ (0.7 along i, 0.9 along j) and 2 mm slices."""
    img = nib.load(data_dir / "pulmonary_report_ct_cropped.nii.gz")
    aff = img.affine.copy()
    aff[:3, :3] = aff[:3, :3] / np.sqrt((aff[:3, :3] ** 2).sum(0)) * np.array([0.7, 0.9, 2.0])
    out = nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header)
    out.set_sform(aff, 1)
    out.set_qform(aff, 1)
    path = tmp_path / "aniso.nii.gz"
    nib.save(out, path)
    return path


def test_protocol_constants_are_the_challenges():
    assert FVD_SHAPE == (402, 420, 420) and FVD_SHAPE[0] == 3 * 134  # CT-Net: 134 slabs of 3 slices
    assert CLIP_SPACING == (1.5, 0.75, 0.75) and CLIP_SHAPE == (240, 480, 480) and CLIP_PAD == -1.0
    assert FID_SPACING == (1.0, 1.0, 1.0) and FID_SHAPE == (512, 512, 512)


def test_ctnet_input_is_the_clipped_array_resized_whole_ignoring_spacing(anisotropic, data_dir):
    shape = (40, 44, 48)  # the official 402 x 420 x 420 differs only in size (constants checked above)
    ours = ctnet_volume(load_volume(anisotropic), shape).numpy()
    arr = np.clip(_sitk_array(anisotropic), -1000, 1000)
    ref = _torch_trilinear_ref(arr, shape)
    assert ours.shape == shape and np.abs(ours - ref).max() < 0.05  # float32 round trip through [0, 1]
    # header spacing plays no part: the original file (other spacing, same voxels) gives the same input
    same = ctnet_volume(load_volume(data_dir / "pulmonary_report_ct_cropped.nii.gz"), shape).numpy()
    assert np.array_equal(ours, same)
    assert ours.min() >= -1000 and ours.max() <= 1000


def test_ctnet_input_is_the_voxel_order_simpleitk_gives_not_ras(data_dir):
    vol = load_volume(data_dir / "pulmonary_report_ct_cropped.nii.gz")  # stored LPS
    ours = ctnet_volume(vol, (vol.shape[2], vol.shape[0], vol.shape[1])).numpy()  # (k, i, j): no resize
    ref = np.clip(_sitk_array(data_dir / "pulmonary_report_ct_cropped.nii.gz"), -1000, 1000)
    assert np.abs(ours - ref).max() < 0.05  # same size: the resize is the identity, the order is SimpleITK's


def test_ctclip_size_follows_the_code_including_its_x_y_spacing_swap(anisotropic):
    img = sitk.ReadImage(str(anisotropic))
    sx, sy, sz = img.GetSpacing()
    z, x, y = _sitk_array(anisotropic).shape
    # evaluate_clip._load_vol: _resize_array(v, (sz, sy, sx)) on axes (z, x, y)
    expected = [int(round(z * sz / 1.5)), int(round(x * sy / 0.75)), int(round(y * sx / 0.75))]
    assert clip_size(load_volume(anisotropic)) == expected
    assert expected[1] != int(round(x * sx / 0.75))  # the swap matters for this scan


def test_ctclip_input_resizes_to_spacing_then_pads_with_minus_one(anisotropic):
    spacing, shape = (6.0, 3.0, 3.0), (40, 64, 19)  # resized to (37, 37, 24): pad z and x, crop y by 5
    vol = load_volume(anisotropic)
    ours = ctclip_volume(vol, spacing, shape).numpy()
    arr = np.clip(_sitk_array(anisotropic), -1000, 1000)
    size = clip_size(vol, spacing)
    resized = _torch_trilinear_ref(arr, size)
    pads = [((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(size, shape)]
    padded = np.pad(resized, [(max(a, 0), max(b, 0)) for a, b in pads], constant_values=-1.0)
    crop = tuple(slice(max(-a, 0), max(-a, 0) + t) for (a, _), t in zip(pads, shape))
    ref = padded[crop]
    assert ours.shape == shape and np.abs(ours - ref).max() < 1e-2
    assert pads[0][0] > 0 and (ours[: pads[0][0]] == CLIP_PAD).all()  # the pad is -1 HU, not air
    assert size == [37, 37, 24] and pads[2] == (-3, -2)  # cropped by F.pad: (19 - 24) // 2 = -3 in front


def test_ctclip_input_at_the_official_grid_has_the_official_shape(data_dir):
    out = ctclip_volume(load_volume(data_dir / "example_ct_sm.nii.gz"))
    assert tuple(out.shape) == CLIP_SHAPE and out.dtype == torch.float32
    assert out[0, 0, 0] == CLIP_PAD and out.min() >= -1000 and out.max() <= 1000


@pytest.mark.parametrize("name, spacing, shape", [
    ("pulmonary_report_ct_cropped.nii.gz", (1.0, 0.8, 1.3), (160, 120, 150)),  # LPS: reoriented; pad and crop
    ("example_ct.nii.gz", (1.0, 1.0, 1.0), (200, 300, 250)),
])
def test_fid_input_matches_monais_transforms(data_dir, name, spacing, shape):
    monai = pytest.importorskip("monai")
    from monai import transforms as T

    path = str(data_dir / name)
    ref = T.Compose([
        T.LoadImaged(keys=["image"]), T.EnsureChannelFirstd(keys=["image"]),
        T.Orientationd(keys=["image"], axcodes="RAS", labels=None),
        T.Spacingd(keys=["image"], pixdim=spacing, mode=["bilinear"]),
        T.SpatialPadd(keys=["image"], spatial_size=shape, mode="constant", value=-1000),
        T.CenterSpatialCropd(keys=["image"], roi_size=shape),
        T.ScaleIntensityRanged(keys=["image"], a_min=-1000, a_max=1000, b_min=-1000, b_max=1000, clip=True),
    ])({"image": path})["image"].as_tensor()[0]
    ours = fid_volume(load_volume(path), spacing, shape)
    assert ours.shape == ref.shape == shape and monai.__version__
    assert (ours - ref).abs().max() < 1e-2


def test_fid_input_is_ras_at_one_mm_padded_with_minus_1000(data_dir):
    vol = load_volume(data_dir / "pulmonary_report_ct_cropped.nii.gz")  # 122 x 102 x 112 at 1.5 mm, LPS
    out = fid_volume(vol, FID_SPACING, (200, 200, 200))
    n = [round((d - 1) * 1.5 + 1) for d in vol.shape]  # MONAI Spacing: first voxel's centre, round((n - 1) s + 1)
    before = [(200 - d) // 2 for d in n]
    assert (out[: before[0]] == -1000).all() and (out[before[0] + n[0]:] == -1000).all()
    inner = out[before[0]: before[0] + n[0], before[1]: before[1] + n[1], before[2]: before[2] + n[2]]
    assert (inner[[0, -1]] != -1000).any()
    # RAS: the first sample along x is the patient's rightmost voxel, the last along i of the LPS file
    data = np.clip(np.asarray(vol.data, dtype=np.float32), -1000, 1000)
    assert np.allclose(inner[0, 0, 0].item(), data[-1, -1, 0], atol=1e-3)
    # output voxel m samples input index m * 1 / 1.5: m = 3 is voxel 2 from the right/posterior/inferior end
    assert np.allclose(inner[3, 6, 9].item(), data[-3, -5, 6], atol=1e-3)
    assert n[0] == 182  # round(121 * 1.5 + 1) = round(182.5): numpy rounds half to even


def test_sheared_and_oblique_affines_are_told_apart_from_flips_and_permutations():
    from scipy.spatial.transform import Rotation

    from ctgen.metrics.vlm3d.geometry import oblique, sheared

    flipped = np.diag([-0.7, -0.7, 2.5, 1.0])[:, [1, 0, 2, 3]]  # LPS and i/j swapped: still the RAS axes
    rotated = np.eye(4)
    rotated[:3, :3] = Rotation.from_euler("xyz", [8, -5, 12], degrees=True).as_matrix() * [0.7, 0.9, 2.5]
    tilted = np.diag([0.8, 0.8, 2.0, 1.0])
    tilted[1, 2] = 0.35  # a gantry tilt kept in the header: the slice axis leans in y
    assert not sheared(flipped) and not oblique(flipped)
    assert not sheared(rotated) and oblique(rotated)
    assert sheared(tilted) and oblique(tilted)
    with pytest.raises(ValueError, match="sheared voxel axes"):
        fid_volume(Volume.from_3d(np.zeros((4, 4, 4), np.int16), tilted), (1.0, 1.0, 1.0), (4, 4, 4))
