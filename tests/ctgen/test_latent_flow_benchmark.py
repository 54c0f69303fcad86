"""benchmarks/latent_flow.py on small latents: the documented smoke test's whole decodes, the split decode skipped
where MAISI's splitting cannot split the sub-latent, and only running out of memory reported as a failed decode."""

from __future__ import annotations

from tests.workflow.wf import benchmark


def test_the_split_sizes_maisi_convolution_takes():
    """It drops the rows past the last whole chunk (J = 30, the preset's 1/64, runs as 28) and reads outside the
    tensor where a chunk is shorter than its 3-row overlap (J = 8: none)."""
    bench = benchmark("latent_flow")
    assert [bench.splittable(j) for j in (4, 8, 11, 12, 14, 30, 120)] == [0, 0, 0, 12, 12, 28, 120]


def test_the_smoke_test_decodes_whole_and_skips_the_split_it_cannot_make(capsys):
    """``--latent 8 16 16`` (the docstring's smoke test; the flow forwards and the window decode skipped here, a
    few CPU s): the 2 x 4 x 4 sub-latent decodes whole; the split is skipped, saying why, and the run passes."""
    bench = benchmark("latent_flow")
    assert bench.main(["--latent", "8", "16", "16", "--skip", "flow,window", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| decode, whole latent, no splitting |" in out and "measured on 1/64 of the latent (2x4x4" in out
    assert "| whole_split | skipped | | the sub-latent 2x4x4 is too small to split" in out
    assert "failed" not in out


def test_an_error_other_than_running_out_of_memory_is_not_a_failed_decode():
    """The split decode of a 4 x 8 x 8 latent is refused by the autoencoder (J = 8 does not split into 4 chunks of 3
    rows; MONAI itself raised a RuntimeError there; no memory involved): the measurement records an error, which
    fails the run, instead of a decode that "failed" as if for memory."""
    bench = benchmark("latent_flow")
    r = bench.measure("decode_whole", 1, bench.PRESET, device="cpu", latent_shape=[4, 8, 8], num_splits=4,
                      mem_limit_gib=None)
    assert "error" in r and "split axis" in r["error"] and "failed" not in r
