"""One training step of every paper-size model on the CPU at the real paper geometry (the `paper` presets).

Prep grid 512 x 512 x 201 at 0.75 x 0.75 x 1.5 mm, tokenizer 128 x 128 x 201 (lowres_scale 4), 101 x 8 x 8
tokens, super-resolution 128 -> 512: what GenerateCT trains on 80 GB GPUs. Each model runs in its own
process (peak memory is the process's; the super-resolution UNet at 512 px peaks near 11 GiB), under bf16
autocast where the CPU computes in bf16 (``cpu_computes_bf16``), as on a GPU. Slow by nature: about a
minute each on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctgen.jobs.geometry import check_geometry
from ctgen.jobs.smoke import paper_config as smoke_config

ROOT = Path(__file__).resolve().parents[2]
CHILD = r"""
import json, sys, yaml, torch
torch.set_num_threads(2)
from ctgen.jobs.smoke import cpu_computes_bf16, training_step
cfg = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(training_step(sys.argv[2], cfg, batch_size=1, precision="bf16" if cpu_computes_bf16() else "auto")))
"""


def paper_config() -> dict:
    return smoke_config(yaml.safe_load((ROOT / "config.yaml").read_text()))  # as benchmarks/gpu_smoke.py sets it


def test_the_readme_ct_rate_example_fits_the_shipped_presets():
    """The config a user copies from README's "Using a real CT-RATE copy", merged into config.yaml, passes."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using a real CT-RATE copy"):]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    for key, value in example.items():
        config[key] = {**config.get(key, {}), **value}
    assert check_geometry(config)["prep"] == (512, 512, 201)


def test_paper_presets_fit_together():
    grids = check_geometry(paper_config())
    assert grids == {"prep": (512, 512, 201), "lowres": (201, 128, 128), "tokens": (101, 8, 8)}


@pytest.mark.parametrize("kind", ["tokenizer", "generator", "superres", "clip", "classifier"])
def test_one_training_step_at_paper_geometry(kind, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(paper_config()))
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), kind], capture_output=True, text=True,
                         timeout=1500, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["model"] == kind and math.isfinite(out["loss"]) and out["parameters"] > 4e7
    assert out["batch_size"] == (2 if kind == "clip" else 1)
