"""CT-CLIP v2 (Hamamci et al.) as the VLM3D CLIP-score network: image and text latents from local files.

Source: forithmus/VLM3D-Dockers, ``ct_challenges/ctgen_evaluation/evaluate_clip.py`` (the 2026 scorer)
and the CT-CLIP code it installs (``CT_CLIP/ct_clip/ct_clip.py``, ``CTCLIP.forward(..., return_latents=True)``):

* image: CT-ViT tokens (B, 24, 24, 24, 512) (:mod:`ctgen.models.backbones.ctclip_vit`), averaged over the
  slab axis, flattened in (h, w, d) order to 24*24*512 = 294,912 values, projected by ``to_visual_latent``
  (Linear, no bias) to 512 and L2-normalised. The volume enters as HU / 1000;
* text: ``BertTokenizer`` and ``BertModel`` of BiomedVLP-CXR-BERT-specialized (padding to max_length 512,
  truncation), the [CLS] state of the last layer, ``to_text_latent`` (Linear 768 -> 512, no bias),
  L2-normalised. ``clip.load(CT-CLIP_v2.pt)`` overwrites the BERT weights with CT-CLIP's own (fine-tuned)
  ones, so the CXR-BERT folder supplies only the configuration and the vocabulary.

The checkpoint is a plain state dict (``text_transformer.*``, ``visual_transformer.*``, ``to_text_latent``,
``to_visual_latent``, and unused extras). Local paths: ``evaluation.vlm3d.ctclip_weights`` and
``evaluation.vlm3d.cxr_bert``; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from ctgen.models.backbones.ctclip_vit import CTViTConfig, CTViTEncoder
from ctgen.models.backbones.loading import load_checked, read_state_dict

log = logging.getLogger(__name__)

MAX_TOKENS = 512  # the evaluation's tokenizer max_length (padding="max_length", truncation=True)
HU_SCALE = 1000.0  # the evaluation divides the clipped HU by 1000 before the image encoder

#: Checkpoint keys the latents never use: the CT-ViT decoder side and first-frame embedding, the
#: CLOOB "extra" projections, the temperature, BERT buffers older transformers saved.
UNUSED = ("visual_transformer.to_patch_emb_first_frame.", "visual_transformer.to_pixels_first_frame.",
          "visual_transformer.to_pixels.", "to_text_latent_extra.", "to_visual_latent_extra.", "temperature",
          "text_transformer.embeddings.position_ids", "text_transformer.embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class CTCLIPConfig:
    """The latent heads; defaults are the evaluation's ``CTCLIP(dim_image=294_912, dim_text=768, dim_latent=512)``."""

    vit: CTViTConfig = CTViTConfig()  # the image encoder
    dim_text: int = 768  # BERT hidden size (CXR-BERT)
    dim_latent: int = 512  # the shared latent space
    num_slices: int = 240  # slices of the input volume (240 at 1.5 mm): fixes dim_image

    @property
    def dim_image(self) -> int:
        v = self.vit
        return (v.image_size // v.patch_size) ** 2 * v.dim  # 24 * 24 * 512 = 294,912


class CTCLIP(nn.Module):
    """``encode_image`` (B, D, H, W) HU -> (B, 512) and ``encode_text`` [str] -> (B, 512), both L2-normalised."""

    def __init__(self, config: CTCLIPConfig = CTCLIPConfig(), text_transformer: nn.Module | None = None,
                 tokenizer=None):
        super().__init__()
        self.config = config
        self.visual_transformer = CTViTEncoder(config.vit)
        self.text_transformer = text_transformer  # a transformers BertModel (None: image side only)
        self.tokenizer = tokenizer
        self.to_text_latent = nn.Linear(config.dim_text, config.dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(config.dim_image, config.dim_latent, bias=False)

    @torch.no_grad()
    def encode_image(self, hu: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) HU (the protocol's grid, pad -1 HU) -> (B, dim_latent) unit vectors."""
        video = (hu.float() / HU_SCALE)[:, None]  # (B, 1, D, H, W)
        tokens = self.visual_transformer(video)  # (B, t, h, w, d)
        pooled = reduce(tokens, "b t h w d -> b (h w d)", "mean")  # mean over slabs, then flattened
        return F.normalize(self.to_visual_latent(pooled), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Reports -> (B, dim_latent) unit vectors ([CLS] of the last BERT layer, projected)."""
        if self.text_transformer is None or self.tokenizer is None:
            raise ValueError("this CT-CLIP was built without its text side (evaluation.vlm3d.cxr_bert)")
        device = self.to_text_latent.weight.device
        toks = self.tokenizer(list(texts), return_tensors="pt", padding="max_length", truncation=True,
                              max_length=MAX_TOKENS).to(device)
        states = self.text_transformer(toks["input_ids"], attention_mask=toks["attention_mask"])[0]  # (B, L, C)
        return F.normalize(self.to_text_latent(states[:, 0]), dim=-1)

    @classmethod
    def from_paths(cls, weights: str | os.PathLike, cxr_bert: str | os.PathLike | None,
                   config: CTCLIPConfig = CTCLIPConfig()) -> CTCLIP:
        """``CT-CLIP_v2.pt`` (or the same keys as ``.safetensors``) and the local CXR-BERT folder.

        The folder's config builds the BERT (its weights come from the CT-CLIP checkpoint); its vocabulary
        builds the tokenizer. Without ``cxr_bert`` only the image side is built (the I2I score).
        """
        text, tokenizer, ignore = None, None, UNUSED
        if cxr_bert is not None:
            text, tokenizer = bert_from_folder(cxr_bert)
        else:
            ignore = (*UNUSED, "text_transformer.", "to_text_latent.")
        state = read_state_dict(weights, "CT-CLIP weights")
        model = cls(config, text, tokenizer)
        return load_checked(model, state, weights, "CT-CLIP", ignore_unexpected=ignore,
                            ignore_missing=("text_transformer.pooler.",))


def bert_from_folder(folder: str | os.PathLike):
    """(BertModel with the folder's configuration, its BertTokenizer); random weights, nothing downloaded."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(2, "CXR-BERT folder (evaluation.vlm3d.cxr_bert) has no config.json", str(folder))
    from transformers import BertConfig, BertModel, BertTokenizer

    config = BertConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    return BertModel(config).eval(), tokenizer
