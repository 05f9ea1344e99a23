"""Backbones of the SeqNet-FPN model: a classifier trunk (``backbone.body``) + an FPN
(``backbone.fpn``), built from torchvision components (SPEC 4, 4.2, 4.3).

State-dict names (below ``backbone.``):

- ResNet-50 / ResNet-18: ``body.conv1``, ``body.bn1``, ``body.layer1`` .. ``body.layer4`` exactly as
  in torchvision's ResNet (``fc`` and ``avgpool`` are not part of the trunk).
- ResNet-18 x0.5: the same names as torchvision's ResNet-18 (``conv1``, ``bn1``, ``layerK.B.conv1``,
  ``layerK.B.bn1``, ``layerK.B.conv2``, ``layerK.B.bn2``, ``layerK.0.downsample.{0,1}``), every
  width halved (stem 32, stages 32/64/128/256).
- MobileNetV2: the blocks 0..17 of torchvision's ``features`` Sequential, under their indices:
  ``body.0.0.weight`` (first conv), ``body.1.conv.0.0.weight``, ..., ``body.17.conv.2.weight``.
  A torchvision MobileNetV2 classifier state dict therefore maps by replacing ``features.`` with
  ``backbone.body.`` (``features.18`` and ``classifier`` are not part of the trunk). The FPN is fed
  by the outputs of blocks 3, 6, 13 and 17 (24, 32, 96, 320 channels; strides 4, 8, 16, 32).
- ``fpn``: torchvision ``FeaturePyramidNetwork`` (256 channels) with ``LastLevelMaxPool`` ('pool').

Normalisation: ResNets use ``FrozenBatchNorm2d`` when ``FROZENBN2d`` (the BN parameters become
buffers) and ``BatchNorm2d`` otherwise; ``conv1``/``bn1`` get ``requires_grad=False`` when
``FREEZE``. MobileNetV2 always uses trainable ``BatchNorm2d`` and nothing is frozen (SPEC 4: "no
freezing"); ``FROZENBN2d``/``FREEZE`` are ignored for it (SPEC 4.2 counts its BN as parameters).

ImageNet weights (SPEC 4.3): ``weights_path == ""`` -> torchvision's IMAGENET1K_V1 via the weights
API, read from the torch hub cache when present, otherwise downloaded with a short socket timeout;
any failure raises a ``RuntimeError`` naming the backbone and the config key of a local file.
``weights_path`` = a local state-dict file of the torchvision classifier, loaded strictly into the
whole classifier except its head (``fc.*`` / ``classifier.*``). ResNet-18 x0.5 has no ImageNet
weights: pretraining it needs a local file.
"""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = [
    "BACKBONE_NAMES",
    "FPN_OUT_CHANNELS",
    "HalfWidthResNet18",
    "build_backbone",
    "build_classifier",
    "imagenet_state_dict",
    "load_classifier_weights",
]

FPN_OUT_CHANNELS = 256
BACKBONE_NAMES = ("resnet50", "resnet18", "resnet18_x05", "mobilenet_v2")

# seconds a download of ImageNet weights may stall before it is abandoned
DOWNLOAD_TIMEOUT_S = 30.0

_RESNET_RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
_MOBILENET_RETURN_LAYERS = {"3": "0", "6": "1", "13": "2", "17": "3"}
_IN_CHANNELS = {
    "resnet50": [256, 512, 1024, 2048],
    "resnet18": [64, 128, 256, 512],
    "resnet18_x05": [32, 64, 128, 256],
    "mobilenet_v2": [24, 32, 96, 320],
}
# the classifier head of each torchvision classifier: not part of the trunk
_HEAD_PREFIXES = ("fc.", "classifier.")


class HalfWidthResNet18(nn.Module):
    """ResNet-18 with every width halved (stem 32, stages 32/64/128/256), made of torchvision's
    ``BasicBlock`` with torchvision's module names, so that a state dict of it looks like a
    torchvision ResNet-18's with smaller tensors. It is a full classifier (``avgpool``, ``fc``) so
    that a local ImageNet file of it can be loaded the same way as for the other backbones."""

    def __init__(self, widths=(32, 64, 128, 256), layers=(2, 2, 2, 2), num_classes: int = 1000,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                self._norm_layer(planes * BasicBlock.expansion),
            )
        mods = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer=self._norm_layer)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            mods.append(BasicBlock(self.inplanes, planes, norm_layer=self._norm_layer))
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _imagenet_weights_enum(name: str):
    """torchvision's IMAGENET1K_V1 weights entry of a backbone, or None if it has none."""
    if name == "resnet50":
        return torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    if name == "resnet18":
        return torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    if name == "mobilenet_v2":
        return torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    return None


def _download_state_dict(weights) -> dict:
    """Fetch ``weights`` through torchvision's weights API (downloads into the torch hub cache).
    A module-level function so that tests can replace it; never called when the file is cached."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state_dict(name: str, weights_key: str = "BASELINE.BACKBONE_WEIGHTS") -> dict:
    """The IMAGENET1K_V1 classifier state dict of backbone ``name``: from the torch hub cache if
    the file is there, else downloaded (short socket timeout). Raises RuntimeError naming the
    backbone and ``weights_key`` (the config key of a local file) when it cannot be had."""
    weights = _imagenet_weights_enum(name)
    if weights is None:
        raise RuntimeError(
            f"backbone '{name}' has no ImageNet weights in torchvision; set {weights_key} to a "
            f"local state-dict file of the classifier, or turn BACKBONE_PRETRAIN off")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if os.path.isfile(cached):
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or corrupt cache file
            raise RuntimeError(
                f"could not read the cached ImageNet weights of backbone '{name}' at {cached} "
                f"({type(err).__name__}: {err}); delete the file or set {weights_key} to a local "
                f"state-dict file of the torchvision classifier") from err
    try:
        return _download_state_dict(weights)
    except Exception as err:
        raise RuntimeError(
            f"ImageNet weights of backbone '{name}' ({weights}) are not in the torch hub cache "
            f"({cached}) and could not be downloaded ({type(err).__name__}: {err}). On a machine "
            f"without internet, copy the file {os.path.basename(weights.url)} from {weights.url} "
            f"there, or set {weights_key} to the path of a local state-dict file of the "
            f"torchvision classifier, or turn BACKBONE_PRETRAIN off") from err


def build_classifier(name: str, frozen_bn: bool) -> nn.Module:
    """The untrained torchvision-style classifier whose trunk becomes ``backbone.body``."""
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None, norm_layer=nn.BatchNorm2d)
    norm_layer = misc_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, norm_layer=norm_layer)
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    if name == "resnet18_x05":
        return HalfWidthResNet18(norm_layer=norm_layer)
    raise ValueError(f"unknown backbone '{name}'; expected one of {', '.join(BACKBONE_NAMES)}")


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and not torch.is_tensor(obj[key]):
                return _unwrap_state_dict(obj[key])
    if not isinstance(obj, dict):
        raise RuntimeError(f"expected a state dict, got {type(obj).__name__}")
    keys = list(obj)
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_classifier_weights(classifier: nn.Module, state_dict: dict, name: str,
                            source: str = "state dict") -> None:
    """Load ``state_dict`` strictly into ``classifier``, ignoring only its head (``fc.*`` /
    ``classifier.*``) on both sides. Raises RuntimeError listing what does not fit."""
    state_dict = _unwrap_state_dict(state_dict)
    trunk = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES))
    own = classifier.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in trunk.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise RuntimeError(f"ImageNet weights ({source}) do not fit backbone '{name}': shape "
                           f"mismatch in {len(mismatched)} keys: " + "; ".join(mismatched[:20]))
    result = classifier.load_state_dict(trunk, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(_HEAD_PREFIXES)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"ImageNet weights ({source}) do not fit backbone '{name}': "
            f"missing {len(missing)} keys {missing[:20]}, unexpected {len(unexpected)} keys "
            f"{unexpected[:20]}")


def _freeze_stem(body: nn.Module) -> None:
    for module in (body.conv1, body.bn1):
        for p in module.parameters():
            p.requires_grad_(False)


def build_backbone(name: str, pretrained: bool = False, weights_path: str = "",
                   frozen_bn: bool = True, freeze: bool = True,
                   cfg_prefix: str = "BASELINE") -> BackboneWithFPN:
    """``backbone`` of the model: ``.body`` (trunk returning '0'..'3'), ``.fpn``, ``.out_channels``.

    ``cfg_prefix`` only names the config node in error messages (e.g. "DISTILLER.STUDENT")."""
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone '{name}'; expected one of {', '.join(BACKBONE_NAMES)}")
    weights_key = f"{cfg_prefix}.BACKBONE_WEIGHTS"
    classifier = build_classifier(name, frozen_bn)
    if weights_path:
        if not os.path.isfile(weights_path):
            raise RuntimeError(f"{weights_key} = '{weights_path}' (ImageNet weights of backbone "
                               f"'{name}') does not exist")
        sd = torch.load(weights_path, map_location="cpu", weights_only=True)
        load_classifier_weights(classifier, sd, name, source=weights_path)
    elif pretrained:
        if name == "resnet18_x05":
            raise RuntimeError(
                f"backbone 'resnet18_x05' has no ImageNet weights: set {cfg_prefix}."
                f"BACKBONE_PRETRAIN False, or set {weights_key} to a local state-dict file of it")
        sd = imagenet_state_dict(name, weights_key)
        load_classifier_weights(classifier, sd, name, source=f"torchvision {name} IMAGENET1K_V1")

    if name == "mobilenet_v2":
        trunk, return_layers = classifier.features, _MOBILENET_RETURN_LAYERS
    else:
        trunk, return_layers = classifier, _RESNET_RETURN_LAYERS
    backbone = BackboneWithFPN(trunk, return_layers=dict(return_layers),
                               in_channels_list=list(_IN_CHANNELS[name]),
                               out_channels=FPN_OUT_CHANNELS, extra_blocks=LastLevelMaxPool())
    if name != "mobilenet_v2" and freeze:
        _freeze_stem(backbone.body)
    return backbone
