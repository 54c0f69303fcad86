"""Resampling onto a target grid with SimpleITK, keeping the affine truthful.

SimpleITK does the interpolation (exact, multithreaded, handles oblique input directions);
this module only builds the output grid and converts between :class:`Volume` and
``SimpleITK.Image`` (LPS) through :func:`ctprep.volume.ras_to_lps`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk

from ctprep.volume import Volume, VolumeError, lps_to_ras, ras_to_lps

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def to_sitk(vol: Volume) -> sitk.Image:
    """The single channel as a SimpleITK image in LPS (copies the voxels once)."""
    # SimpleITK indexes (x, y, z) = (i, j, k) but its numpy view is (z, y, x).
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.data.transpose(2, 1, 0)))
    lps = ras_to_lps(vol.affine)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def affine_of_sitk(img: sitk.Image) -> np.ndarray:
    """Voxel-to-RAS affine of a SimpleITK image."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return lps_to_ras(lps)


def from_sitk(img: sitk.Image, like: Volume, op: str, **args) -> Volume:
    """Wrap a SimpleITK image as a Volume derived from ``like``."""
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (i, j, k), a view
    return like.new_like(data[None], affine_of_sitk(img), op=op, **args)


def _antialias(img: sitk.Image, out_spacing: Sequence[float], threshold: float = 1.5) -> tuple[sitk.Image, list]:
    """Gaussian-smooth along axes that are downsampled by more than ``threshold``x.

    Without it a 0.7 mm -> 5 mm resize aliases noise and thin structures (ribs, vessels). sigma is
    chosen so that smoothing plus linear interpolation has the variance of the widened tent of
    the separable path (a tent of half-width f has variance f^2/6): sigma = s_in*sqrt((f^2-1)/6).
    """
    sigmas = []
    in_spacing = img.GetSpacing()
    for axis, (s_in, s_out) in enumerate(zip(in_spacing, out_spacing)):
        f = s_out / s_in
        sigma = s_in * np.sqrt((f * f - 1.0) / 6.0) if f > threshold else 0.0
        sigmas.append(round(sigma, 4))
        if sigma > 0:
            img = sitk.RecursiveGaussian(img, sigma=sigma, normalizeAcrossScale=False, order=0, direction=axis)
    return img, sigmas


def _axis_weights(
    n_in: int, s_in: float, o_in: float, n_out: int, s_out: float, o_out: float, antialias: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps and weights of a 1D linear resampling from one regular grid onto another.

    Output sample m sits at continuous input index x = (o_out + m*s_out - o_in) / s_in. Plain
    linear interpolation uses a tent of half-width 1 input voxel; when downsampling by f > 1.5
    with ``antialias`` the tent widens to f (area-aware linear, as Pillow and torch's
    ``antialias=True`` do). Inside means -0.5 <= x < n_in - 0.5 (ITK's rule), edges clamp.
    Returns (taps (n_out, T) int, weights (n_out, T) float32, inside (n_out,) bool).
    """
    x = (o_out + np.arange(n_out) * s_out - o_in) / s_in
    f = s_out / s_in
    half = f if (antialias and f > 1.5) else 1.0
    offsets = np.arange(-int(np.ceil(half)), int(np.ceil(half)) + 1)
    base = np.floor(x).astype(np.int64)
    taps = base[:, None] + offsets[None, :]
    w = np.clip(1.0 - np.abs(taps - x[:, None]) / half, 0.0, None)
    inside = (x >= -0.5) & (x < n_in - 0.5)
    taps = np.clip(taps, 0, n_in - 1)  # edge clamp, like ITK's linear interpolator
    w_sum = w.sum(axis=1, keepdims=True)
    w = np.where(w_sum > 0, w / np.where(w_sum > 0, w_sum, 1.0), 0.0)
    keep = w.any(axis=0)  # drop tap columns that never contribute
    return taps[:, keep], w[:, keep].astype(np.float32), inside


def _threads() -> int:
    """Worker threads for resampling: the job's CPU allowance. A cluster job's affinity holds its cores; a local
    Snakemake job keeps the machine's affinity and gets its ``threads`` as ``OMP_NUM_THREADS`` instead (16 local
    prep jobs of 2 threads must not each start one thread per core)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(1, n)


def _resample_axis(
    a: np.ndarray, axis: int, taps: np.ndarray, w: np.ndarray, out: np.ndarray | None = None,
    post: Callable[[np.ndarray], None] | None = None, pre: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Apply one axis's taps/weights to ``a`` (any dtype, any strides) -> float32.

    Works in blocks along another axis, on a thread pool (numpy releases the GIL in take and
    the in-place arithmetic), so temporaries stay small and every core of the job is used.
    ``out`` (any strides) receives the result; ``post`` maps each finished block in place while
    it is still in cache (the preprocessing's HU window, instead of another pass over memory);
    ``pre`` maps the gathered input values in place before they are weighted (the scanner padding's
    floor, instead of a copy of the input). An integer ``out`` gets each float32 block rounded there
    (see :func:`_round_into`).
    """
    out_shape = list(a.shape)
    out_shape[axis] = len(taps)
    if out is None:
        out = np.empty(out_shape, dtype=np.float32)
    elif list(out.shape) != out_shape:
        raise ValueError(f"output block {out.shape} does not match {out_shape}")
    loop_axis = 1 if axis == 0 else 0
    shape_w = [1, 1, 1]
    shape_w[axis] = len(taps)
    weights = [w[:, t].reshape(shape_w) for t in range(taps.shape[1])]

    def run(start: int) -> None:
        sl = [slice(None)] * 3
        sl[loop_axis] = slice(start, start + block)
        src = a[tuple(sl)]
        dst = out[tuple(sl)]
        acc = dst if dst.dtype == np.float32 else np.empty(dst.shape, np.float32)
        # gather into a contiguous buffer of the source type (take writes only such), then
        # weight it straight into the output block: no temporaries beyond the buffer
        buf = np.empty(acc.shape, src.dtype)
        np.take(src, taps[:, 0], axis=axis, out=buf, mode="clip")  # taps are in range already
        if pre is not None:
            pre(buf)
        np.multiply(buf, weights[0], out=acc)
        for t in range(1, taps.shape[1]):
            np.take(src, taps[:, t], axis=axis, out=buf, mode="clip")
            if pre is not None:
                pre(buf)
            if buf.dtype == np.float32:
                acc += np.multiply(buf, weights[t], out=buf)
            else:  # integer source (the first pass): the product needs a float temporary
                acc += buf * weights[t]
        if post is not None:
            post(acc)
        if acc is not dst:
            _round_into(acc, dst)

    # blocks of ~1M output voxels: big enough to amortise per-call overhead, small enough to
    # keep temporaries in cache and give every thread work
    per_row = int(np.prod(out_shape)) // max(1, out_shape[loop_axis])
    block = max(1, min(a.shape[loop_axis], 1_000_000 // max(1, per_row)))
    _parallel(run, range(0, a.shape[loop_axis], block))
    return out


def _round_into(block: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = block`` for an integer ``out``: round half to even, clip to its range, cast.

    The same values as :func:`ctprep.codec.to_dtype` on the finished float grid, done per
    block while it is in cache, so an int16 grid never exists as float32 (221 MB at CT-RATE size).
    """
    info = np.iinfo(out.dtype)
    np.rint(block, out=block)
    np.clip(block, info.min, info.max, out=block)
    np.copyto(out, block, casting="unsafe")


def _parallel(run: Callable[[int], None], starts: Sequence[int]) -> None:
    n = _threads()
    if n == 1 or len(starts) < 2:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(run, starts))


def _fill_outside(out: np.ndarray, box: Sequence[slice], value: float) -> None:
    """Set every voxel of ``out`` outside ``box`` to ``value`` (the box itself is left alone).

    np.full would write the whole array once more (a 480x480x240 float32 grid is 221 MB, about
    40 ms); the slabs around the box are often most of it, so they are filled in parallel.
    """
    slabs = []
    for d, sl in enumerate(box):
        before, after = [slice(None)] * 3, [slice(None)] * 3
        # slabs of earlier axes already cover their part: restrict to the box there
        for e in range(d):
            before[e] = after[e] = box[e]
        before[d], after[d] = slice(0, sl.start), slice(sl.stop, out.shape[d])
        slabs += [tuple(before), tuple(after)]
    slabs = [s for s in slabs if out[s].size]

    def run(i: int) -> None:
        out[slabs[i]] = value

    _parallel(run, range(len(slabs)))


def _axis_aligned(affine: np.ndarray) -> bool:
    m = affine[:3, :3]
    return bool(np.allclose(m, np.diag(np.diag(m)), atol=1e-6 * np.abs(m).max()) and (np.diag(m) > 0).all())


def _separable(
    vol: Volume, affine: np.ndarray, shape, pad_value: float, antialias: bool,
    post: Callable[[np.ndarray], None] | None = None, dtype: np.dtype = np.dtype(np.float32),
    pre: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Linear resampling between two axis-aligned grids as three 1D passes.

    SimpleITK's generic Resample maps and bounds-checks every output voxel through a transform
    (about 1 s per 10 M voxels here); between axis-aligned grids linear interpolation is
    separable, and three 1D passes, the most shrinking axis first, are several times faster and
    agree with SimpleITK (tests/ctprep/test_resample.py). Only the box of output voxels that
    overlaps the input is interpolated; the rest is padding, written once.
    """
    a = vol.data
    shape = tuple(int(n) for n in shape)
    plans, box = [], []
    for d in range(3):
        taps, w, inside = _axis_weights(a.shape[d], vol.affine[d, d], vol.affine[d, 3],
                                        shape[d], affine[d, d], affine[d, 3], antialias)
        idx = np.flatnonzero(inside)  # contiguous: x grows with the output index
        lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, 0)
        box.append(slice(lo, hi))
        plans.append((d, taps[lo:hi], w[lo:hi]))
    pad = np.full(1, pad_value, np.float32)
    if post is not None:
        post(pad)
    if dtype.kind in "iu":
        pad_out = np.empty(1, dtype)
        _round_into(pad, pad_out)
        pad = pad_out
    # Work on the axes in memory order (nibabel arrays are Fortran-ordered, reoriented ones are
    # flipped views): gathers then copy contiguous rows and slabs instead of scattered voxels,
    # and the output is laid out in the same order so the last pass writes contiguous rows.
    perm = [int(p) for p in np.argsort([-abs(st) for st in a.strides], kind="stable")]
    a = a.transpose(perm)
    # shrink first: fewer voxels go through the later passes
    plans.sort(key=lambda p: len(p[1]) / vol.shape[p[0]])
    empty = any(sl.stop == sl.start for sl in box)
    for i, (d, taps, w) in enumerate([] if empty else plans[:-1]):
        a = _resample_axis(a, perm.index(d), taps, w, pre=pre if i == 0 else None)  # pre: on the input's values
    # the output is allocated only now (peak memory: the input, one intermediate and the output)
    out_p = np.empty([shape[p] for p in perm], dtype=dtype)
    out = out_p.transpose(np.argsort(perm))
    _fill_outside(out, box, pad[0])
    if not empty:
        d, taps, w = plans[-1]
        _resample_axis(a, perm.index(d), taps, w, out=out_p[tuple(box[p] for p in perm)], post=post)
    return out


def resample_to_grid(
    vol: Volume,
    spacing: Sequence[float],
    shape: Sequence[int],
    center: Sequence[float] | None = None,
    pad_value: float = -1024.0,
    interpolation: str = "linear",
    antialias: bool = True,
    post: Callable[[np.ndarray], None] | None = None,
    dtype: str | np.dtype = "float32",
    pre: Callable[[np.ndarray], None] | None = None,
) -> Volume:
    """Resample onto a canonical (R, A, S) grid of ``shape`` voxels of ``spacing`` mm.

    The grid is centred on ``center`` (RAS mm; default: the input's centre), so resampling and
    crop/pad happen in one pass and only the output voxels are computed. Voxels outside the
    input get ``pad_value``. ``post``, ``dtype``, ``pre``: see :func:`resample_to_affine`.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = np.asarray(shape, dtype=np.int64)
    if spacing.shape != (3,) or shape.shape != (3,) or (spacing <= 0).any() or (shape <= 0).any():
        raise VolumeError(f"invalid target grid: spacing {spacing.tolist()}, shape {shape.tolist()}")
    center = vol.center if center is None else np.asarray(center, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)  # canonical: i -> R, j -> A, k -> S
    affine[:3, 3] = center - spacing * (shape - 1) / 2.0
    return resample_to_affine(vol, affine, shape, pad_value, interpolation, antialias, post=post, dtype=dtype,
                              pre=pre)


def resample_to_affine(
    vol: Volume,
    affine: np.ndarray,
    shape: Sequence[int],
    pad_value: float = -1024.0,
    interpolation: str = "linear",
    antialias: bool = True,
    op: str = "resample",
    post: Callable[[np.ndarray], None] | None = None,
    dtype: str | np.dtype = "float32",
    pre: Callable[[np.ndarray], None] | None = None,
) -> Volume:
    """Resample ``vol`` onto the grid given by a voxel-to-RAS ``affine`` and ``shape``.

    ``pre`` is an elementwise in-place map of the input's values (any dtype) applied before they are
    interpolated: on the separable path to each gathered block of the first pass, otherwise to a copy of
    the input.

    ``post`` is an elementwise in-place map of float32 values (such as
    :func:`ctprep.intensity.window`) applied to the output, the padding included. The
    separable path applies it block by block while the block is in cache. An integer ``dtype``
    (int16 HU for storage) rounds the float32 values after ``post`` (half to even, clipped to
    the type's range), block by block as well.
    """
    dtype = np.dtype(dtype)
    if dtype != np.float32 and dtype.kind not in "iu":
        raise ValueError(f"output dtype must be float32 or an integer type, got {dtype}")
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}, got {interpolation!r}")
    out_lps = ras_to_lps(affine)
    out_spacing = np.sqrt((out_lps[:3, :3] ** 2).sum(axis=0))
    record = dict(spacing=out_spacing.round(6), shape=[int(s) for s in shape], interpolation=interpolation,
                  pad_value=pad_value, antialias=antialias)
    if dtype != np.float32:
        record["dtype"] = dtype.name
    if interpolation == "linear" and _axis_aligned(vol.affine) and _axis_aligned(affine):
        data = _separable(vol, affine, shape, pad_value, antialias, post, dtype, pre)
        return vol.new_like(data[None], affine, op=op, method="separable", **record)
    if pre is not None:  # SimpleITK copies the input anyway; this copy is mapped first
        mapped = vol.array.copy(order="K")
        pre(mapped)
        vol = vol.new_like(mapped)
    img = to_sitk(vol)
    # Axis-wise smoothing is only meaningful when input and output axes are (nearly) aligned.
    sigmas: list = []
    if antialias:
        in_dir = np.asarray(img.GetDirection()).reshape(3, 3)
        out_dir = out_lps[:3, :3] / out_spacing
        # output spacing as seen along each input axis
        along = np.abs(in_dir.T @ out_dir) @ out_spacing
        img, sigmas = _antialias(img, along.tolist())
    out = sitk.Resample(
        img,
        [int(s) for s in shape],
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        out_lps[:3, 3].tolist(),
        out_spacing.tolist(),
        (out_lps[:3, :3] / out_spacing).flatten().tolist(),
        float(pad_value),
        sitk.sitkFloat32,
    )
    out = from_sitk(out, vol, op=op, method="sitk", antialias_sigma_mm=sigmas, **record)
    if post is not None:
        post(out.array)  # GetArrayFromImage copied: the array is this function's own
    if dtype.kind in "iu":
        data = np.empty(out.array.shape, dtype)
        _round_into(out.array, data)
        out = out.new_like(data, out.affine)
    return out


def resize_to_shape(
    vol: Volume, shape: Sequence[int], interpolation: str = "linear", antialias: bool = True,
    post: Callable[[np.ndarray], None] | None = None, dtype: str | np.dtype = "float32",
    pre: Callable[[np.ndarray], None] | None = None,
) -> Volume:
    """Resize the whole field of view to ``shape`` voxels along the array axes (GenerateCT's recipe).

    The output covers exactly the input's extent, so spacing becomes ``extent / shape`` along each
    axis and the affine stays truthful (the paper's 128x128x201 loses the true spacing; we keep it).
    """
    shape = np.asarray(shape, dtype=np.int64)
    in_shape = np.asarray(vol.shape, dtype=np.float64)
    scale = in_shape / shape  # new voxel size in input-voxel units
    affine = vol.affine.copy()
    affine[:3, :3] = vol.affine[:3, :3] * scale
    # the outer edges of the grids coincide (align_corners=False): shift the first centre
    affine[:3, 3] = vol.affine[:3, :3] @ ((scale - 1.0) / 2.0) + vol.affine[:3, 3]
    return resample_to_affine(vol, affine, shape, pad_value=-1024.0, interpolation=interpolation,
                              antialias=antialias, op="resize", post=post, dtype=dtype, pre=pre)
