"""MONAI networks selectable with ``--conf network``; the default is the fastest on a CPU."""

from __future__ import annotations

import torch
from monai.networks.nets import AttentionUnet, DynUNet, SegResNet, UNet


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
