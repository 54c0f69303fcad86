import numpy as np
import pytest

from ctprep.intensity import clip_hu, denormalise, detect_convention, normalise, to_hu
from ctprep.volume import Volume, VolumeError, load_nifti


@pytest.mark.parametrize("intercept", [-1024.0, -8192.0])
def test_real_scans_hu_or_raw_decided_per_volume(real_nifti, intercept):
    vol = load_nifti(real_nifti)
    hu = vol.data.astype(np.int32)
    # stored as HU (the _fixed release) while the metadata still lists the rescale
    out = to_hu(Volume.from_3d(hu, vol.affine), 1.0, intercept)
    assert out.meta["stored_convention"] == "hu"
    np.testing.assert_array_equal(out.data, hu)  # not rescaled a second time
    # stored raw (the original release): raw = HU - intercept
    raw = Volume.from_3d((hu - intercept).astype(np.int32), vol.affine)
    out = to_hu(raw, 1.0, intercept)
    assert out.meta["stored_convention"] == "raw"
    np.testing.assert_array_equal(out.data, hu)


def test_forced_convention_and_history():
    data = np.full((4, 4, 4), 24, np.int16); data[0] = 1064
    out = to_hu(Volume.from_3d(data, np.eye(4)), 1.0, -1024.0, convention="raw")
    assert out.data.min() == -1000 and out.meta["history"][-1]["forced"] is True
    with pytest.raises(VolumeError, match="twice"):
        to_hu(out, 1.0, -1024.0)


def test_bad_intensities_are_refused():
    with pytest.raises(VolumeError, match="NaN"):
        to_hu(Volume.from_3d(np.array([[[np.nan, 1.0]]], np.float32), np.eye(4)), 1, 0)
    with pytest.raises(VolumeError, match="constant"):
        to_hu(Volume.from_3d(np.zeros((3, 3, 3), np.int16), np.eye(4)), 1, -1024)
    with pytest.raises(VolumeError, match="no CT"):
        detect_convention(np.random.default_rng(0).uniform(5000, 6000, (20, 20, 20)), 1.0, -1024.0)


def test_clip_and_normalise_roundtrip():
    vol = Volume.from_3d(np.linspace(-2000, 2000, 64, dtype=np.float32).reshape(4, 4, 4), np.eye(4))
    c = clip_hu(vol, -1000, 1000)
    assert c.data.min() == -1000 and c.data.max() == 1000
    assert vol.data.min() == -2000  # a new volume; the input is untouched
    n = normalise(c, -1000, 1000)
    assert n.data.min() == -1 and n.data.max() == 1
    np.testing.assert_allclose(denormalise(n.data, -1000, 1000), c.data, atol=1e-3)


def test_an_inverted_hu_window_is_refused():
    """[1000, -1000] clipped every voxel to -1000 without a word."""
    from ctprep.intensity import check_window, clip_hu, window

    for call in (lambda: check_window(1000, -1000), lambda: window(1000.0, -1000.0),
                 lambda: clip_hu(Volume.from_3d(np.zeros((2, 2, 2), np.int16), np.eye(4)), 0, 0)):
        with pytest.raises(ValueError, match="low bound must be below the high one"):
            call()
