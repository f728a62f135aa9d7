"""MONAI networks selectable with ``--conf network``; the default is the fastest on a CPU."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import AttentionUnet, DenseNet121, DynUNet, SegResNet, UNet, resnet10, resnet18

from labelloop_app.detector import ClassMapUNet


def segmentation_network(name: str, out_channels: int, in_channels: int = 1, dropout: float = 0.1) -> torch.nn.Module:
    """A 3D segmentation network.

    ``unet`` (default): MONAI's residual UNet with few channels at the top level, where CPU time goes.
    ``dynunet``: nnU-Net-style DynUNet. ``segresnet``: MONAI's SegResNet. ``attentionunet``: Attention U-Net.
    Every choice has dropout, which MC-dropout uncertainty needs.
    """
    if name == "unet":
        return UNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=1,
            norm="instance",
            dropout=dropout,
        )
    if name == "dynunet":
        kernels = [[3, 3, 3]] * 5
        strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
        return DynUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=[16, 32, 64, 128, 256],
            norm_name="instance",
            dropout=dropout,
            res_block=True,
        )
    if name == "segresnet":
        return SegResNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            init_filters=16,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            dropout_prob=dropout,
        )
    if name == "attentionunet":
        return AttentionUnet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            dropout=dropout,
        )
    raise ValueError(f"unknown network {name!r}")


CAM_LAYERS = {"densenet121": "class_layers.relu", "resnet10": "layer4", "resnet18": "layer4"}
"""The last convolutional block of each classification network: where Grad-CAM looks."""


def classification_network(
    name: str, num_classes: int, in_channels: int = 1, features: Sequence[int] = (32, 16)
) -> torch.nn.Module:
    """A 3D image classifier returning one logit per class.

    ``densenet121`` (default): MONAI's DenseNet121 (blocks 6-12-24-16) with ``features = (init_features,
    growth_rate)``; (32, 16) instead of the ImageNet (64, 32) is about 4x cheaper and plenty for a few hundred
    volumes. ``resnet10`` / ``resnet18``: MONAI's ResNet with a stride-2 stem (MONAI's default stride 1 costs 4x
    more on a whole-torso volume). ``detector``: MONAI's residual UNet mapping every class over the volume
    (logits of shape (classes, *spatial)), trained from findings; see :mod:`labelloop_app.detector`.
    """
    if name == "densenet121":
        return DenseNet121(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=num_classes,
            init_features=int(features[0]),
            growth_rate=int(features[1]),
        )
    if name in ("resnet10", "resnet18"):
        make = resnet10 if name == "resnet10" else resnet18
        return make(spatial_dims=3, n_input_channels=in_channels, num_classes=num_classes, conv1_t_stride=2)
    if name == "detector":  # voxel logits per class, see labelloop_app.detector
        return ClassMapUNet(
            num_classes,
            spatial_dims=3,
            in_channels=in_channels,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            num_res_units=1,
        )
    raise ValueError(f"unknown classification network {name!r}")
