"""The one volume type: an array that carries its affine and its history.

Conventions (as in MONAI and TorchIO):

- ``array`` is channel-first, ``(C, I, J, K)``, its spatial axes in the order of the affine's
  columns. CT volumes have ``C == 1``.
- ``affine`` is a 4x4 float64 matrix mapping voxel indices ``(i, j, k, 1)`` to **RAS+** millimetres:
  +x points to the patient's Right, +y Anterior, +z Superior (nibabel's world convention).
- ``meta`` holds the source path, the intensity convention and ``history``: every applied step
  with its arguments, appended by :meth:`Volume.new_like` (like MONAI's ``applied_operations``).

DICOM and SimpleITK speak LPS; :func:`lps_to_ras` / :func:`ras_to_lps` are the only places
where that flip happens.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from ctprep.errors import UserError

logger = logging.getLogger(__name__)

#: Flip between LPS (DICOM, ITK) and RAS (NIfTI, nibabel): negate x and y.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: ``sizeof_hdr`` of a NIfTI-2 header (NIfTI-1: 348).
_NIFTI2_SIZEOF_HDR = 540

#: The project's canonical orientation: array axes i, j, k increase towards R, A, S.
CANONICAL = ("R", "A", "S")


def lps_to_ras(affine_lps: np.ndarray) -> np.ndarray:
    """Turn a voxel-to-LPS affine into a voxel-to-RAS affine (the flip is its own inverse)."""
    return _LPS_RAS @ np.asarray(affine_lps, dtype=np.float64)


def ras_to_lps(affine_ras: np.ndarray) -> np.ndarray:
    """Turn a voxel-to-RAS affine into a voxel-to-LPS affine."""
    return _LPS_RAS @ np.asarray(affine_ras, dtype=np.float64)


class VolumeError(ValueError):
    """A volume that cannot be used; the message names the reason (it lands in rejects)."""


@dataclass(frozen=True)
class Volume:
    """A CT volume: channel-first array, voxel-to-RAS affine, metadata with history."""

    array: np.ndarray  # (C, I, J, K)
    affine: np.ndarray  # (4, 4) float64, voxel -> RAS mm
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise VolumeError(f"expected a (C, I, J, K) array, got shape {self.array.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise VolumeError(f"affine must be a finite 4x4 matrix, got {aff!r}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise VolumeError("affine is singular (zero spacing or degenerate directions)")
        object.__setattr__(self, "affine", aff)
        self.meta.setdefault("history", [])
        self.meta.setdefault("space", "RAS")

    # --- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (I, J, K)."""
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def orientation(self) -> tuple[str, ...]:
        """Closest axis codes, e.g. ``('R', 'A', 'S')`` or ``('L', 'P', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))

    @property
    def center(self) -> np.ndarray:
        """RAS position (mm) of the geometric centre of the voxel grid."""
        ijk = (np.array(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.affine[:3, :3] @ ijk + self.affine[:3, 3]

    @property
    def data(self) -> np.ndarray:
        """The single channel as an (I, J, K) view."""
        if self.array.shape[0] != 1:
            raise VolumeError(f"expected one channel, got {self.array.shape[0]}")
        return self.array[0]

    def __repr__(self) -> str:  # like TorchIO's: what a reader needs to trust the geometry
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        org = ", ".join(f"{o:.1f}" for o in self.origin)
        return (
            f"Volume(shape={self.shape}, channels={self.array.shape[0]}, dtype={self.array.dtype}, "
            f"spacing=({sp}) mm, origin=({org}) mm, orientation={''.join(self.orientation)}, "
            f"steps={[h['op'] for h in self.meta['history']]})"
        )

    # --- derivation -----------------------------------------------------------------------
    def new_like(
        self, array: np.ndarray, affine: np.ndarray | None = None, op: str | None = None, **args: Any
    ) -> Volume:
        """A new volume with ``array`` (and ``affine``), recording ``op`` and its arguments."""
        meta = copy.deepcopy(self.meta)
        if op is not None:
            meta["history"].append({"op": op, **{k: _plain(v) for k, v in args.items()}})
        return Volume(array, self.affine if affine is None else affine, meta)

    @classmethod
    def from_3d(cls, data: np.ndarray, affine: np.ndarray, **meta: Any) -> Volume:
        """Wrap an (I, J, K) array."""
        return cls(np.asarray(data)[None], affine, dict(meta))


def _plain(value: Any) -> Any:
    """Arguments as JSON-friendly plain data, so history travels into shard JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- NIfTI I/O ----------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """File bytes, gunzipped with ISA-L where the file is gzip.

    ISA-L's igzip decompresses about 3x faster than zlib, which is the floor of NIfTI loading
    at CT-RATE scale (a 512x512x300 volume spends ~1 s in zlib alone).
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        from isal import igzip

        try:
            return igzip.decompress(raw)
        except (OSError, EOFError, ValueError) as err:  # truncated or corrupt stream
            raise VolumeError(f"corrupt or truncated gzip stream in {path.name}: {err}") from err
    return raw


def _voxels(img: nib.Nifti1Image, raw: bytes, name: str) -> np.ndarray:
    """The image's voxels as an array over ``raw`` itself, with the header's scaling applied.

    nibabel would copy the voxels out of the decompressed bytes (~0.1 s for a 512x512x300 int16
    volume); a view of them costs nothing. The view is read-only (``raw`` is immutable): every
    preprocessing step writes new arrays, and an accidental in-place write raises.
    """
    proxy = img.dataobj  # nibabel's ArrayProxy: where the voxels are and how to scale them
    shape, dtype, offset = tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) < offset + nbytes:
        raise VolumeError(f"truncated NIfTI {name}: {len(raw) - offset} voxel bytes, header needs {nbytes}")
    data = np.ndarray(shape, dtype, buffer=raw, offset=offset, order=proxy.order)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if (slope, inter) != (1.0, 0.0):
        # nibabel's own scaling rule (output dtype included), as np.asarray(img.dataobj) applies it
        data = apply_read_scaling(data, slope, inter)
    return data


#: NIfTI spatial unit codes (the low 3 bits of ``xyzt_units``) as a factor to mm: 1 meter, 2 mm, 3 micron.
#: 0 ("unknown", most files) and the codes NIfTI leaves undefined (4-7) are read as mm, as ITK reads them.
#: The code is read from the bits, not with nibabel's ``get_xyzt_units``: that raises KeyError on a time code
#: NIfTI does not define (bits 3-5), in a file nibabel reads fine, and the volume's space needs no time unit.
_UNIT_MM = {1: 1000.0, 2: 1.0, 3: 0.001}


def _spatial_unit_mm(header, name: str) -> float:
    """The header's spatial unit, in mm."""
    code = int(header["xyzt_units"]) & 7
    if code not in _UNIT_MM and code != 0:
        logger.warning("%s: undefined spatial unit code %d in xyzt_units; reading millimetres", name, code)
    return _UNIT_MM.get(code, 1.0)


def corner_distance(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """How far apart (mm) two voxel-to-world affines put a volume of ``shape``: the largest distance between
    where each places one of its 8 corner voxels."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    return float(np.linalg.norm(((np.asarray(a) - np.asarray(b)) @ corners)[:3], axis=0).max())


def _warn_if_transforms_disagree(header, shape: tuple[int, ...], name: str) -> None:
    """Both transforms set but placing the volume differently: this reads the sform (as nibabel does), ITK the
    qform where the sform code is 2 or 4, so tools would disagree about the same file. Said, not refused."""
    if int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        try:
            qform = header.get_qform()
        except ValueError as err:  # nibabel refuses a quaternion that is not unit; the sform it reads is fine
            logger.warning("%s: its qform is unreadable (%s); reading the sform (code %d), as nibabel does (ITK "
                           "reads the qform where the sform code is 2 or 4)", name, err, int(header["sform_code"]))
            return
        off = corner_distance(qform, header.get_sform(), shape)
        if off > 0.5:  # mm at a corner of the volume
            logger.warning("%s: its qform and sform place the volume up to %.1f mm apart; reading the sform "
                           "(code %d), as nibabel does (ITK reads the qform where the sform code is 2 or 4)",
                           name, off, int(header["sform_code"]))


def load_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file as stored (header scaling applied, no metadata rescale)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    raw = _read_bytes(path)
    try:
        # sizeof_hdr (first 4 bytes, either byte order) tells NIfTI-2 (540, 64-bit dims, written by some
        # converters and by FSL/Connectome tools) from NIfTI-1 (348); nibabel's classes read one each
        nifti2 = raw[:4] in (_NIFTI2_SIZEOF_HDR.to_bytes(4, "little"), _NIFTI2_SIZEOF_HDR.to_bytes(4, "big"))
        img = (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)  # the voxels stay in raw
        data = _voxels(img, raw, path.name)
    except VolumeError:
        raise
    except Exception as err:  # nibabel raises a zoo of types for broken headers
        raise VolumeError(f"unreadable NIfTI {path.name}: {err}") from err
    unit = _spatial_unit_mm(img.header, path.name)
    # the affine is in the header's units; ITK converts metres and microns to mm too
    affine = img.affine if unit == 1.0 else np.diag([unit] * 3 + [1.0]) @ img.affine
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1), and (x, y, z, 1, 1) as some ITK writers give
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"expected a 3D volume, {path.name} has shape {data.shape}")
    if min(data.shape) < 2:  # a slice stored as (x, y, 1): prep would spread one slab over a grid of air
        raise VolumeError(f"{path.name} has shape {data.shape}: a volume needs at least 2 voxels along each axis")
    _warn_if_transforms_disagree(img.header, data.shape, path.name)
    descrip = img.header["descrip"]
    return Volume.from_3d(
        data,
        affine,
        source=str(path),
        header_qform_code=int(img.header["qform_code"]),
        header_sform_code=int(img.header["sform_code"]),
        header_descrip=(descrip.item() if hasattr(descrip, "item") else bytes(descrip)).decode("latin-1").rstrip("\x00"),
    )


def is_sheared(affine: np.ndarray, atol: float = 1e-4) -> bool:
    """Whether the voxel axes of ``affine`` are not orthogonal (a gantry-tilted stack), so that no qform holds it."""
    axes = np.asarray(affine, np.float64)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    return bool(np.abs(axes.T @ axes - np.eye(3)).max() > atol)


def to_nifti(vol: Volume, dtype: str | np.dtype | None = "int16", descrip: str = "") -> nib.Nifti1Image:
    """A nibabel image of the single-channel volume, rounding to ``dtype`` where integer."""
    data = vol.data
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.kind in "iu" and data.dtype != dt:
            info = np.iinfo(dt)
            data = np.clip(data, info.min, info.max)  # one temporary (a grid is 100s of MB) ...
            if data.dtype.kind == "f":
                np.rint(data, out=data)  # ... rounded in place
        data = data.astype(dt, copy=False)
    img = nib.Nifti1Image(data, vol.affine)
    if is_sheared(vol.affine):
        # a gantry-tilted stack: the qform (a rotation) cannot hold the shear and nibabel would drop it there,
        # so ITK-based tools (which read the qform first) would place the slices up to cm off. The sform alone
        # holds it: nibabel and ctprep read it, ITK refuses the file instead of misplacing it.
        img.header.set_qform(None, code=0)
    else:
        img.header.set_qform(vol.affine, code=1)  # scanner anat
    img.header.set_sform(vol.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode()[:79]
    return img


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` a temporary file beside ``path``, then rename it: a killed job leaves no half file.

    ``write`` gets the temporary path (for writers that take a path, such as safetensors).
    """
    path = Path(path)
    if path.is_dir():  # named before the work, and by the user's path (not the temporary file's)
        raise IsADirectoryError(errno.EISDIR, "Is a folder, where a file is to be written", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """``payload`` written atomically to ``path`` (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def check_nifti_path(path: str | Path) -> None:
    """A NIfTI output's name ends in .nii or .nii.gz and is not a folder: checked before the work, not after (a
    ``x.txt`` was written as NIfTI). Here, below both packages, for ctprep's commands and ctgen's sampling alike."""
    if not (Path(path).name.endswith(".nii.gz") or Path(path).name.endswith(".nii")):
        raise UserError(f"NIfTI path must end in .nii or .nii.gz, got {Path(path).name}")
    if Path(path).is_dir():
        raise UserError(f"NIfTI path {path} is a folder")


def save_nifti(
    vol: Volume,
    path: str | os.PathLike,
    dtype: str | np.dtype | None = "int16",
    descrip: str = "",
    compresslevel: int = 1,
) -> None:
    """Write ``vol`` as NIfTI (gzip with ISA-L where the name ends in .gz), atomically."""
    path = Path(path)
    payload = to_nifti(vol, dtype, descrip).to_bytes()
    if path.suffix == ".gz":
        from isal import igzip

        # ISA-L levels are 0-3; level 1 writes ~10x faster than zlib's default at ~same size.
        payload = igzip.compress(payload, compresslevel=min(max(compresslevel, 0), 3), mtime=0)  # reproducible bytes
    atomic_write_bytes(path, payload)
