"""What a sliding-window encode or decode changes, on a trained autoencoder and real volumes.

The autoencoder's ``encode_window`` (encode_latents) and ``decode_window`` (sampling) bound memory at
large sizes; each window has its own GroupNorm statistics and zero-padded edges, so the result is not
the whole volume's. The README says to measure it on the weights you sample with: this does, on the
first ``--n`` volumes of a shard manifest (in manifest order), each read and mapped to the model's
range exactly as ``encode_latents`` reads it. Per volume:

- ``latent_change``: the windowed encode's posterior mean against the whole encode's, as the RMS of
  their difference over the RMS of the whole mean about its own mean (0: the same latent; 1: a change
  as large as the latent's spread);
- ``recon_error_hu``: mean |decode(whole mean) - volume| in HU, the autoencoder's own error, the scale
  against which the two changes below are read;
- ``encode_window_hu``: mean |decode(windowed mean) - decode(whole mean)| in HU (both decoded whole);
- ``decode_window_hu``: mean |windowed decode(whole mean) - decode(whole mean)| in HU.

Each is printed as a mean over the volumes with its bootstrap 95% CI and n (``ctgen.metrics.summary``).
A window as large as the volume is the whole encode or decode (0 change). Window sizes: image voxels
(D, H, W) for the encode, latent voxels for the decode; each encode step must be a whole number of
latent voxels (the autoencoder's config check says which).

    python benchmarks/windowed_autoencoder.py --autoencoder results/models/autoencoder \\
        --manifest results/shards/valid/manifest.json --encode-window 16 32 32 --decode-window 4 8 8 [--n 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctgen.data.layout import hu_to_unit, to_model_layout, unit_to_hu  # noqa: E402
from ctgen.data.shards import iter_samples  # noqa: E402
from ctgen.metrics.summary import mean_with_ci  # noqa: E402
from ctgen.models.autoencoder import MaisiAutoencoder  # noqa: E402


def latent_change(windowed: torch.Tensor, whole: torch.Tensor) -> float:
    spread = (whole - whole.mean()).pow(2).mean().sqrt()
    return float((windowed - whole).pow(2).mean().sqrt() / spread.clamp_min(1e-12))


@torch.no_grad()
def measure(autoencoder: str | Path, manifest: str | Path, encode_window, decode_window, *, n: int = 20,
            hu_window=None, encode_overlap: float | None = None,
            decode_overlap: float | None = None) -> dict:
    model = MaisiAutoencoder.from_pretrained(autoencoder, map_location="cpu").eval()
    if hu_window is None:  # the window its training data was mapped with (recorded as text by the training job)
        prov = json.loads((Path(autoencoder) / "config.json").read_text()).get("provenance") or {}
        recorded = (prov.get("data") or {}).get("hu_window")
        if recorded is None:  # NVIDIA's weights loaded, not trained here
            raise SystemExit(f"{autoencoder} records no training HU window: give --hu-window LOW HIGH")
        hu_window = json.loads(recorded) if isinstance(recorded, str) else recorded
    changes = {k: v for k, v in (("encode_overlap", encode_overlap), ("decode_overlap", decode_overlap))
               if v is not None}
    model.config = dataclasses.replace(model.config, encode_window=tuple(encode_window),
                                       decode_window=tuple(decode_window), **changes)  # checked as at load
    rows: dict[str, list[float]] = {"latent_change": [], "recon_error_hu": [], "encode_window_hu": [],
                                    "decode_window_hu": []}
    keys, shapes = [], set()
    for sample in iter_samples(manifest):
        if len(keys) == n:
            break
        x = hu_to_unit(torch.from_numpy(to_model_layout(sample["volume"])), hu_window)[None]
        mu, _ = model.encode(x, window=None)
        mu_w, _ = model.encode(x, window="config")
        whole = model.decode(mu, window=None)
        hu = unit_to_hu(whole, hu_window)
        rows["latent_change"].append(latent_change(mu_w, mu))
        rows["recon_error_hu"].append(float((hu - unit_to_hu(x, hu_window)).abs().mean()))
        rows["encode_window_hu"].append(float((unit_to_hu(model.decode(mu_w, window=None), hu_window) - hu).abs().mean()))
        rows["decode_window_hu"].append(float((unit_to_hu(model.decode(mu, window="config"), hu_window) - hu).abs().mean()))
        keys.append(sample["key"])
        shapes.add(tuple(x.shape[2:]))
    if not keys:
        raise SystemExit(f"{manifest}: no volumes")
    out = {"autoencoder": str(autoencoder), "manifest": str(manifest), "n": len(keys), "hu_window": list(hu_window),
           "volume_shapes": [list(s) for s in sorted(shapes)],
           "encode_window": list(model.config.encode_window), "encode_overlap": model.config.encode_overlap,
           "decode_window": list(model.config.decode_window), "decode_overlap": model.config.decode_overlap}
    for name, values in rows.items():
        m = mean_with_ci(values, name, groups=keys)
        out[name] = {"mean": m.value, "ci95": list(m.ci) if m.ci else None, "n": m.n, "flag": m.flag,
                     "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--autoencoder", required=True, help="a saved autoencoder folder (results/models/autoencoder)")
    ap.add_argument("--manifest", required=True, help="a volume shard manifest (results/shards/valid/manifest.json)")
    ap.add_argument("--encode-window", type=int, nargs=3, required=True, metavar=("D", "H", "W"))
    ap.add_argument("--decode-window", type=int, nargs=3, required=True, metavar=("D", "H", "W"))
    ap.add_argument("--encode-overlap", type=float)
    ap.add_argument("--decode-overlap", type=float)
    ap.add_argument("--hu-window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                    help="the HU window mapped to [-1, 1] (default: the one the autoencoder was trained with)")
    ap.add_argument("--n", type=int, default=20, help="volumes (the manifest's first)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.autoencoder, args.manifest, args.encode_window, args.decode_window, n=args.n,
                             hu_window=args.hu_window, encode_overlap=args.encode_overlap,
                             decode_overlap=args.decode_overlap), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
