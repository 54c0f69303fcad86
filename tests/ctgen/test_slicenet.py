"""SliceNet, the 2D FID's feature network: save/load, learning its targets, and its training batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ctgen.jobs.train import run_training, slicenet_collate
from ctgen.metrics.slices import PLANES, take_slice
from ctgen.models.slicenet import SliceNet, SliceNetConfig, resize_slices

TINY = {"image_size": 16, "channels": [8, 16], "blocks": [1, 1], "norm_groups": 4}


def test_save_and_load_give_identical_features(tmp_path):
    torch.manual_seed(0)
    net = SliceNet(SliceNet.config_from_dict(TINY)).eval()
    x = torch.rand(3, 1, 20, 12) * 2 - 1  # any slice size: resized inside
    net.save_pretrained(tmp_path / "s", seed=0)
    back = SliceNet.from_pretrained(tmp_path / "s").eval()
    assert torch.equal(net.features(x), back.features(x)) and net.features(x).shape == (3, 16)
    with pytest.raises(ValueError, match="norm_groups"):
        SliceNetConfig(channels=(6,), blocks=(1,), norm_groups=4)


def test_it_learns_plane_and_position_of_real_like_slices():
    """Overfit a fixed batch: the plane is read off the slice shape/anatomy, the position off the level."""
    torch.manual_seed(0)
    z, y, x = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16),
                             indexing="ij")
    body = (x / 0.9) ** 2 + (y / 0.55) ** 2 < 0.9 - 0.3 * z  # an elliptic cone: wide left-right, its size tracks z
    spine = (x ** 2 + (y + 0.4) ** 2) < 0.04  # posterior, on the midline
    volume = torch.where(spine, 1.0, torch.where(body, 0.1 * z, -1.0))  # (D, H, W) in [-1, 1]
    cuts, planes, positions = [], [], []
    for p, plane in enumerate(PLANES):
        for i in range(3, 13, 2):  # inside the body: blank edge slices look alike in every plane
            cuts.append(take_slice(volume, plane, i)[None])
            planes.append(p)
            positions.append(i / 15)
    batch = {"slices": torch.stack(cuts), "plane": torch.tensor(planes), "position": torch.tensor(positions),
             "labels": torch.full((len(cuts), 18), float("nan"))}
    net = SliceNet(SliceNet.config_from_dict(TINY))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = net(**batch)
    for _ in range(150):
        out = net(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.plane_accuracy == 1.0 and out.position_loss < 0.5 * first.position_loss, (first, out)
    assert out.label_loss == 0  # every label unknown: no label term


def test_collate_cuts_slices_as_the_fid_does():
    vol = torch.linspace(-1, 1, 8 * 12 * 10).reshape(1, 8, 12, 10)
    labels = torch.tensor([1.0] + [float("nan")] * 17)
    gen = torch.Generator().manual_seed(0)
    batch = slicenet_collate(5, 16)([{"volume": vol, "labels": labels}], gen)
    assert batch["slices"].shape == (5, 1, 16, 16) and batch["labels"].shape == (5, 18)
    draws = torch.Generator().manual_seed(0)  # replay the draws to check each slice
    plane_ids = torch.randint(3, (5,), generator=draws).tolist()
    for k, p in enumerate(plane_ids):
        size = vol.shape[1:][p]
        index = int(torch.randint(size, (1,), generator=draws))
        want = resize_slices(take_slice(vol[0], PLANES[p], index)[None, None], 16)[0]
        assert torch.allclose(batch["slices"][k], want) and batch["plane"][k] == p
        assert batch["position"][k] == pytest.approx(index / (size - 1))


def test_trains_through_the_one_loop(cohort, tmp_path):
    cfg = {"model": TINY, "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                                    "tensorboard": False, "seed": 0},
           "data": {"manifests": [cohort["manifest"]], "hu_window": [-1000, 1000], "slices_per_volume": 4}}
    out = run_training("slicenet", cfg, tmp_path / "slicenet", tmp_path / "ckpt")
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].max() == 4 and np.isfinite(metrics["loss"]).all()
    assert {"plane_accuracy", "position_loss", "label_loss"} <= set(metrics.columns)
    assert "2D CNN" in (out / "README.md").read_text()  # the model card names its role
    with pytest.raises(ValueError, match="multiple"):
        run_training("slicenet", {**cfg, "train": {**cfg["train"], "batch_size": 6}}, tmp_path / "b", tmp_path / "c")
