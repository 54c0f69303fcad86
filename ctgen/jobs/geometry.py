"""The geometry contract: the prep grid, the in-plane factor and every model's sizes must fit together.

Checked when the workflow loads its config (``workflow/rules/common.smk``), so a mismatch fails in
seconds with the keys named and a fix, instead of on the first batch of a training job or, worse,
after all of them (GenerateCT's ``paper`` sizes on a 480-pixel grid: 480 / 4 = 120 is no multiple of
the tokenizer's 16-pixel patches). Torch-free: it runs in the Snakemake process.

The chain, with the prep preset's ``shape`` = (I, J, K) = (W, H, D) in the model layout:
``lowres_scale`` divides W and H -> the tokenizer's grid (D, H/s, W/s), whose in-plane sizes are
multiples of its ``patch_size`` and which it is trained at (``image_size``, ``num_slices``) -> a token
grid (t, h, w) within the generator's position tables (``max_t``, ``max_h``, ``max_w``), over the
same codebook -> super-resolution from ``in_size`` = H/s to ``out_size`` = H, a factor ``lowres_scale``.
"""

from __future__ import annotations

from typing import Any

from ctgen.models.grids import token_grid


class GeometryError(ValueError):
    """The sizes do not fit; the (one-line) message lists every problem with its keys and a fix."""


def _get(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise GeometryError(f"{where}.{key} is not set: the geometry check needs the preset's sizes written out")
    return section[key]


def check_geometry(config: dict[str, Any]) -> dict[str, Any]:
    """Check the config's prep preset against its model preset; returns the derived grids, raises GeometryError.

    Returns ``{"prep": (W, H, D), "lowres": (D, h, w), "tokens": (t, h, w)}`` for messages and tests.
    The message of a mismatch also names the prep presets (and in-plane factors) that would fit.
    """
    try:
        return _check(config)
    except GeometryError as err:
        fits = [f"prep.preset: {name} with models.lowres_scale: {s}" for name in config["presets"] for s in range(1, 9)
                if (name, s) != (config["prep"]["preset"], config["models"]["lowres_scale"]) and _fits(config, name, s)]
        hint = f"; or use {' / '.join(fits[:3])}, which fit{'s' if len(fits) == 1 else ''}" if fits else ""
        raise GeometryError(f"{err}{hint}") from None


def _fits(config: dict[str, Any], prep: str, scale: int) -> bool:
    try:
        _check({**config, "prep": {**config["prep"], "preset": prep}, "models": {**config["models"], "lowres_scale": scale}})
        return True
    except GeometryError:
        return False


def generators(config: dict[str, Any]) -> list[str]:
    """The generator families the config trains: ``models.generators`` (default: the cascade alone)."""
    return list(config["models"].get("generators") or ["cascade"])


def _check(config: dict[str, Any]) -> dict[str, Any]:
    models = config["model_presets"][config["models"]["preset"]]
    need = {"cascade": ("tokenizer", "generator", "superres"), "latent_flow": ("autoencoder", "latent_flow")}
    out: dict[str, Any] = {}
    for family in generators(config):
        missing = [m for m in need[family] if m not in models]
        if missing:
            raise GeometryError(f"models.generators has {family} but model_presets.{config['models']['preset']} has no "
                                f"{', '.join(missing)}: choose a preset with them or leave {family} out of models.generators")
        out.update(_check_cascade(config) if family == "cascade" else _check_latent(config))
    return out


def _check_latent(config: dict[str, Any]) -> dict[str, Any]:
    """The autoencoder's latent of the prep grid is the flow model's latent, at a size its U-Net can halve."""
    prep_name, model_name = config["prep"]["preset"], config["models"]["preset"]
    W, H, D = (int(v) for v in config["presets"][prep_name]["shape"])
    ae = config["model_presets"][model_name]["autoencoder"]
    flow = config["model_presets"][model_name]["latent_flow"]["model"]
    P, A, F = f"presets.{prep_name}", f"model_presets.{model_name}.autoencoder", f"model_presets.{model_name}.latent_flow.model"
    f = 2 ** (len(_get(ae["model"], "num_channels", f"{A}.model")) - 1)
    problems = []
    if W % f or H % f or D % f:
        problems.append(f"{P}.shape {[W, H, D]} is not divisible by the autoencoder's factor {f} "
                        f"({A}.model.num_channels has {int(f).bit_length()} levels): use a shape divisible by {f}")
        _raise(problems, prep_name, model_name)
    latent = (D // f, H // f, W // f)
    if tuple(int(v) for v in _get(flow, "latent_shape", F)) != latent:
        problems.append(f"{F}.latent_shape is {list(flow['latent_shape'])} but the autoencoder makes {list(latent)} "
                        f"(D, H, W) of {P}.shape: set latent_shape: {list(latent)}")
    if int(_get(flow, "latent_channels", F)) != int(_get(ae["model"], "latent_channels", f"{A}.model")):
        problems.append(f"{F}.latent_channels {flow['latent_channels']} differs from {A}.model.latent_channels "
                        f"{ae['model']['latent_channels']}: make them equal")
    u = 2 ** (len(_get(flow, "channels", F)) - 1)
    if any(n % u for n in latent):
        problems.append(f"the latent {list(latent)} is not divisible by the flow U-Net's factor {u} ({F}.channels has "
                        f"{len(flow['channels'])} levels): use fewer levels or a prep shape divisible by {f * u}")
    patch = (ae.get("data") or {}).get("patch_size")
    if patch and (any(int(p) % f for p in patch) or any(int(p) > n for p, n in zip(patch, (D, H, W)))):
        problems.append(f"{A}.data.patch_size {list(patch)} must be multiples of {f} within the volume {[D, H, W]} (D, H, W)")
    if problems:
        _raise(problems, prep_name, model_name)
    return {"prep": (W, H, D), "latent": latent}


def _check_cascade(config: dict[str, Any]) -> dict[str, Any]:
    prep_name, model_name = config["prep"]["preset"], config["models"]["preset"]
    prep = config["presets"][prep_name]
    models = config["model_presets"][model_name]
    s = int(config["models"]["lowres_scale"])
    W, H, D = (int(v) for v in prep["shape"])
    P, M = f"presets.{prep_name}", f"model_presets.{model_name}"
    problems: list[str] = []

    if W % s or H % s:
        problems.append(f"{P}.shape {list(prep['shape'])} is not divisible in-plane by models.lowres_scale {s}: "
                        f"choose a lowres_scale that divides {W} and {H}, or another shape")
        return _raise(problems, prep_name, model_name)
    h, w = H // s, W // s
    tok = models["tokenizer"]["model"]
    T = f"{M}.tokenizer.model"
    patch, tpatch = int(_get(tok, "patch_size", T)), int(_get(tok, "temporal_patch_size", T))
    first = bool(_get(tok, "first_slice_separate", T))
    if h % patch or w % patch:
        good = [k for k in range(1, 17) if H % k == 0 and W % k == 0 and (H // k) % patch == 0 and (W // k) % patch == 0]
        problems.append(f"{P}.shape {list(prep['shape'])} / models.lowres_scale {s} = {w}x{h} in-plane is not a multiple "
                        f"of {T}.patch_size {patch}: use lowres_scale {good[0] if good else '(none fits)'}, a prep "
                        f"shape whose in-plane size / {s} is a multiple of {patch} (e.g. {patch * s * (H // (patch * s) or 1)}), "
                        "or another patch_size")
        return _raise(problems, prep_name, model_name)
    if int(_get(tok, "image_size", T)) != h or h != w:
        problems.append(f"{T}.image_size is {tok['image_size']} but the tokenizer sees {w}x{h} "
                        f"({P}.shape / models.lowres_scale): set image_size: {h}" + ("" if h == w else
                                                                                        " (and a square prep shape)"))
    if int(_get(tok, "num_slices", T)) != D:
        problems.append(f"{T}.num_slices is {tok['num_slices']} but {P}.shape has {D} slices: set num_slices: {D}")
    t, th, tw = token_grid(D, h, w, patch, tpatch, first)
    gen = models["generator"]["model"]
    G = f"{M}.generator.model"
    for key, need in (("max_t", t), ("max_h", th), ("max_w", tw)):
        if int(_get(gen, key, G)) < need:
            problems.append(f"{G}.{key} is {gen[key]} but the token grid is {t}x{th}x{tw} (t, h, w): set {key}: {need}")
    if int(_get(gen, "codebook_size", G)) != int(_get(tok, "codebook_size", T)):
        problems.append(f"{G}.codebook_size {gen['codebook_size']} differs from {T}.codebook_size {tok['codebook_size']}: "
                        "the generator predicts the tokenizer's codes; make them equal")
    sr = models["superres"]["model"]
    S = f"{M}.superres.model"
    if int(_get(sr, "in_size", S)) != h:
        problems.append(f"{S}.in_size is {sr['in_size']} but the low-res slices are {h} pixels: set in_size: {h}")
    if int(_get(sr, "out_size", S)) != H:
        problems.append(f"{S}.out_size is {sr['out_size']} but the prep grid's slices are {H} pixels: set out_size: {H}")
    if problems:
        _raise(problems, prep_name, model_name)
    return {"prep": (W, H, D), "lowres": (D, h, w), "tokens": (t, th, tw)}


def _raise(problems: list[str], prep_name: str, model_name: str):
    head = f"prep preset {prep_name!r} and model preset {model_name!r} do not fit together"
    raise GeometryError(f"{head}: " + "; ".join(problems))
