"""Token-wise softmax similarity between videos and texts (CiCo and UPRet).

With v_{a,i} and t_{b,j} the L2-normalised video and text token features, s_ab(i, j) = <v_{a,i}, t_{b,j}>
and temperature tau:

    clip-to-words  c_ab(i) = sum_j softmax_j(s_ab(i, .) / tau)_j * s_ab(i, j)
    word-to-clips  w_ab(j) = sum_i softmax_i(s_ab(., j) / tau)_i * s_ab(i, j)
    I2T_ab = sum_i alpha_{a,i} * c_ab(i)          (alpha: video token weights, 0 at invalid clips)
    T2I_ab = sum_j beta_{b,j} * w_ab(j)           (beta: text token weights, 0 outside SOT..EOT)

By default the inner softmaxes run over ALL positions of the other modality, including the video
CLS slot, padded clips and text padding, as the released code did. Passing the other modality's
mask restricts the inner softmax to its valid positions instead.

The dense functions build [Bv, Bt, Tv, Tt] tensors and are meant for a training batch.
`inference_score` processes a gallery in blocks so that the full tensor never exists.

NOTE: for backward, each direction keeps two [Bv, Bt, Tv, Tt] tensors (the similarities and the
softmax weights). For a 512 x 512 batch with Tv = 65 and Tt = 32 in float32 that is 2.2 GB each,
about 9 GB for both directions, before the temporaries of the forward pass.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["i2t_similarity", "t2i_similarity", "inference_score"]

DEFAULT_TAU = 0.07


def _masked_fill_invalid(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Set `logits` to the lowest finite value where `valid` is False, so their softmax weight is 0."""
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min)


def _i2t_normalized(
    video: torch.Tensor,
    video_weights: torch.Tensor,
    text: torch.Tensor,
    tau: float,
    text_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """I2T on already L2-normalised tokens: video [Bv, Tv, D], text [Bt, Tt, D] -> [Bv, Bt]."""
    sim = torch.einsum("aid,bjd->abij", video, text)  # [Bv, Bt, Tv, Tt]
    logits = sim / tau
    if text_mask is not None:
        logits = _masked_fill_invalid(logits, text_mask.bool()[None, :, None, :])
    clip_scores = (logits.softmax(dim=-1) * sim).sum(dim=-1)  # [Bv, Bt, Tv]
    return torch.einsum("abi,ai->ab", clip_scores, video_weights.to(clip_scores.dtype))


def _t2i_normalized(
    video: torch.Tensor,
    text: torch.Tensor,
    text_weights: torch.Tensor,
    tau: float,
    video_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """T2I on already L2-normalised tokens: video [Bv, Tv, D], text [Bt, Tt, D] -> [Bv, Bt]."""
    # The video axis goes last so that the softmax runs over the contiguous dimension.
    sim = torch.einsum("aid,bjd->abji", video, text)  # [Bv, Bt, Tt, Tv]
    logits = sim / tau
    if video_mask is not None:
        logits = _masked_fill_invalid(logits, video_mask.bool()[:, None, None, :])
    word_scores = (logits.softmax(dim=-1) * sim).sum(dim=-1)  # [Bv, Bt, Tt]
    return torch.einsum("abj,bj->ab", word_scores, text_weights.to(word_scores.dtype))


def i2t_similarity(
    video_tokens: torch.Tensor,
    video_weights: torch.Tensor,
    text_tokens: torch.Tensor,
    tau: float = DEFAULT_TAU,
    text_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Compute the clip-to-words similarity I2T_ab = sum_i alpha_{a,i} c_ab(i) for every video-text pair.

    Args:
        video_tokens: [Bv, Tv, D] un-normalised video token features.
        video_weights: [Bv, Tv] clip weights (learned or uniform), 0 at the CLS slot and at padding.
        text_tokens: [Bt, Tt, D] un-normalised text token features.
        tau: softmax temperature of the inner softmax over words.
        text_mask: optional [Bt, Tt] mask. When given, the inner softmax runs over the valid words
            only. When None, it runs over all Tt positions, as in the released code.

    Returns:
        [Bv, Bt] scores, without any logit scale.
    """
    video = F.normalize(video_tokens, dim=-1)
    text = F.normalize(text_tokens, dim=-1)
    return _i2t_normalized(video, video_weights, text, tau, text_mask)


def t2i_similarity(
    video_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_weights: torch.Tensor,
    tau: float = DEFAULT_TAU,
    video_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Compute the word-to-clips similarity T2I_ab = sum_j beta_{b,j} w_ab(j) for every video-text pair.

    Args:
        video_tokens: [Bv, Tv, D] un-normalised video token features.
        text_tokens: [Bt, Tt, D] un-normalised text token features (the augmented text in training).
        text_weights: [Bt, Tt] word weights, 0 outside SOT..EOT.
        tau: softmax temperature of the inner softmax over clips.
        video_mask: optional [Bv, Tv] mask. When given, the inner softmax runs over the valid clips
            only. When None, it runs over all Tv positions (CLS slot and padding included), as in the
            released code.

    Returns:
        [Bv, Bt] scores, without any logit scale.
    """
    video = F.normalize(video_tokens, dim=-1)
    text = F.normalize(text_tokens, dim=-1)
    return _t2i_normalized(video, text, text_weights, tau, video_mask)


@torch.no_grad()
def inference_score(
    video: Dict[str, torch.Tensor],
    text: Dict[str, torch.Tensor],
    dual_mix: float = 0.5,
    tau: float = DEFAULT_TAU,
    block_size: int = 256,
    masked_softmax: bool = False,
    logit_scale: Optional[float] = None,
) -> torch.Tensor:
    """Score a gallery: S = d * I2T + (1 - d) * T2I with the original (un-augmented) text in both terms.

    The work runs in blocks of `block_size` videos times `block_size` texts, so peak memory is
    about block_size^2 * Tv * Tt floats (a few intermediates of that size) rather than the whole
    gallery's Nv * Nt * Tv * Tt.

    Args:
        video: per-item dict with "tokens" [Nv, Tv, D], "mask" [Nv, Tv] and "weights" [Nv, Tv].
        text: per-item dict with "tokens" [Nt, Tt, D], "mask" [Nt, Tt] and "weights" [Nt, Tt].
        dual_mix: d, the weight of the I2T term.
        tau: temperature of the inner softmaxes.
        block_size: number of videos and of texts per block.
        masked_softmax: restrict the inner softmaxes to valid positions (default: all positions).
        logit_scale: optional multiplier of S, already exponentiated (CiCo reports e^l * S). It does
            not change any ranking.

    Returns:
        [Nv, Nt] float32 scores on the device of the video tokens.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    device = video["tokens"].device
    video_tokens = F.normalize(video["tokens"].float(), dim=-1)
    text_tokens = F.normalize(text["tokens"].to(device).float(), dim=-1)
    video_weights = video["weights"].float()
    text_weights = text["weights"].to(device).float()
    video_mask = video["mask"] if masked_softmax else None
    text_mask = text["mask"].to(device) if masked_softmax else None

    num_videos, num_texts = video_tokens.shape[0], text_tokens.shape[0]
    scores = torch.empty(num_videos, num_texts, dtype=torch.float32, device=device)
    for row in range(0, num_videos, block_size):
        rows = slice(row, row + block_size)
        for col in range(0, num_texts, block_size):
            cols = slice(col, col + block_size)
            i2t = _i2t_normalized(
                video_tokens[rows],
                video_weights[rows],
                text_tokens[cols],
                tau,
                None if text_mask is None else text_mask[cols],
            )
            t2i = _t2i_normalized(
                video_tokens[rows],
                text_tokens[cols],
                text_weights[cols],
                tau,
                None if video_mask is None else video_mask[rows],
            )
            scores[rows, cols] = dual_mix * i2t + (1.0 - dual_mix) * t2i

    if logit_scale is not None:
        scores *= logit_scale
    return scores
