"""The UPRet retrieval model (and the CiCo baseline): encoders plus per-item heads.

The model only computes per-item features. Everything that pairs videos with texts (token-wise
similarity, optimal transport, the contrastive loss) lives in :mod:`modules.criterion` and
:mod:`modules.similarity`, after the features have been gathered across ranks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from modules.clip import CLIP, CLIPConfig
from modules.heads import (
    DistributionHead,
    TokenWeightHead,
    pool_samples,
    sample_gaussian,
    text_pool_mask,
    uniform_weights,
)

METHODS = ("upret", "cico")

# The released runs clamp the learned temperature at CLIP's maximum, ln(100).
MAX_LOGIT_SCALE = math.log(100.0)


def _full_precision(like: torch.Tensor) -> torch.autocast:
    """Disable autocast: the heads run in fp32 after the encoders, as in the released code."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class RetrievalModel(nn.Module):
    """CLIP text tower and feature transformer with UPRet's token-weight and distribution heads.

    Args:
        clip_config: sizes of the two towers.
        method: ``"upret"`` (learned token weights, distribution heads, Monte Carlo samples) or
            ``"cico"`` (uniform token means, no distribution heads).
        sample_num: K, the number of samples per item; the first sample is the mean itself.
        dist_heads: attention heads of each distribution head.
        dist_dropout: dropout inside the distribution heads.
    """

    def __init__(
        self,
        clip_config: CLIPConfig,
        method: str = "upret",
        sample_num: int = 2,
        dist_heads: int = 8,
        dist_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if sample_num < 1:
            raise ValueError(f"sample_num must be >= 1, got {sample_num}")
        self.method = method
        self.sample_num = sample_num
        self.clip = CLIP(clip_config)

        dim = clip_config.embed_dim
        if method == "upret":
            self.video_weight_fc = TokenWeightHead(dim)
            self.text_weight_fc = TokenWeightHead(dim)
            self.video_dist_head = DistributionHead(dim, heads=dist_heads, dropout=dist_dropout)
            self.text_dist_head = DistributionHead(dim, heads=dist_heads, dropout=dist_dropout)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = MAX_LOGIT_SCALE) -> None:
        self.clip.logit_scale.clamp_(max=max_value)

    def encode_video(
        self, video: torch.Tensor, video_mask: torch.Tensor, with_distribution: bool = False
    ) -> dict[str, torch.Tensor]:
        """Encode clip features into per-token outputs.

        Args:
            video: [B, L, 1024] fused clip features, zero-padded.
            video_mask: [B, 1 + L], 1 for real clips, 0 for the CLS slot and padding.
            with_distribution: also return the Gaussian parameters and pooled samples (UPRet).

        Returns:
            ``tokens`` [B, 1 + L, D] (un-normalised), ``mask`` [B, 1 + L] float, ``weights``
            [B, 1 + L] (sum to 1 over real clips), and with ``with_distribution`` ``log_sigma``
            [B, 1 + L, D] and ``samples`` [B, K, D] (L2-normalised).
        """
        tokens = self.clip.encode_video(video, video_mask).float()
        mask = video_mask.to(tokens.dtype)
        out = {"tokens": tokens, "mask": mask}
        if self.method == "cico":
            out["weights"] = uniform_weights(mask)
            return out

        with _full_precision(tokens):
            out["weights"] = self.video_weight_fc(tokens, mask)
            if with_distribution:
                mu, log_sigma = self.video_dist_head(tokens)
                # With checkpointed heads the noise is drawn again in backward as well.
                samples = sample_gaussian(mu, log_sigma, self.sample_num,
                                          replay_noise=self.video_dist_head.checkpoint_activations)
                out["samples"] = pool_samples(samples, mask)  # samples [B, K, 1 + L, D] -> [B, K, D]
                out["log_sigma"] = log_sigma
        return out

    def encode_text(self, text_ids: torch.Tensor, with_distribution: bool = False) -> dict[str, torch.Tensor]:
        """Encode token ids into per-token outputs.

        Args:
            text_ids: [B, Lt] SOT, BPE ids, EOT, zero padding.
            with_distribution: also return the Gaussian parameters and pooled samples (UPRet).

        Returns:
            ``tokens`` [B, Lt, D] (un-normalised), ``mask`` [B, Lt] (1 from SOT through EOT),
            ``weights`` [B, Lt], and with ``with_distribution`` ``log_sigma`` [B, Lt, D] and
            ``samples`` [B, K, D] pooled over positions 1..EOT (SOT excluded).
        """
        tokens = self.clip.encode_text(text_ids).float()
        mask = CLIP.text_mask(text_ids).to(tokens.dtype)
        out = {"tokens": tokens, "mask": mask}
        if self.method == "cico":
            out["weights"] = uniform_weights(mask)
            return out

        with _full_precision(tokens):
            out["weights"] = self.text_weight_fc(tokens, mask)
            if with_distribution:
                mu, log_sigma = self.text_dist_head(tokens)
                samples = sample_gaussian(mu, log_sigma, self.sample_num,
                                          replay_noise=self.text_dist_head.checkpoint_activations)
                out["samples"] = pool_samples(samples, text_pool_mask(mask))  # [B, K, Lt, D] -> [B, K, D]
                out["log_sigma"] = log_sigma
        return out

    def forward(
        self,
        text_ids: torch.Tensor,
        text_aug_ids: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
    ) -> dict[str, object]:
        """Return the per-item features that :class:`modules.criterion.RetrievalLoss` consumes.

        The original text feeds the clip-to-words direction only, so its heads are skipped. The
        augmented text feeds the words-to-clips direction, the text token weights and the text
        distribution head.
        """
        with_distribution = self.method == "upret"
        return {
            "video": self.encode_video(video, video_mask, with_distribution=with_distribution),
            "text": self._encode_text_tokens(text_ids),
            "text_aug": self.encode_text(text_aug_ids, with_distribution=with_distribution),
            "logit_scale": self.clip.logit_scale,
        }

    def _encode_text_tokens(self, text_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.clip.encode_text(text_ids).float()
        return {"tokens": tokens, "mask": CLIP.text_mask(text_ids).to(tokens.dtype)}


def build_model(
    clip_config: CLIPConfig,
    method: str = "upret",
    sample_num: int = 2,
    dist_heads: int = 8,
    dist_dropout: float = 0.1,
    pretrained_clip: Optional[str] = None,
) -> RetrievalModel:
    """Build a :class:`RetrievalModel`, loading OpenAI CLIP weights from a local file if given."""
    from modules.clip import load_openai_weights

    model = RetrievalModel(clip_config, method, sample_num, dist_heads, dist_dropout)
    if pretrained_clip:
        load_openai_weights(model.clip, pretrained_clip)
    return model
