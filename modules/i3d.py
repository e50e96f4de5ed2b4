"""The Inflated 3D ConvNet (I3D) that turns 16-frame windows of sign video into 1024-d clip features.

Architecture: Carreira and Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
Dataset", CVPR 2017, an Inception-v1 network whose 2-D filters are inflated to 3-D. Layer names,
channel counts and TensorFlow-style "same" padding follow the convention of the public PyTorch port
that the BSL-1K checkpoints (``bsl5k.pth.tar``) were saved with, so those weights load by name:
``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_4b.b1b.bn.running_mean``, ``logits.conv3d.bias``, ...

For a window of 16 RGB frames at 224 x 224, the last inception block outputs a [1024, 2, 7, 7] map.
The average of that map is the clip embedding used as the video feature.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WINDOW_FRAMES = 16
CROP_SIZE = 224
EMBED_DIM = 1024
# Sign classes of BSL-1K. A loaded checkpoint's logits layer sets its own count (build_i3d reads it).
BSL1K_CLASSES = 1064

# Batch normalisation of the TensorFlow I3D, kept so that the converted weights give the same outputs.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# Output channels of the four branches of each inception block:
# (1x1, 1x1 -> 3x3, 1x1 -> 3x3, 3x3 max pool -> 1x1), the middle two as (reduce, out).
INCEPTION_CHANNELS = {
    "Mixed_3b": (64, (96, 128), (16, 32), 32),
    "Mixed_3c": (128, (128, 192), (32, 96), 64),
    "Mixed_4b": (192, (96, 208), (16, 48), 64),
    "Mixed_4c": (160, (112, 224), (24, 64), 64),
    "Mixed_4d": (128, (128, 256), (24, 64), 64),
    "Mixed_4e": (112, (144, 288), (32, 64), 64),
    "Mixed_4f": (256, (160, 320), (32, 128), 128),
    "Mixed_5b": (256, (160, 320), (32, 128), 128),
    "Mixed_5c": (384, (192, 384), (48, 128), 128),
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Return the (before, after) padding of one axis for TensorFlow's "same" rule.

    The output then has ceil(size / stride) positions. An odd total puts the extra pixel after,
    as TensorFlow does.
    """
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Pad a [B, C, T, H, W] tensor with zeros so that a kernel with this stride keeps ceil(n / stride) positions."""
    pads: list[int] = []
    # F.pad lists the last axis first.
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        pads.extend(same_padding(size, k, s))
    if not any(pads):
        return x
    return F.pad(x, pads)


def _triple(value: Union[int, Sequence[int]]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return value, value, value
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values (time, height, width), got {value}")
    return tuple(int(v) for v in value)


class Unit3D(nn.Module):
    """A 3-D convolution with "same" padding, optionally followed by batch norm and ReLU.

    Parameter names are ``conv3d.*`` and ``bn.*``; the convolution has a bias only without batch norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Union[int, Sequence[int]] = 1,
        stride: Union[int, Sequence[int]] = 1,
        batch_norm: bool = True,
        activation: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)
        self.activation = activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, stride=self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max pooling with "same" padding.

    The padding is zeros, which acts like TensorFlow's -inf padding because every pool here
    follows a ReLU and so receives no negative input.
    """

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel = _triple(kernel)
        self.stride = _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four parallel branches concatenated along the channels.

    ``b0``: 1x1x1; ``b1a`` -> ``b1b``: 1x1x1 then 3x3x3; ``b2a`` -> ``b2b``: 1x1x1 then 3x3x3;
    ``b3a`` -> ``b3b``: 3x3x3 max pool (stride 1) then 1x1x1.
    """

    def __init__(self, in_channels: int, b0: int, b1: tuple[int, int], b2: tuple[int, int], b3: int) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, b0)
        self.b1a = Unit3D(in_channels, b1[0])
        self.b1b = Unit3D(b1[0], b1[1], kernel=3)
        self.b2a = Unit3D(in_channels, b2[0])
        self.b2b = Unit3D(b2[0], b2[1], kernel=3)
        self.b3a = MaxPool3dSame(kernel=(3, 3, 3), stride=(1, 1, 1))
        self.b3b = Unit3D(in_channels, b3)
        self.out_channels = b0 + b1[1] + b2[1] + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """Inception I3D for RGB input, returning the clip embedding and the class logits.

    Args:
        num_classes: outputs of the 1x1x1 logits layer, 1,064 for BSL-1K. :func:`build_i3d` reads
            the count of a checkpoint from its logits layer.
        width_mult: scales every channel count. 1.0 is the real network with a 1024-d embedding;
            smaller values give a small network of the same depth and layout for tests and demos.
        dropout: dropout before the logits layer (inactive in eval mode, so it never touches the
            embedding).
        in_channels: input channels, 3 for RGB.
    """

    def __init__(
        self,
        num_classes: int = BSL1K_CLASSES,
        width_mult: float = 1.0,
        dropout: float = 0.5,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.width_mult = width_mult

        def width(channels: int) -> int:
            return max(1, round(channels * width_mult))

        self.Conv3d_1a_7x7 = Unit3D(in_channels, width(64), kernel=7, stride=2)
        self.MaxPool3d_2a_3x3 = MaxPool3dSame(kernel=(1, 3, 3), stride=(1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(width(64), width(64))
        self.Conv3d_2c_3x3 = Unit3D(width(64), width(192), kernel=3)
        self.MaxPool3d_3a_3x3 = MaxPool3dSame(kernel=(1, 3, 3), stride=(1, 2, 2))

        channels = width(192)
        for name in ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
                     "Mixed_5b", "Mixed_5c"):
            b0, (b1r, b1), (b2r, b2), b3 = INCEPTION_CHANNELS[name]
            block = InceptionBlock(channels, width(b0), (width(b1r), width(b1)), (width(b2r), width(b2)), width(b3))
            setattr(self, name, block)
            channels = block.out_channels
            if name == "Mixed_3c":
                self.MaxPool3d_4a_3x3 = MaxPool3dSame(kernel=(3, 3, 3), stride=(2, 2, 2))
            elif name == "Mixed_4f":
                self.MaxPool3d_5a_2x2 = MaxPool3dSame(kernel=(2, 2, 2), stride=(2, 2, 2))

        self.embed_dim = channels
        self.dropout = nn.Dropout(dropout)
        self.logits = Unit3D(channels, num_classes, batch_norm=False, activation=False, bias=True)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Run the convolutional trunk.

        Args:
            video: float [B, 3, T, H, W] frames, normalised as (pixel / 255 - 0.5).

        Returns:
            The Mixed_5c map [B, embed_dim, ceil(T / 8), ceil(H / 32), ceil(W / 32)]; [B, 1024, 2, 7, 7]
            for 16 x 224 x 224 input.
        """
        if video.ndim != 5:
            raise ValueError(f"expected video [B, C, T, H, W], got shape {tuple(video.shape)}")
        x = self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(video))
        x = self.MaxPool3d_3a_3x3(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)))
        x = self.MaxPool3d_4a_3x3(self.Mixed_3c(self.Mixed_3b(x)))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = self.MaxPool3d_5a_2x2(x)
        return self.Mixed_5c(self.Mixed_5b(x))

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Return the clip embeddings [B, embed_dim]: the average of the Mixed_5c map over time and space.

        For 16 x 224 x 224 input this equals the released network's 2 x 7 x 7 average pool. The mean
        over the whole map also accepts the smaller frames of tests.
        """
        return self.features(video).mean(dim=(2, 3, 4))

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"embedding": [B, embed_dim], "logits": [B, num_classes]}`` for video [B, 3, T, H, W]."""
        embedding = self.embed(video)
        logits = self.logits(self.dropout(embedding[:, :, None, None, None]))
        return {"embedding": embedding, "logits": logits.flatten(1)}


def read_i3d_state_dict(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Read I3D weights saved with ``torch.save``: a bare state dict or a dict with a ``state_dict`` entry.

    The ``module.`` prefix that DataParallel adds is stripped. The file is read with
    ``weights_only=True``, so it cannot run code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file contains something other than a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D checkpoint not found: {path}; pass the path of bsl5k.pth.tar (BSL-1K "
                                "weights) or of a fine-tuned I3D with --i3d_checkpoint")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises UnpicklingError, RuntimeError and others for bad files
        raise ValueError(f"{path}: cannot read this file as a torch checkpoint of tensors ({error})") from error
    state = content.get("state_dict", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: expected a state dict or a dict with a 'state_dict' entry")

    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} of the state dict is a {type(value).__name__}, not a tensor")
        tensors[key.removeprefix("module.")] = value
    return tensors


def load_i3d_checkpoint(
    model: InceptionI3d,
    path: Union[str, Path],
    allow_partial: bool = False,
) -> dict[str, list[str]]:
    """Load I3D weights from ``path`` into ``model`` by parameter name.

    Args:
        model: the network to fill.
        path: a ``torch.save`` file (see :func:`read_i3d_state_dict`), such as ``bsl5k.pth.tar``.
        allow_partial: load the matching tensors and only log the others. Without it, any missing,
            unexpected or mis-shaped key raises.

    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [...]}`` with the key names;
        a mismatched entry reads ``"name: checkpoint (a, b) vs model (c, d)"``.

    Raises:
        ValueError: the keys do not match and ``allow_partial`` is False.
    """
    return _load_state(model, read_i3d_state_dict(path), path, allow_partial)


def _load_state(
    model: InceptionI3d, state: dict[str, torch.Tensor], path: Union[str, Path], allow_partial: bool
) -> dict[str, list[str]]:
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    # Batch-norm step counters do not affect inference; older checkpoints do not store them.
    missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}

    if any(report.values()):
        details = "; ".join(f"{kind} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                            for kind, keys in report.items() if keys)
        if not allow_partial:
            raise ValueError(f"{path}: the weights do not match InceptionI3d(num_classes={model.num_classes}, "
                             f"width_mult={model.width_mult}): {details}. Check that the file is an RGB I3D "
                             "checkpoint, or allow a partial load")
        logger.warning("%s: partial load, %s", path, details)

    loadable = {key: value for key, value in state.items() if key in own and value.shape == own[key].shape}
    model.load_state_dict(loadable, strict=False)
    logger.info("loaded %d of %d I3D tensors from %s", len(loadable), len(own), path)
    return report


def build_i3d(
    checkpoint: Optional[Union[str, Path]] = None,
    width_mult: float = 1.0,
    num_classes: Optional[int] = None,
    allow_partial: bool = False,
) -> InceptionI3d:
    """Build an I3D in eval mode, with weights from ``checkpoint`` or randomly initialised without one.

    The class count is read from the checkpoint's ``logits.conv3d.weight`` unless ``num_classes``
    is given (BSL-1K checkpoints differ in their vocabularies, and the embedding does not depend
    on the count).
    """
    if checkpoint is None:
        model = InceptionI3d(num_classes=num_classes or BSL1K_CLASSES, width_mult=width_mult)
        return model.eval()

    state = read_i3d_state_dict(checkpoint)
    if num_classes is None:
        logits_weight = state.get("logits.conv3d.weight")
        num_classes = int(logits_weight.shape[0]) if logits_weight is not None else BSL1K_CLASSES
    model = InceptionI3d(num_classes=num_classes, width_mult=width_mult)
    _load_state(model, state, checkpoint, allow_partial)
    return model.eval()


def describe(model: InceptionI3d) -> dict[str, Any]:
    """Return a short summary for logs: class count, width multiplier, embedding width and parameter count."""
    return {
        "num_classes": model.num_classes,
        "width_mult": model.width_mult,
        "embed_dim": model.embed_dim,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }
