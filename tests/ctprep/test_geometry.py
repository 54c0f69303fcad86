import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctprep.geometry import affine_from_ctrate_row, affine_from_dicom, parse_list, reorient
from ctprep.volume import Volume, VolumeError, load_nifti, lps_to_ras


@pytest.mark.parametrize(
    "text, n, expected",
    [("[0.75, 0.75]", 2, [0.75, 0.75]), ("0.7\\0.8", 2, [0.7, 0.8]), ("(-1.5, 2, 3e1)", 3, [-1.5, 2.0, 30.0]),
     ("[0.75 0.75]", 2, [0.75, 0.75]), ("0.75 0.75", 2, [0.75, 0.75]), ("[ -175.5  -170.25   -64. ]", 3, [-175.5, -170.25, -64.0])],
)
def test_parse_list(text, n, expected):
    assert parse_list(text, n, "x") == expected


@pytest.mark.parametrize("text", ["[1.0, abc]", "", "nan", "[1, 2]", "[1, inf, 2]", "[1 2]", "[1 abc 2]", "1,5,2", "[1, 5, 2", "1,5 2"])
def test_parse_list_refuses(text):
    with pytest.raises(VolumeError):
        parse_list(text, 3, "ImagePositionPatient")


def test_affine_from_dicom_matches_simpleitk_grid():
    # an oblique, anisotropic grid built in SimpleITK (LPS), compared voxel by voxel in world space
    rowcos = np.array([0.98, 0.2, 0.0]); rowcos /= np.linalg.norm(rowcos)
    colcos = np.cross([0, 0, 1.0], rowcos) * -1
    colcos /= np.linalg.norm(colcos)
    normal = np.cross(rowcos, colcos)
    img = sitk.Image([7, 5, 4], sitk.sitkInt16)
    img.SetSpacing([0.7, 0.9, 2.5])  # columns, rows, slices
    img.SetDirection(np.column_stack([rowcos, colcos, normal]).flatten().tolist())
    img.SetOrigin([-100.0, 20.0, 35.0])
    aff = affine_from_dicom([-100.0, 20.0, 35.0], [*rowcos, *colcos], 0.9, 0.7, 2.5 * normal,
                            array_axes=("column", "row", "slice"))
    for idx in [(0, 0, 0), (6, 4, 3), (3, 1, 2)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        ras = (aff @ [*idx, 1])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)


def test_ctrate_row_affine_axes_and_direction():
    row = {"ImagePositionPatient": "[-170.0, -200.0, 50.0]", "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
           "XYSpacing": "[0.8, 0.7]", "ZSpacing": "2.0"}
    aff = affine_from_ctrate_row(row, ("row", "column", "slice"), slice_direction=-1)
    # axis 0 = DICOM row index: steps along the column cosine (LPS +y = posterior = RAS -y)
    np.testing.assert_allclose(aff[:3, 0], [0, -0.8, 0])
    np.testing.assert_allclose(aff[:3, 1], [-0.7, 0, 0])  # column index: LPS +x = RAS -x
    np.testing.assert_allclose(aff[:3, 2], [0, 0, -2.0])  # head -> feet
    np.testing.assert_allclose(aff[:3, 3], [170.0, 200.0, 50.0])
    up = affine_from_ctrate_row(row, ("column", "row", "slice"), slice_direction=1)
    np.testing.assert_allclose(up[:3, 2], [0, 0, 2.0])
    with pytest.raises(VolumeError):
        affine_from_ctrate_row({**row, "ZSpacing": "-1"})


def test_reorient_matches_nibabel_canonical(real_nifti):
    vol = load_nifti(real_nifti)
    out = reorient(vol)
    ref = nib.as_closest_canonical(nib.load(real_nifti))
    assert out.orientation == ("R", "A", "S")
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
    np.testing.assert_array_equal(out.data, np.asanyarray(ref.dataobj))
    assert out.meta["history"][-1]["op"] == "reorient"


def test_reorient_keeps_world_positions():
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)
    aff = np.array([[0, 0, -2.5, 10], [-0.7, 0, 0, 20], [0, 0.9, 0, -30], [0, 0, 0, 1]], float)
    vol = Volume.from_3d(data, aff)
    out = reorient(vol)
    assert out.orientation == ("R", "A", "S")
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        world = aff @ [*ijk, 1]
        ijk2 = np.rint(np.linalg.solve(out.affine, world)[:3]).astype(int)
        assert out.data[tuple(ijk2)] == data[ijk]


def test_lps_ras_roundtrip():
    a = np.eye(4); a[:3, 3] = [1, 2, 3]
    np.testing.assert_allclose(lps_to_ras(a)[:3, 3], [-1, -2, 3])
    np.testing.assert_allclose(lps_to_ras(lps_to_ras(a)), a)
    # an oblique grid: rotation and origin both change frame (x and y negated), as nibabel's LPS->RAS does
    t = np.radians(20.0)
    b = np.eye(4)
    b[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([0.7, 0.8, 2.5])
    b[:3, 3] = [-120.0, 35.5, -410.25]
    np.testing.assert_allclose(lps_to_ras(b), np.diag([-1.0, -1.0, 1.0, 1.0]) @ b)
