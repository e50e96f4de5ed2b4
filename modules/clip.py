"""CLIP text transformer and the video "FeatureTransformer", with OpenAI's parameter names.

The parameter names follow OpenAI's ViT-B/32 checkpoint so that `ViT-B-32.pt` loads by name. Two tensors of
the image tower do not fit the video tower, so they keep their initialisation. `visual.conv1.weight` is a patch
convolution (768, 3, 32, 32) in the checkpoint and a 1x1 projection of 1024-d I3D features (768, 1024, 1, 1)
here. `visual.positional_embedding` has 50 rows there and 1 + feature_len rows here.

All tensors are batch-first: [B, N, width]. Masks are 1 (True) for valid positions.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Integer entries of OpenAI's TorchScript state dict that describe the model instead of holding weights.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# Width of one attention head in every OpenAI CLIP ViT model, used to infer the head count from a width.
HEAD_WIDTH = 64


# ---------------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class CLIPConfig:
    """Architecture sizes of the text tower and the video tower (defaults: CLIP ViT-B/32)."""

    # Dimension D of the joint embedding space that both towers project into.
    embed_dim: int = 512
    # Size of the BPE vocabulary, i.e. rows of `token_embedding`.
    vocab_size: int = 49408
    # Rows of the text positional embedding, as in OpenAI's checkpoint. A text of length Lt uses the first Lt rows.
    context_length: int = 77
    # Hidden width of the text transformer.
    text_width: int = 512
    # Number of residual blocks of the text transformer.
    text_layers: int = 12
    # Number of attention heads of the text transformer.
    text_heads: int = 8
    # Dimension of one input video feature (I3D clip embedding).
    video_input_dim: int = 1024
    # Hidden width of the video transformer.
    video_width: int = 768
    # Number of residual blocks of the video transformer.
    video_layers: int = 12
    # Number of attention heads of the video transformer.
    video_heads: int = 12
    # Number L of video clips per sample. The video positional embedding has 1 + L rows.
    feature_len: int = 64

    @classmethod
    def vit_b32(cls) -> "CLIPConfig":
        """Return the configuration of CLIP ViT-B/32 with 64 video clips."""
        return cls()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CLIPConfig":
        """Build a config from a mapping, raising ValueError on keys that are not config fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CLIPConfig keys {unknown}. Valid keys are {sorted(known)}")
        return cls(**dict(values))

    def __post_init__(self) -> None:
        for name, width, heads in (("text", self.text_width, self.text_heads),
                                   ("video", self.video_width, self.video_heads)):
            if heads <= 0 or width % heads != 0:
                raise ValueError(f"{name}_width={width} is not divisible by {name}_heads={heads}")


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = set()
    for key in state_dict:
        if key.startswith(prefix):
            indices.add(int(key[len(prefix):].split(".", 1)[0]))
    return len(indices)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], feature_len: int = 64) -> CLIPConfig:
    """Infer a CLIPConfig from the tensor shapes of an OpenAI CLIP ViT state dict (or of a CLIP module's own).

    Head counts are width // 64, as in every OpenAI ViT model. For an image checkpoint, whose `visual.conv1`
    is a patch convolution, `video_input_dim` keeps its default (1024) and `feature_len` is the argument. For a
    state dict of this module (1x1 `visual.conv1`), both are read from `visual.conv1.weight` and
    `visual.positional_embedding`, and the argument is ignored with a warning when it disagrees.
    """
    required = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                "visual.class_embedding", "visual.conv1.weight", "visual.positional_embedding")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise KeyError(f"cannot infer the CLIP config: the state dict lacks {missing}")

    # NOTE: head counts are not stored in the weights. width // 64 holds for OpenAI's ViT models only.
    text_width = state_dict["ln_final.weight"].shape[0]
    video_width = state_dict["visual.class_embedding"].shape[0]
    for name, width in (("text", text_width), ("video", video_width)):
        if width % HEAD_WIDTH != 0:
            raise ValueError(f"cannot infer {name}_heads: width {width} is not a multiple of {HEAD_WIDTH}, and "
                             "head counts are not stored in the weights. Build a CLIPConfig explicitly.")
    conv1 = state_dict["visual.conv1.weight"]
    video_input_dim = CLIPConfig.video_input_dim

    # A 1x1 kernel marks a checkpoint of this video tower, which fixes the input size and the clip count.
    if tuple(conv1.shape[2:]) == (1, 1):
        video_input_dim = conv1.shape[1]
        stored_len = state_dict["visual.positional_embedding"].shape[0] - 1
        if stored_len != feature_len:
            logger.warning("feature_len=%d ignored: the state dict has a video positional embedding for %d clips",
                           feature_len, stored_len)
        feature_len = stored_len

    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        context_length=state_dict["positional_embedding"].shape[0],
        text_width=text_width,
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        text_heads=text_width // HEAD_WIDTH,
        video_input_dim=video_input_dim,
        video_width=video_width,
        video_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        video_heads=video_width // HEAD_WIDTH,
        feature_len=feature_len,
    )


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in fp32 and returns the input dtype, so fp16 weights stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """GELU approximation x * sigmoid(1.702 x) that CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _QuickGELUProjection(torch.autograd.Function):
    """``linear(QuickGELU(hidden), weight, bias)`` that keeps only ``hidden`` for backward.

    Autograd's composition keeps three [..., 4 * width] tensors per block (the hidden layer, its sigmoid
    and the activation fed to ``c_proj``). This keeps the hidden layer alone and recomputes the rest in
    backward, one elementwise pass, which cuts the transformers' activation memory by about a third.
    The forward pass runs the same operations as :class:`QuickGELU` followed by ``F.linear``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        activation = hidden * torch.sigmoid(1.702 * hidden)
        ctx.save_for_backward(hidden, weight)
        ctx.bias_dtype = bias.dtype
        # Under autocast F.linear casts the weight itself; the explicit cast covers the disabled case.
        return F.linear(activation, weight.to(activation.dtype), bias.to(activation.dtype))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        hidden, weight = ctx.saved_tensors
        gate = torch.mul(hidden, 1.702).sigmoid_()
        activation = hidden * gate
        grad_output = grad_output.to(hidden.dtype)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (flat_grad.t() @ activation.reshape(-1, hidden.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            # d/dh [h * s] = s + a * (h * s) * (1 - s), with s = sigmoid(a h) and a = 1.702. The
            # in-place steps reuse the two recomputed buffers instead of allocating new ones.
            derivative = torch.rsub(gate, 1.0).mul_(activation).mul_(1.702).add_(gate)
            grad_hidden = (grad_output @ weight.to(hidden.dtype)).mul_(derivative)
        return grad_hidden, grad_weight, grad_bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA.

    The names `in_proj_weight` [3 * width, width], `in_proj_bias` [3 * width] and `out_proj` match the
    checkpoint. The attention itself runs in `F.scaled_dot_product_attention` on [B, heads, N, head_dim].
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.width = width
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # Same defaults as nn.MultiheadAttention: Xavier-uniform input projection and zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend x [B, N, width] to itself and return [B, N, width]. key_padding_mask [B, N] is True for valid keys."""
        batch, length, _ = x.shape
        head_dim = self.width // self.heads

        # [B, N, 3 * width] -> 3 x [B, heads, N, head_dim]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)

        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = key_padding_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, N]
            if causal:
                lower = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                attn_mask = attn_mask & lower
                causal = False

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, length, self.width)  # [B, N, width]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x QuickGELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)
        # Recompute the MLP activation in backward instead of storing it (same values, less memory).
        # A plain attribute, so state dicts are unchanged; the benchmark turns it off for its baseline.
        self.recompute_activation = True

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Map x [B, N, width] to [B, N, width]. key_padding_mask [B, N] is True (1) for valid keys."""
        x = x + self.attn(self.ln_1(x), causal=causal, key_padding_mask=key_padding_mask)
        return x + self._mlp(self.ln_2(x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute_activation and torch.is_grad_enabled()):
            return self.mlp(x)
        hidden = self.mlp.c_fc(x)
        return _QuickGELUProjection.apply(hidden, self.mlp.c_proj.weight, self.mlp.c_proj.bias)


class Transformer(nn.Module):
    """Stack of `layers` residual attention blocks of one width, stored as `resblocks.<i>`."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Map x [B, N, width] to [B, N, width], applying the same masks in every block."""
        for block in self.resblocks:
            x = block(x, causal=causal, key_padding_mask=key_padding_mask)
        return x

    def init_parameters(self) -> None:
        """Draw CLIP's normal initialisation, with the output projections scaled down by sqrt(2 * layers)."""
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


# ---------------------------------------------------------------------------------------------------------------------
# towers


class FeatureTransformer(nn.Module):
    """Video tower: a ViT whose patch embedding is replaced by a per-clip linear map of I3D features."""

    def __init__(self, input_dim: int, width: int, layers: int, heads: int, feature_len: int,
                 embed_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.feature_len = feature_len
        # A 1x1 convolution keeps the checkpoint's name and layout, and it acts as a linear map per time step.
        self.conv1 = nn.Conv2d(input_dim, width, kernel_size=1, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + feature_len, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Encode clips into token features.

        Args:
            video: float [B, L, input_dim] clip features, L = feature_len, zero-padded in time.
            video_mask: [B, 1 + L] (long, bool or float). 1 marks a real clip at positions 1..L, and
                position 0 (the CLS slot) must be 0 so that CLS is never attended to as a key.
        Returns:
            [B, 1 + L, embed_dim] un-normalised tokens (CLS first). Every position is computed as a query,
            including CLS and padded clips, and only the keys are masked.
        """
        self._check_inputs(video, video_mask)
        weight = self.conv1.weight

        # [B, L, input_dim] -> [B, L, width]
        x = F.linear(video.to(weight.dtype), weight.flatten(1))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)  # [B, 1 + L, width]
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))

        x = self.transformer(x, key_padding_mask=video_mask != 0)
        return self.ln_post(x) @ self.proj  # [B, 1 + L, embed_dim]

    def _check_inputs(self, video: torch.Tensor, video_mask: torch.Tensor) -> None:
        if video.dim() != 3 or video.shape[1] != self.feature_len or video.shape[2] != self.input_dim:
            raise ValueError(f"video must have shape [B, {self.feature_len}, {self.input_dim}] "
                             f"(batch, feature_len, input_dim), got {list(video.shape)}")
        expected_mask = [video.shape[0], 1 + self.feature_len]
        if list(video_mask.shape) != expected_mask:
            raise ValueError(f"video_mask must have shape {expected_mask} (CLS slot + one entry per clip), "
                             f"got {list(video_mask.shape)}")

        # One host synchronisation checks both rules. A row with no valid key would make SDPA return NaN.
        valid = video_mask != 0
        bad_rows = valid[:, 0] | ~valid[:, 1:].any(dim=1)
        if bool(bad_rows.any()):
            rows = bad_rows.nonzero().flatten().tolist()
            raise ValueError(f"invalid video_mask rows {rows}: position 0 (CLS) must be 0 and at least one "
                             "clip (positions 1..L) must be 1")


class CLIP(nn.Module):
    """CLIP text transformer plus the video FeatureTransformer (attribute `visual`), returning token features."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads)
        self.ln_final = LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.visual = FeatureTransformer(config.video_input_dim, config.video_width, config.video_layers,
                                         config.video_heads, config.feature_len, config.embed_dim)
        self.init_parameters()

    def init_parameters(self) -> None:
        """Draw OpenAI CLIP's initialisation for the text tower and the video blocks.

        OpenAI's recipe draws only the text blocks this way, and the video blocks get the same width-scaled
        normals here. `visual.class_embedding`, `visual.positional_embedding` and `visual.proj` are
        N(0, 1/width) from the constructor, and `visual.conv1` keeps PyTorch's default Conv2d init.
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_parameters()
        nn.init.normal_(self.text_projection, std=self.config.text_width ** -0.5)
        self.visual.transformer.init_parameters()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the projection weights, which the inputs are cast to."""
        return self.visual.conv1.weight.dtype

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Encode token ids [B, Lt] (Lt <= context_length) into all Lt un-normalised tokens [B, Lt, embed_dim].

        The transformer is causal, so token j depends only on ids 0..j and padding after EOT changes nothing
        before it. No pooling is applied, and the EOT token (argmax id) is CLIP's sentence feature.
        """
        if text_ids.dim() != 2:
            raise ValueError(f"text_ids must have shape [B, Lt], got {list(text_ids.shape)}")
        length = text_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"text length {length} exceeds context_length={self.config.context_length}")

        x = self.token_embedding(text_ids).to(self.dtype)  # [B, Lt, text_width]
        x = x + self.positional_embedding[:length].to(x.dtype)
        x = self.transformer(x, causal=True)
        return self.ln_final(x) @ self.text_projection  # [B, Lt, embed_dim]

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor:
        """Encode video [B, L, input_dim] with video_mask [B, 1 + L] into tokens [B, 1 + L, embed_dim]."""
        return self.visual(video, video_mask)

    @staticmethod
    def text_mask(text_ids: torch.Tensor) -> torch.Tensor:
        """Return the float text mask [B, Lt]: 1 from SOT through EOT (the argmax id) inclusive, 0 after."""
        eot = text_ids.argmax(dim=-1, keepdim=True)  # [B, 1]
        positions = torch.arange(text_ids.shape[-1], device=text_ids.device)
        return (positions <= eot).float()


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint loading


@dataclass
class LoadReport:
    """Outcome of copying a checkpoint into a CLIP module, by parameter name."""

    # Model keys whose checkpoint tensor was copied.
    loaded: List[str] = field(default_factory=list)
    # Model keys absent from the checkpoint, which keep their initialisation.
    missing: List[str] = field(default_factory=list)
    # Checkpoint keys with no counterpart in the model.
    unexpected: List[str] = field(default_factory=list)
    # (key, checkpoint shape, model shape) for names present in both with different shapes.
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # torch.save archives contain data.pkl and data/, and only TorchScript adds serialised code and constants.
    return any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names)


def read_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read the tensors of a CLIP checkpoint on CPU, without OpenAI's integer metadata entries.

    Accepts OpenAI's TorchScript archive (e.g. `ViT-B-32.pt`), a state dict saved with torch.save, or a dict
    with a "state_dict" entry. Raises FileNotFoundError for a missing file and ValueError for any other file.
    Never downloads anything.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}. Nothing is downloaded: copy OpenAI's "
                                "ViT-B-32.pt (TorchScript archive) to this path or pass the path of your copy.")

    if _is_torchscript_archive(path):
        # OpenAI publishes its weights only as TorchScript, so the deprecated loader is the one that reads them.
        # Its unpickler builds only TorchScript types and never imports Python callables named in the file.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            try:
                state: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
            except RuntimeError as error:
                reason = str(error).strip().replace("\n", " ")[:300]
                raise ValueError(f"cannot read {path} as a TorchScript archive ({reason}). Pass OpenAI's ViT-B-32.pt "
                                 "or a state dict saved with torch.save") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"rejected {path}: it contains Python objects other than tensors and containers, and "
                             "loading them could run code from the file. Pass OpenAI's ViT-B-32.pt or a state dict "
                             "saved with torch.save") from error
        except (RuntimeError, ValueError, EOFError, KeyError) as error:
            # The restricted unpickler's messages run over many lines, so only the first one is kept.
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"cannot read {path}: it is neither a TorchScript archive nor a state dict saved "
                             f"with torch.save ({type(error).__name__}: {reason})") from error

    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"invalid checkpoint {path}: expected a state dict (name -> tensor), "
                         f"got a {type(state).__name__}")

    tensors: Dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in state.items():
        if key in OPENAI_METADATA_KEYS:
            continue
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        else:
            skipped.append(key)
    if skipped:
        logger.warning("ignored %d non-tensor entries of %s: %s", len(skipped), path, skipped)
    return tensors


def load_state_dict_into(model: CLIP, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor whose name and shape match into model, cast to the model's dtype, and report the rest."""
    report = LoadReport()
    own = model.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            if key not in state_dict:
                report.missing.append(key)
                continue
            source = state_dict[key]
            if source.shape != target.shape:
                report.mismatched.append((key, tuple(source.shape), tuple(target.shape)))
                continue
            target.copy_(source.to(dtype=target.dtype, device=target.device))
            report.loaded.append(key)
    report.unexpected = [key for key in state_dict if key not in own]

    logger.info("loaded %d of %d CLIP tensors", len(report.loaded), len(own))
    if report.mismatched:
        described = "; ".join(f"{key}: checkpoint {src} vs model {dst}" for key, src, dst in report.mismatched)
        logger.warning("kept the model's initialisation for shape-mismatched keys: %s", described)
    if report.missing:
        logger.warning("keys missing from the checkpoint (kept initialised): %s", report.missing)
    if report.unexpected:
        logger.warning("checkpoint keys not used by the model: %s", report.unexpected)
    return report


def load_openai_weights(model: CLIP, path: Union[str, Path]) -> LoadReport:
    """Load an OpenAI CLIP checkpoint (TorchScript or torch.save state dict) into model by name and shape."""
    return load_state_dict_into(model, read_checkpoint(path))


def build_clip(config: Optional[CLIPConfig] = None,
               pretrained: Optional[Union[str, Path]] = None) -> Tuple[CLIP, Optional[LoadReport]]:
    """Build a CLIP module and optionally load a checkpoint into it.

    Without a config, the sizes are inferred from the checkpoint when one is given, and are ViT-B/32's
    otherwise. Returns the model in fp32 and the load report (None without a checkpoint).
    """
    state_dict = read_checkpoint(pretrained) if pretrained is not None else None
    if config is None:
        config = config_from_state_dict(state_dict) if state_dict is not None else CLIPConfig.vit_b32()
    model = CLIP(config)
    report = load_state_dict_into(model, state_dict) if state_dict is not None else None
    return model, report
