"""ResNet-18 encoders: ``resnet18_audio`` (spectrograms), ``resnet18_visual`` (frames), ``resnet18_flow`` (optical flow)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avbalance.errors import UserError
from trainer.encoders import ENCODERS
from trainer.encoders.conformer import masked_mean
from trainer.encoders.resnet import ResNet18Trunk


@ENCODERS.register("resnet18_audio")
class ResNet18Audio(nn.Module):
    """Spectrogram (B, 1, F, T) or (B, F, T) -> global average pool -> (B, 8 * width).

    The pipeline's spectrograms have a fixed size (the clip tiled to 3 s), so there is no
    mask. Half-precision input is cast to the weights' dtype. ``input_pool`` > 1 averages
    the spectrogram over ``input_pool`` x ``input_pool`` cells first: a cheaper, coarser
    input for CPU studies (the controlled-imbalance study uses 2); 1 is the paper's input.
    """

    def __init__(self, width: int = 64, in_channels: int = 1, input_pool: int = 1) -> None:
        super().__init__()
        if input_pool < 1:
            raise UserError(f"resnet18_audio: input_pool must be a whole number >= 1, not {input_pool!r}")
        self.input_pool = input_pool
        self.trunk = ResNet18Trunk(in_channels=in_channels, width=width)
        self.out_dim = self.trunk.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.to(self.trunk.stem[0].weight.dtype)
        if self.input_pool > 1:
            x = F.avg_pool2d(x, self.input_pool, ceil_mode=True)
        return self.trunk(x).mean(dim=(2, 3))


@ENCODERS.register("resnet18_visual")
class ResNet18Visual(nn.Module):
    """Frames (B, T, C, H, W) + mask (B, T) (True = real frame) -> (B, 8 * width).

    The 2D trunk runs on the real frames only (gathered from the B x T grid), so padded
    frames cost nothing and never enter batch-norm statistics; each frame is average-pooled
    over space, then the frames of a clip are averaged (masked mean). A clip with no real
    frame gets zeros. ``mask=None`` means every frame is real.
    """

    def __init__(self, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels=in_channels, width=width)
        self.out_dim = self.trunk.out_channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = x.shape[:2]
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        mask = mask.bool()
        flat_mask = mask.reshape(b * t)
        frames = x.reshape(b * t, *x.shape[2:])[flat_mask].to(self.trunk.stem[0].weight.dtype)
        if frames.shape[0] > 0:
            pooled = self.trunk(frames).mean(dim=(2, 3))  # (frames, D); bf16 under autocast
            per_frame = pooled.new_zeros(b * t, self.out_dim).masked_scatter(flat_mask[:, None], pooled)
        else:
            per_frame = torch.zeros(b * t, self.out_dim, dtype=frames.dtype, device=x.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Under DDP a method may tell the reducer that every parameter gets a gradient
                # (find_unused_parameters=False, trainer/loop.py): a batch without one real
                # frame touches the trunk with a zero, so its gradient is zero, not missing.
                per_frame = per_frame + 0.0 * sum(p.sum() for p in self.trunk.parameters())
        return masked_mean(per_frame.view(b, t, self.out_dim), mask)


@ENCODERS.register("resnet18_flow")
class ResNet18Flow(ResNet18Visual):
    """Optical flow (B, T, 2 * stack, H, W) + mask (B, T) -> (B, 8 * width): the visual
    ResNet with a first convolution over ``stack`` stacked x/y flow fields per slot, as the
    two-stream motion network (the balancing benchmarks' UCF-101 flow ResNet18 is stack 1:
    a 2-channel conv1, run per sampled slot, then averaged like the RGB frames)."""

    def __init__(self, width: int = 64, stack: int = 1) -> None:
        if stack < 1:
            raise UserError(f"resnet18_flow: stack must be a whole number >= 1, not {stack!r}")
        super().__init__(width=width, in_channels=2 * stack)
