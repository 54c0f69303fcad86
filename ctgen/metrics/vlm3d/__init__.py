"""The VLM3D 2026 text-to-CT evaluation protocols, as the challenge's code computes them, and the papers' variant.

* :func:`fvd_ctnet` (FVD_CTNet, the leaderboard's primary metric), :func:`ctclip_scores` (CLIPScore,
  CLIPScore_I2I, CLIPScore_mean), :func:`fid_25d` (FID_2p5D_XY/YZ/XZ/Avg with SqueezeNet-1.1, or the papers'
  RadImageNet ResNet-50 under the ``papers`` profile: the two never share a table);
* each takes :class:`Pair`\\ s of files (streamed, one volume at a time) and an :class:`Extractor` (the
  published backbone from a local path, or a proxy network of ours: then every name says ``proxy``);
* :mod:`ctgen.metrics.vlm3d.contract`: the ``prompts.json`` contract and pairing by case stem.

Every record is a :class:`ctgen.metrics.summary.MetricValue` with its n, bootstrap CI and profile.
"""

from ctgen.metrics.vlm3d.clip import ctclip_scores
from ctgen.metrics.vlm3d.contract import Pair, Pairing, case_stem, list_volumes, pair_volumes, read_prompts_json
from ctgen.metrics.vlm3d.fid25d import Fid25dSettings, fid_25d
from ctgen.metrics.vlm3d.fvd import chunk_fvds, fvd_ctnet
from ctgen.metrics.vlm3d.protocol import CHALLENGE, PAPERS, Extractor
from ctgen.metrics.vlm3d.proxies import slice_proxy, text_proxy, volume_proxy

__all__ = ["CHALLENGE", "PAPERS", "Extractor", "Fid25dSettings", "Pair", "Pairing", "case_stem", "chunk_fvds",
           "ctclip_scores", "fid_25d", "fvd_ctnet", "list_volumes", "pair_volumes", "read_prompts_json",
           "slice_proxy", "text_proxy", "volume_proxy"]
