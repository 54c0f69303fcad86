"""The three VLM3D 2026 preprocessings, as the evaluation code computes them, from a :class:`Volume`.

Sources (forithmus/VLM3D-Dockers, ``ct_challenges/ctgen_evaluation/``):

* **FVD_CTNet** (``evaluate_fvd.py``, ``metrics3d._resize_vol``, ``FVD/fvd_pytorch.py``): the array as
  SimpleITK returns it, (z, y, x), transposed to (z, x, y); clipped to [-1000, 1000] HU; resized as a whole
  to 402 x 420 x 420 with ``F.interpolate(trilinear, align_corners=False)`` (the header spacing is never
  read: field of view and z-extent change what the network sees); divided by 1000 and mapped to [0, 1],
  later mapped back with ``* 2000 - 1000`` (float32 round trip, kept).
* **CT-CLIP** (``evaluate_clip.py``): the same (z, x, y) array clipped to [-1000, 1000]; resized trilinearly
  (``align_corners=False``) to ``int(round(n * spacing / target))`` voxels for a target spacing of
  1.5 mm (z) and 0.75 mm in-plane, where the code hands the spacings over as (sz, sy, sx) for axes
  (z, x, y): axis x gets the y spacing and vice versa (equal on almost every CT; kept); centre crop/pad to
  240 x 480 x 480 with ``F.pad`` (negative pads crop) and pad value **-1 HU**; the encoder then divides by 1000.
* **2.5D FID** (``compute_fid_2-5d_ct.py``, MONAI transforms): RAS orientation (``Orientationd``),
  1 mm isotropic (``Spacingd``, bilinear, border padding: the output grid starts at the first voxel's
  centre and has ``round((n - 1) * spacing + 1)`` voxels per axis), symmetric pad to 512 per axis with
  **-1000** (``SpatialPadd``), centre crop to 512 (``CenterSpatialCropd``: start ``n // 2 - 256``), clip to
  [-1000, 1000] (``ScaleIntensityRanged`` with equal ranges).

No bare array crosses this module's boundary in: each function takes the :class:`Volume` the file gave
(voxels as stored, affine in RAS) and returns the protocol's tensor; nothing is resampled twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctprep.geometry import reorient
from ctprep.volume import CANONICAL, Volume

HU_CLIP = (-1000.0, 1000.0)  # every protocol clips to this first
FVD_SHAPE = (402, 420, 420)  # evaluate_fvd.TARGET_DHW (CT-Net's 134 slabs of 3 slices, 420 x 420)
CLIP_SPACING = (1.5, 0.75, 0.75)  # evaluate_clip.TARGET_SPACING, (z, x, y) mm
CLIP_SHAPE = (240, 480, 480)  # evaluate_clip.TARGET_DHW
CLIP_PAD = -1.0  # evaluate_clip.PAD_VALUE, in HU (-0.001 after the division by 1000)
FID_SPACING = (1.0, 1.0, 1.0)  # --enable_resampling_spacing 1.0x1.0x1.0
FID_SHAPE = (512, 512, 512)  # --target_shape 512x512x512
FID_PAD = -1000.0  # SpatialPadd value


def itk_array(vol: Volume) -> np.ndarray:
    """The voxels as the evaluation holds them: SimpleITK's (z, y, x) transposed to (z, x, y), float32.

    SimpleITK's x, y, z are the file's voxel axes i, j, k (no reorientation), so this is (k, i, j).
    """
    return np.ascontiguousarray(vol.data.transpose(2, 0, 1), dtype=np.float32)


def _resize(arr: np.ndarray | torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(D, H, W) -> ``size`` with torch's trilinear interpolation, ``align_corners=False`` (no antialias)."""
    t = torch.as_tensor(arr)[None, None]  # (1, 1, D, H, W)
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0, 0]


def ctnet_volume(vol: Volume, shape: Sequence[int] = FVD_SHAPE, clip: Sequence[float] = HU_CLIP) -> torch.Tensor:
    """FVD_CTNet's input: (402, 420, 420) float32 HU, the whole array resized, header spacing ignored."""
    arr = np.clip(itk_array(vol), clip[0], clip[1])
    t = _resize(arr, shape)  # (D, H, W) HU
    t = (t / 1000.0 + 1) / 2  # evaluate_fvd._prep_volume: [-1, 1], then [0, 1]
    return t * 2000 - 1000  # fvd_pytorch.compute_fvd: back to HU before CT-Net's own window


def clip_size(vol: Volume, spacing: Sequence[float] = CLIP_SPACING) -> list[int]:
    """The resized (z, x, y) size of the CT-CLIP protocol: ``int(round(n * s / target))`` per axis.

    The evaluation passes ``(sz, sy, sx)`` for axes (z, x, y) (see the module doc); Python's ``round``
    (half to even) as there.
    """
    n = itk_array_shape(vol)
    sx, sy, sz = (float(s) for s in vol.spacing)  # SimpleITK's GetSpacing(): along i, j, k
    return [int(round(d * (s / t))) for d, s, t in zip(n, (sz, sy, sx), spacing)]  # its order: d * (s / t)


def itk_array_shape(vol: Volume) -> tuple[int, int, int]:
    i, j, k = vol.shape
    return k, i, j


def centre_crop_or_pad(t: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """evaluate_clip._centre_crop_or_pad: ``F.pad`` with (T - n) // 2 before, the rest after (negative: crop)."""
    pads = []
    for n, target in zip(reversed(t.shape), reversed(tuple(shape))):  # F.pad wants the last axis first
        before = (target - n) // 2
        pads += [before, target - n - before]
    out = F.pad(t, pads, value=value)
    return out[: shape[0], : shape[1], : shape[2]]


def ctclip_volume(vol: Volume, spacing: Sequence[float] = CLIP_SPACING, shape: Sequence[int] = CLIP_SHAPE,
                  clip: Sequence[float] = HU_CLIP, pad_value: float = CLIP_PAD) -> torch.Tensor:
    """CT-CLIP's input: (240, 480, 480) float32 HU at 1.5 x 0.75 x 0.75 mm, padded with -1 HU."""
    arr = np.clip(itk_array(vol), clip[0], clip[1])
    return centre_crop_or_pad(_resize(arr, clip_size(vol, spacing)), shape, pad_value)


def _spacing_grid(n: int, s_in: float, s_out: float) -> tuple[int, np.ndarray]:
    """MONAI ``Spacing``'s output along one axis: ``round((n - 1) s_in / s_out + 1)`` voxels from the first
    input voxel's centre, at input index ``m s_out / s_in`` (border: clamped to the edge voxels)."""
    size = int(np.round((n - 1) * s_in / s_out + 1.0))  # numpy's round, as compute_shape_offset
    return size, np.clip(np.arange(size) * (s_out / s_in), 0.0, n - 1.0)


def _linear_along(a: torch.Tensor, axis: int, x: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``a`` along ``axis`` at fractional indices ``x`` (inside [0, n - 1])."""
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, a.shape[axis] - 1)
    w = torch.as_tensor(x - lo, dtype=a.dtype)
    shape = [1, 1, 1]
    shape[axis] = len(x)
    w = w.reshape(shape)
    return a.index_select(axis, torch.from_numpy(lo)) * (1 - w) + a.index_select(axis, torch.from_numpy(hi)) * w


def _directions(affine: np.ndarray) -> np.ndarray:
    """The unit voxel-axis directions (columns) of an affine."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    return m / np.sqrt((m ** 2).sum(axis=0))


def sheared(affine: np.ndarray) -> bool:
    """Whether the voxel axes are not orthogonal (a gantry tilt kept in the header). SimpleITK, which every
    VLM3D protocol reads through, refuses such a file ("ITK only supports orthonormal direction cosines")."""
    d = _directions(affine)
    return not np.allclose(d.T @ d, np.eye(3), atol=1e-4)


def oblique(affine: np.ndarray, atol: float = 1e-6) -> bool:
    """Whether some voxel axis is not a RAS axis (up to order and sign): a rotated, not only flipped, grid."""
    d = np.abs(_directions(affine))
    return bool((d.sum(axis=0) - d.max(axis=0) > atol).any())


def fid_volume(vol: Volume, spacing: Sequence[float] = FID_SPACING, shape: Sequence[int] = FID_SHAPE,
               pad_value: float = FID_PAD, clip: Sequence[float] = HU_CLIP) -> torch.Tensor:
    """The 2.5D FID input: (X, Y, Z) float32 HU in RAS at 1 mm, padded/cropped to 512^3, clipped.

    The resampling is MONAI's ``Spacing`` (bilinear, border padding, computed in float64) written as three
    1D passes along the voxel axes, the output grid starting at the first voxel's centre. That is MONAI's grid
    where the voxel axes are the RAS axes (up to order and sign). For an oblique (rotated) affine it is not:
    MONAI aligns the output on a corner of the input only where one matches within 1e-8 and else on the
    centre, and after the evaluation's SimpleITK float32 round trip a rotated affine misses that tolerance;
    we do not follow it there (:func:`oblique` volumes are counted and flag the FID records). A sheared
    affine is refused.
    """
    if sheared(vol.affine):
        raise ValueError(f"{vol.meta.get('source', 'volume')}: sheared voxel axes (not orthogonal); the 2.5D FID "
                         "protocol needs a rectilinear grid")
    v = reorient(vol, CANONICAL)
    m = v.affine[:3, :3]
    s_in = np.sqrt((m ** 2).sum(axis=0))
    a = torch.from_numpy(np.asarray(v.data, dtype=np.float64))  # (X, Y, Z) in RAS
    for axis in np.argsort([-(s_out / s) for s, s_out in zip(s_in, spacing)]):  # most shrinking axis first
        _, x = _spacing_grid(a.shape[axis], float(s_in[axis]), float(spacing[axis]))
        a = _linear_along(a, int(axis), x)
    a = a.float()  # MONAI casts back to the loaded float32
    pads = []
    for n, target in zip(reversed(a.shape), reversed(tuple(shape))):  # SpatialPad, method "symmetric"
        extra = max(target - n, 0)
        pads += [extra // 2, extra - extra // 2]
    a = F.pad(a, pads, value=pad_value)
    starts = [max(n // 2 - t // 2, 0) for n, t in zip(a.shape, shape)]  # CenterSpatialCrop
    a = a[starts[0]: starts[0] + shape[0], starts[1]: starts[1] + shape[1], starts[2]: starts[2] + shape[2]]
    return a.clamp(clip[0], clip[1]).contiguous()
