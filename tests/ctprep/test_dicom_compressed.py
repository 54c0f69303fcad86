"""Compressed DICOM, as PACS exports write it, reads to exactly the HU volume of the uncompressed series.

The real series (tests/data/example_ct_dicom, JPEG 2000 lossless) is decoded once into an uncompressed
copy, which is transcoded in ``tmp_path`` into each lossless transfer syntax: pydicom's own encoders for
RLE Lossless, JPEG 2000 (pylibjpeg-openjpeg) and the deflated syntax, GDCM's ImageChangeTransferSyntax
(python-gdcm) for JPEG Lossless and JPEG-LS. Only the pixel data change; every other element stays as
pydicom wrote it. SimpleITK (its own GDCM) reads each transcoded series as the independent reference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from ctprep.cli import main as ctprep_main
from ctprep.dicom import SeriesError, convert_folder, read_series
from tests.ctprep.test_dicom import EXAMPLE, by_position, enhanced_ct, sitk_affine_ras, sitk_ijk, sitk_series

#: syntax -> who encodes it here; each is decoded by a package of pyproject's core dependencies
SYNTAXES = {
    JPEGLossless: "gdcm",  # 1.2.840.10008.1.2.4.57, Process 14 (GDCM writes selection value 1)
    JPEGLosslessSV1: "gdcm",  # 1.2.840.10008.1.2.4.70, the most common lossless CT syntax
    JPEGLSLossless: "gdcm",  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless: "gdcm",  # 1.2.840.10008.1.2.4.81, written with NEAR = 0 (every sample exact)
    RLELossless: "pydicom",  # 1.2.840.10008.1.2.5
    DeflatedExplicitVRLittleEndian: "deflate",  # 1.2.840.10008.1.2.1.99: the whole data set zlib-deflated
    JPEG2000Lossless: "pydicom",  # 1.2.840.10008.1.2.4.90 (pylibjpeg-openjpeg), as the bundled series
}


def _gdcm():
    return pytest.importorskip("gdcm", reason="python-gdcm (GDCM's ImageChangeTransferSyntax) encodes JPEG Lossless "
                                              "and JPEG-LS here; pydicom has no encoder of its own for them")


def encode(ds: pydicom.Dataset, syntax: UID, scratch: Path) -> pydicom.Dataset:
    """``ds`` (uncompressed) with its pixel data in ``syntax``; the other elements as they were."""
    ds = copy.deepcopy(ds)
    how = SYNTAXES[syntax]
    if how == "deflate":
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom deflates the data set when it writes the file
    elif how == "pydicom":
        ds.compress(syntax)
    else:
        gdcm = _gdcm()
        # GDCM's writer wants a SOP Class/Instance UID in the data set (the bundled series has them empty):
        # give them to its input only, and take nothing back but the encapsulated pixel data
        tmp = copy.deepcopy(ds)
        tmp.SOPClassUID = tmp.file_meta.MediaStorageSOPClassUID
        tmp.SOPInstanceUID = tmp.file_meta.MediaStorageSOPInstanceUID
        src, out = scratch / "gdcm_in.dcm", scratch / "gdcm_out.dcm"
        tmp.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(syntax))))
        if syntax == JPEGLSNearLossless:
            codec = gdcm.JPEGLSCodec()
            codec.SetLossless(False)
            codec.SetLossyError(0)
            change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(out))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        encoded = pydicom.dcmread(out)
        assert encoded.file_meta.TransferSyntaxUID == syntax
        ds["PixelData"] = encoded["PixelData"]
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def transcode(src: Path, dst: Path, syntax: UID) -> Path:
    """Every file of ``src`` (uncompressed) written to ``dst`` in ``syntax``, under the same names."""
    dst.mkdir()
    for path in sorted(src.iterdir()):
        encode(pydicom.dcmread(path), syntax, dst.parent).save_as(dst / path.name, enforce_file_format=True)
    for path in (dst.parent / "gdcm_in.dcm", dst.parent / "gdcm_out.dcm"):
        path.unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The bundled series with its pixel data decoded: Explicit VR Little Endian."""
    folder = tmp_path_factory.mktemp("raw") / "raw"
    folder.mkdir()
    for path in sorted(EXAMPLE.iterdir()):
        ds = pydicom.dcmread(path)
        ds.decompress()
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def reference(raw):
    vol = read_series(raw)
    np.testing.assert_array_equal(vol.data, read_series(EXAMPLE).data)  # the J2K original, SimpleITK's voxels
    return vol


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=[str(s) for s in SYNTAXES])
def test_compressed_series_reads_exactly_like_uncompressed(raw, reference, tmp_path, syntax):
    folder = transcode(raw, tmp_path / "series", syntax)
    assert {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            for p in folder.iterdir()} == {syntax}
    vol = read_series(folder)
    assert vol.meta["transfer_syntax"] == [syntax.name]
    assert vol.data.dtype == reference.data.dtype == np.int16
    assert np.array_equal(vol.data, reference.data)
    np.testing.assert_allclose(vol.affine, reference.affine, rtol=0, atol=1e-6)
    img = sitk_series(folder)  # SimpleITK's GDCM decodes every syntax here
    assert np.array_equal(sitk_ijk(img), reference.data)
    np.testing.assert_allclose(vol.affine, sitk_affine_ras(img), atol=1e-4)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless, RLELossless], ids=str)
def test_compressed_enhanced_multiframe_ct(reference, tmp_path, syntax):
    # the enhanced fixture of test_dicom (frames shuffled, rescale shared), its frames then compressed
    folder = enhanced_ct(EXAMPLE, tmp_path / "enhanced", per_frame_rescale=False)
    path = folder / "enhanced.dcm"
    ds = encode(pydicom.dcmread(path), syntax, tmp_path)
    (tmp_path / "gdcm_in.dcm").unlink(missing_ok=True)
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    vol = read_series(folder)
    assert np.array_equal(vol.data, reference.data)
    np.testing.assert_allclose(vol.affine, reference.affine, rtol=0, atol=1e-6)
    assert vol.meta["transfer_syntax"] == [syntax.name] and vol.meta["n_slices"] == 20


def truncate_fragment(path: Path) -> None:
    """Cut the one encapsulated fragment of ``path`` to half its length, as an interrupted transfer leaves it."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2 & ~1]])
    ds.save_as(path)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless, RLELossless], ids=str)
def test_corrupted_compressed_slice_is_a_one_line_reject(raw, tmp_path, capsys, syntax):
    root = tmp_path / "in"
    root.mkdir()
    folder = transcode(raw, root / "a_corrupt", syntax)
    bad = by_position(folder)[7]
    truncate_fragment(bad)
    with pytest.raises(SeriesError) as info:
        read_series(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot decode pixel data of {bad.name} ({syntax.name} {syntax}; decoded by ")
    assert ("pydicom" if syntax == RLELossless else "python-gdcm") in message
    # the conversion goes on and rejects it with that line; the CLI prints it, no traceback
    metadata, rejects = convert_folder(root, tmp_path / "out")
    assert metadata.empty and list(rejects["reason"]) == [message]
    assert ctprep_main(["dicom2nifti", str(folder), str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"ctprep: error: {message}" and "Traceback" not in "".join(err)


def test_12bit_jpeg_extended_names_the_missing_decoder(raw, tmp_path):
    # No permissively licensed plugin decodes 12-bit JPEG Extended (pylibjpeg-libjpeg, GPL-3, does): the
    # refusal names the syntax and that package. (A JPEG stream relabelled as 1.2.840.10008.1.2.4.51: no
    # encoder for the syntax is installed, and the decoders refuse 12-bit samples before they read the stream.)
    folder = transcode(raw, tmp_path / "s", JPEGLosslessSV1)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
        ds.save_as(path)
    expected = (r"^cannot decode pixel data of CT\.\S+ \(JPEG Extended \(Process 2 and 4\) "
                r"1\.2\.840\.10008\.1\.2\.4\.51; decoded by .*pylibjpeg-libjpeg \(GPL-3")
    with pytest.raises(SeriesError, match=expected) as info:
        read_series(folder)
    assert "\n" not in str(info.value)
