"""The published evaluation backbones in our code: key layouts of their checkpoints, loading, and forward arithmetic.

Each test saves a random state dict in the published checkpoint's layout (the key list written out here from
the original code, or read from the published file) and loads it through our path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from ctgen.models.backbones import CTCLIP, CTCLIPConfig, CTNet, CTViTConfig, RadImageNetResNet50, SqueezeNet11
from ctgen.models.backbones.ctclip import UNUSED
from ctprep.errors import describe

HERE = Path(__file__).parent


def _random_state(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g) * 0.1
    return out


def _torchvision_squeezenet_keys() -> list[str]:
    """torchvision.models.squeezenet1_1's state-dict keys, written out from its definition."""
    keys = ["features.0.weight", "features.0.bias"]
    for i in (3, 4, 6, 7, 9, 10, 11, 12):  # the Fire modules
        keys += [f"features.{i}.{conv}.{p}" for conv in ("squeeze", "expand1x1", "expand3x3") for p in ("weight", "bias")]
    return keys + ["classifier.1.weight", "classifier.1.bias"]


def test_squeezenet_loads_torchvisions_layout_and_gives_1000_relu_scores(tmp_path):
    model = SqueezeNet11()
    assert sorted(model.state_dict()) == sorted(_torchvision_squeezenet_keys())
    state = _random_state({k: tuple(v.shape) for k, v in model.state_dict().items()})
    torch.save(state, tmp_path / "squeezenet1_1-b8a52dc0.pth")
    loaded = SqueezeNet11.from_path(tmp_path / "squeezenet1_1-b8a52dc0.pth")
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.classifier[1].weight, state["classifier.1.weight"])
    x = torch.randn(2, 3, 64, 64)
    out = loaded(x)
    assert out.shape == (2, 1000) and (out >= 0).all()  # the head's ReLU, then the global average
    ref = torch.relu(torch.nn.functional.conv2d(loaded.features(x), state["classifier.1.weight"],
                                                state["classifier.1.bias"])).mean(dim=(2, 3))
    assert torch.allclose(out, ref, atol=1e-6)


def test_a_wrong_or_truncated_checkpoint_is_named_in_one_line(tmp_path):
    state = _random_state({k: tuple(v.shape) for k, v in SqueezeNet11().state_dict().items()})
    state.pop("features.3.squeeze.weight")
    state["fc.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth is not a SqueezeNet-1.1 state dict: missing \['features.3.squeeze"
                                         r".weight'\], unexpected \['fc.weight'\]"):
        SqueezeNet11.from_path(tmp_path / "bad.pth")
    good = tmp_path / "good.pth"
    torch.save(_random_state({k: tuple(v.shape) for k, v in SqueezeNet11().state_dict().items()}), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:50_000])  # as the CT-Net file committed to the VLM3D repository
    with pytest.raises(ValueError, match="cannot be read as a weights-only checkpoint") as err:
        SqueezeNet11.from_path(cut)
    assert "\n" not in describe(err.value)
    with pytest.raises(FileNotFoundError, match="SqueezeNet-1.1 weights not found") as err:
        SqueezeNet11.from_path(tmp_path / "absent.pth")
    assert "absent.pth" in describe(err.value)


def test_a_corrupt_or_text_safetensors_file_is_named_in_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_random_state({k: tuple(v.shape) for k, v in SqueezeNet11().state_dict().items()}), good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:50_000])
    (tmp_path / "text.safetensors").write_text("<html>404: not found</html>\n")  # a download page
    for name in ("cut.safetensors", "text.safetensors"):
        with pytest.raises(ValueError, match=f"SqueezeNet-1.1 weights .*{name} cannot be read as a safetensors "
                                             "file") as err:
            SqueezeNet11.from_path(tmp_path / name)
        assert "\n" not in describe(err.value)


def _keras_resnet50_keys() -> list[str]:
    """Warvito/radimagenet-models' ResNet50 state-dict keys, written out from its definition."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", "conv1.bias"] + [f"bn1.{p}" for p in bn]
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for b in range(blocks):
            pre = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{pre}.conv{i}.weight", f"{pre}.conv{i}.bias"] + [f"{pre}.bn{i}.{p}" for p in bn]
            if b == 0:
                keys += [f"{pre}.downsample.0.weight", f"{pre}.downsample.0.bias"] + [f"{pre}.downsample.1.{p}" for p in bn]
    return keys


def test_radimagenet_resnet50_loads_warvitos_layout_from_pth_and_safetensors(tmp_path):
    model = RadImageNetResNet50()
    assert sorted(model.state_dict()) == sorted(_keras_resnet50_keys())
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)  # Keras: stride on 1x1
    assert model.bn1.eps == pytest.approx(1.001e-5)
    state = _random_state({k: tuple(v.shape) for k, v in model.state_dict().items()})
    torch.save(state, tmp_path / "RadImageNet-ResNet50_notop.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "rin.safetensors")
    a = RadImageNetResNet50.from_path(tmp_path / "RadImageNet-ResNet50_notop.pth")
    b = RadImageNetResNet50.from_path(tmp_path / "rin.safetensors")
    x = torch.randn(1, 3, 64, 64)
    assert a(x).shape == (1, 2048, 2, 2) and torch.equal(a(x), b(x))


def test_ctnet_has_the_published_checkpoints_keys_and_shapes_and_loads_it(tmp_path):
    published = json.loads((HERE / "vlm3d_ctnet_checkpoint_keys.json").read_text())["params"]
    own = {k: list(v.shape) for k, v in CTNet().state_dict().items()}
    assert {k.removeprefix("module."): v for k, v in published.items()} == own
    state = _random_state({k: tuple(v) for k, v in published.items()})
    torch.save({"params": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}},
               tmp_path / "CTNet28_ctclip_whole_data_18classes")
    model = CTNet.from_path(tmp_path / "CTNet28_ctclip_whole_data_18classes")
    assert torch.equal(model.classifier[3].weight, state["module.classifier.3.weight"])
    with pytest.raises(ValueError, match=r"CT-Net takes \(B, 402, 420, 420\)"):
        model(torch.zeros(1, 400, 420, 420))


def test_ctnet_window_and_slab_arithmetic_match_the_original_view_calls():
    hu = torch.tensor([-2000.0, -1000.0, -400.0, 200.0, 900.0])
    assert torch.allclose(CTNet.normalise(hu), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]) - 0.449)
    torch.manual_seed(0)
    model = CTNet().eval()
    # a cheap stand-in for the ResNet-18 with its output shape, to check the reshapes and the head on CPU
    model.features = nn.Sequential(nn.AdaptiveAvgPool2d(14), nn.Conv2d(3, 512, 1))
    x = torch.randn(2, 402, 420, 420) * 500
    with torch.no_grad():
        out = model(x)
        # the original forward: x.view(B*134, 3, 420, 420) ... x.view(B, 134, 512, 14, 14) ... x.view(B, 7200)
        f = model.features(CTNet.normalise(x).view(2 * 134, 3, 420, 420)).view(2, 134, 512, 14, 14)
        f = model.reducingconvs(f).view(2, 16 * 18 * 5 * 5)
        ref = torch.relu(model.classifier[3](torch.relu(model.classifier[0](f))))
    assert out.shape == (2, 96) and torch.allclose(out, ref, atol=1e-5)


TINY_VIT = CTViTConfig(dim=16, image_size=40, patch_size=20, temporal_patch_size=10, spatial_depth=1,
                       temporal_depth=1, dim_head=8, heads=2, codebook_size=32)
TINY = CTCLIPConfig(vit=TINY_VIT, dim_text=16, dim_latent=8, num_slices=20)


def _ctvit_keys(depth: int = 1) -> list[str]:
    """transformer_maskgit.CTViT's state-dict keys (CT-CLIP's), written out from its definition."""
    keys = [f"spatial_rel_pos_bias.net.{i}.{p}" for i in ("0.0", "1.0", "2") for p in ("weight", "bias")]
    for emb in ("to_patch_emb", "to_patch_emb_first_frame"):
        keys += [f"{emb}.{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    for tr in ("enc_spatial_transformer", "enc_temporal_transformer"):
        for layer in range(depth):
            pre = f"{tr}.layers.{layer}"
            keys += [f"{pre}.0.dsconv.weight", f"{pre}.0.dsconv.bias"]
            keys += [f"{pre}.1.{k}" for k in ("norm.gamma", "norm.beta", "context_norm.gamma", "context_norm.beta",
                                              "null_kv", "to_q.weight", "to_kv.weight", "q_scale", "k_scale",
                                              "to_out.weight")]
            keys += [f"{pre}.3.0.weight", f"{pre}.3.0.bias", f"{pre}.3.1.weight", f"{pre}.3.4.weight"]
        keys += [f"{tr}.norm_out.gamma", f"{tr}.norm_out.beta"]
    keys += ["vq._codebook.initted", "vq._codebook.cluster_size", "vq._codebook.embed"]
    return keys + ["to_pixels_first_frame.0.weight", "to_pixels_first_frame.0.bias", "to_pixels.0.weight",
                   "to_pixels.0.bias"]


@pytest.fixture(scope="module")
def cxr_bert(tmp_path_factory):
    """A tiny BERT folder in CXR-BERT's layout (config.json + vocab.txt), nothing downloaded."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("cxr_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "right", "left", "pleural", "effusion", "no", "nodule", "."]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=512).save_pretrained(folder)
    return folder


def _published_ctclip_state(model: CTCLIP) -> dict[str, torch.Tensor]:
    """Our state dict plus what CT-CLIP_v2.pt holds beside it (decoder side, extras, BERT's position_ids)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    patch = TINY_VIT.patch_size ** 2
    shapes.update({"visual_transformer.to_patch_emb_first_frame.1.weight": (patch,),
                   "visual_transformer.to_patch_emb_first_frame.1.bias": (patch,),
                   "visual_transformer.to_patch_emb_first_frame.2.weight": (TINY_VIT.dim, patch),
                   "visual_transformer.to_patch_emb_first_frame.2.bias": (TINY_VIT.dim,),
                   "visual_transformer.to_patch_emb_first_frame.3.weight": (TINY_VIT.dim,),
                   "visual_transformer.to_patch_emb_first_frame.3.bias": (TINY_VIT.dim,),
                   "visual_transformer.to_pixels_first_frame.0.weight": (patch, TINY_VIT.dim),
                   "visual_transformer.to_pixels_first_frame.0.bias": (patch,),
                   "visual_transformer.to_pixels.0.weight": (patch * 10, TINY_VIT.dim),
                   "visual_transformer.to_pixels.0.bias": (patch * 10,),
                   "to_text_latent_extra.weight": (8, 16), "to_visual_latent_extra.weight": (8, TINY.dim_image),
                   "temperature": ()})
    state = _random_state(shapes, seed=1)
    state["text_transformer.embeddings.position_ids"] = torch.arange(512)[None]
    return state


def test_ctclip_loads_the_published_layout_and_gives_unit_latents(cxr_bert, tmp_path):
    from ctgen.models.backbones.ctclip import bert_from_folder

    text, tok = bert_from_folder(cxr_bert)
    model = CTCLIP(TINY, text, tok)
    vit_keys = {k.removeprefix("visual_transformer.") for k in model.state_dict() if k.startswith("visual_transformer.")}
    assert vit_keys == set(_ctvit_keys()) - {k for k in _ctvit_keys() if "first_frame" in k or "to_pixels" in k}
    state = _published_ctclip_state(model)
    assert set(state) - set(model.state_dict()) and all(any(k == u or k.startswith(u) for u in UNUSED)
                                                        for k in set(state) - set(model.state_dict()))
    torch.save(state, tmp_path / "CT-CLIP_v2.pt")
    loaded = CTCLIP.from_paths(tmp_path / "CT-CLIP_v2.pt", cxr_bert, TINY)
    assert torch.equal(loaded.to_visual_latent.weight, state["to_visual_latent.weight"])
    hu = torch.randn(2, 20, 40, 40) * 400
    img = loaded.encode_image(hu)
    txt = loaded.encode_text(["right pleural effusion .", "no nodule " * 400])  # the second is cut to 512 tokens
    assert img.shape == (2, 8) and txt.shape == (2, 8)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    # the image latent by hand: tokens / 1000, mean over slabs, flattened (h, w, d), projected, normalised
    tokens = loaded.visual_transformer((hu / 1000)[:, None])
    ref = torch.nn.functional.normalize(loaded.to_visual_latent(rearrange(tokens.mean(1), "b h w d -> b (h w d)")), dim=-1)
    assert torch.allclose(img, ref, atol=1e-6)
    # the text latent is the projected [CLS] state of the last layer
    ids = tok(["right pleural effusion ."], return_tensors="pt", padding="max_length", max_length=512)
    cls = loaded.text_transformer(ids["input_ids"], attention_mask=ids["attention_mask"])[0][:, 0]
    assert torch.allclose(txt[:1], torch.nn.functional.normalize(loaded.to_text_latent(cls), dim=-1), atol=1e-6)
    # a checkpoint missing a used key is named
    state.pop("visual_transformer.enc_spatial_transformer.layers.0.1.to_q.weight")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['visual_transformer.enc_spatial_transformer.layers.0.1.to_q"):
        CTCLIP.from_paths(tmp_path / "broken.pt", cxr_bert, TINY)


def test_ctclip_without_text_side_ignores_the_text_weights(cxr_bert, tmp_path):
    from ctgen.models.backbones.ctclip import bert_from_folder

    state = _published_ctclip_state(CTCLIP(TINY, *bert_from_folder(cxr_bert)))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ctclip.safetensors")
    model = CTCLIP.from_paths(tmp_path / "ctclip.safetensors", None, TINY)
    assert model.encode_image(torch.zeros(1, 20, 40, 40)).shape == (1, 8)
    with pytest.raises(ValueError, match="without its text side"):
        model.encode_text(["right pleural effusion"])
