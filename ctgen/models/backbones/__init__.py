"""Frozen feature networks of published evaluation protocols, written here and loaded from local paths.

Each class has the module names of its published checkpoint, so the checkpoint loads by name through
:func:`ctgen.models.backbones.loading.load_checked` (which names the first mismatching keys):

* :class:`SqueezeNet11`: ImageNet SqueezeNet 1.1 (torchvision's ``squeezenet1_1-b8a52dc0.pth``), the VLM3D
  2026 2.5D FID network;
* :class:`RadImageNetResNet50`: RadImageNet ResNet-50 without top (Warvito's conversion), the papers' 2.5D FID;
* :class:`CTNet`: CT-Net (Draelos et al.), the 96-d features of the VLM3D FVD_CTNet;
* :class:`CTCLIP`: CT-CLIP v2 (CT-ViT image encoder + CXR-BERT text side), the VLM3D CLIP score.

Nothing here is trained by the workflow and nothing is downloaded: weights come from
``config.yaml: evaluation.vlm3d``.
"""

from ctgen.models.backbones.ctclip import CTCLIP, CTCLIPConfig
from ctgen.models.backbones.ctclip_vit import CTViTConfig, CTViTEncoder
from ctgen.models.backbones.ctnet import CTNet
from ctgen.models.backbones.loading import load_checked, read_state_dict
from ctgen.models.backbones.resnet import RadImageNetResNet50, resnet18_features
from ctgen.models.backbones.squeezenet import SqueezeNet11

__all__ = ["CTCLIP", "CTCLIPConfig", "CTNet", "CTViTConfig", "CTViTEncoder", "RadImageNetResNet50", "SqueezeNet11",
           "load_checked", "read_state_dict", "resnet18_features"]
