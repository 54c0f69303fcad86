"""A training job that reads every volume of its cohort: its peak memory at 4N is its peak at N
(``benchmarks/train_stream.py``; the rehearsal's jobs read 2 volumes at either size)."""

from __future__ import annotations

import pytest

from tests.workflow.wf import benchmark

VOXELS = 128 * 128 * 64  # the benchmark's volumes: 2 MiB as int16, 4 MiB as float32


def test_the_train_stream_benchmark_sees_the_volumes_held():
    """24 added volumes held as int16 (48 MiB) on a 462 MiB peak are 1.10x, within the 1.2 ratio; the bound on the
    growth (half their int16 size, 24 MiB) sees them; flat figures pass; the ratio still binds."""
    bench = benchmark("train_stream")
    held = 24 * VOXELS * 2 / 2**20
    ok, line = bench.verdict([8, 32], [462.0, 462.0 + held], VOXELS)
    assert not ok and "MISSES" in line and "target <= 24 MiB" in line and "1.10" in line
    ok, line = bench.verdict([8, 32], [312.4, 312.6], VOXELS, "data worker's peak")  # the README's figures
    assert ok and line.startswith("data worker's peak") and "growth 0 MiB" in line
    assert not bench.verdict([8, 32], [300.0, 370.0], VOXELS * 10)[0]  # 1.23


def test_a_training_job_reading_every_volume_does_not_grow_with_the_cohort(tmp_path, capsys):
    """The benchmark itself at N = 4: the classifier reads 4, then 16 volumes of 2 MiB, one epoch each, in fresh
    processes. The bound is 12 MiB; holding the 12 added volumes would add 24 MiB as int16, 48 as float32
    (the training process's peak is reproducible within 1 MiB with the benchmark's fixed mmap threshold)."""
    bench = benchmark("train_stream")
    assert bench.main(["--n", "4", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 steps of batch 1" in out and "16 steps of batch 1" in out
    assert "target <= 12 MiB" in out and "within the targets" in out


def holding(decode: str) -> str:
    """Code prepended to the benchmark's child: ``ctgen.data.batches.<decode>`` keeps every sample it decodes (as
    float32, as the models read them), as a per-sample cache or leak in the data path would."""
    return f"""\
from ctgen.data import batches as _batches
_decode, _held = _batches.{decode}, []


def _holding(*args, **kwargs):
    decode = _decode(*args, **kwargs)

    def held(raw):
        _held.append(decode(raw))
        return _held[-1]

    return held


_batches.{decode} = _holding
"""


#: the latent flow model's decode holding mu and sigma (64 KiB a latent of the demo grid)
HOLD_LATENTS = holding("latent_decode")


def test_the_benchmark_sees_the_latent_flow_model_holding_its_latents(tmp_path, capsys, monkeypatch):
    """The latent flow model at N = 16 with its decode made to hold every latent: the 48 added latents as float32
    (3 MiB) exceed the bound (half their float16 size, 0.75 MiB); unpatched, its peak grew 0.3 MiB from 64 to 256."""
    bench = benchmark("train_stream")
    monkeypatch.setattr(bench, "CHILD", HOLD_LATENTS + bench.CHILD)
    assert bench.main(["--model", "latent_flow", "--n", "16", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "16 steps of batch 1" in out and "64 steps of batch 1" in out
    assert "48 added latents as float16" in out and "MISSES the targets" in out


@pytest.mark.parametrize("model,steps", [("superres", (8, 32)), ("clip", (4, 16))], ids=["superres", "clip"])
def test_the_super_resolution_model_and_clip_reading_every_volume_do_not_grow(model, steps, tmp_path, capsys):
    """The demo super-resolution model (4 slices of one volume a step) and CLIP (2 volumes a step) at N = 8, on
    volumes of the demo prep grid (64 x 64 x 32: 256 KiB as int16): the bound is 3 MiB; holding the 24 added volumes
    would add 6 MiB as int16, 12 as float32. (At N = 4 the super-resolution job's peak is still settling: it rises
    until its 6th step, a 2 MiB growth from 4 to 16 on a 1.5 MiB bound with no volume held.)"""
    bench = benchmark("train_stream")
    assert bench.main(["--model", model, "--n", "8", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(f"{s} steps of batch" in out for s in steps) and "64x64x32" in out
    assert "target <= 3 MiB" in out and "within the targets" in out


#: the volume decode holding every volume (512 KiB a volume of the demo grid)
HOLD_VOLUMES = holding("volume_decode")


def test_the_benchmark_sees_clip_holding_its_volumes(tmp_path, capsys, monkeypatch):
    """CLIP at N = 4 with its decode made to hold every volume: the 12 added volumes as float32 (6 MiB) exceed the
    bound (half their int16 size, 1.5 MiB); unpatched its peak grew 0.2 MiB from 4 to 16."""
    bench = benchmark("train_stream")
    monkeypatch.setattr(bench, "CHILD", HOLD_VOLUMES + bench.CHILD)
    assert bench.main(["--model", "clip", "--n", "4", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "2 steps of batch 2 volumes" in out and "8 steps of batch 2 volumes" in out
    assert "12 added volumes as int16" in out and "MISSES the targets" in out
