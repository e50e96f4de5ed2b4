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

Memory: a dense implementation keeps [Bv, Bt, Tv, Tt] tensors (the similarities and the softmax
weights) for backward, about 9 GB for a 512 x 512 float32 batch with Tv = 65 and Tt = 32. Here the
training functions go through `_SoftmaxAverage`, an autograd function that processes the query tokens
in chunks of at most `chunk_elements` similarity entries. Its forward keeps only the per-token
averages [N, Bk] and its hand-written backward recomputes each chunk's similarities with one matrix
product. Query tokens whose outer weight is 0 (the CLS slot, padded clips, words after EOT) are
dropped before any similarity is formed, because they contribute nothing to the score.
`inference_score` shares one similarity block between the two directions, since both use the same
text at test time.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["i2t_similarity", "t2i_similarity", "inference_score", "DEFAULT_CHUNK_ELEMENTS"]

DEFAULT_TAU = 0.07

# Similarity entries per chunk: 2^21 float32 values are 8 MiB, and a chunk needs about four
# tensors of that size at once in backward. Larger chunks mean fewer, larger matrix products; at
# ViT-B/32 sizes a chunk of 2^21 entries still covers about 250 query tokens against a 128-video batch.
DEFAULT_CHUNK_ELEMENTS = 1 << 21

# exp(-x) stays a normal float32 number for x below about 87; a margin keeps sums of such terms exact.
_SAFE_EXP_RANGE = 80.0


def _masked_fill_invalid(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Set `logits` to the lowest finite value where `valid` is False, so their softmax weight is 0."""
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min)


def _chunk_rows(num_keys: int, chunk_elements: Optional[int]) -> int:
    budget = DEFAULT_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    if budget < 1:
        raise ValueError(f"chunk_elements must be positive, got {budget}")
    return max(1, budget // max(num_keys, 1))


class _SoftmaxAverage(torch.autograd.Function):
    """Per query token and key item, the softmax-weighted average of its similarities to the item's tokens.

    For query token q_n [D] and key item b with tokens k_{b,1..T} [T, D], with z = <q_n, k_{b,t}> / tau:

        out[n, b] = sum_t softmax_t(z)_t * <q_n, k_{b,t}>

    With p = softmax_t(z), s = <q_n, k_{b,t}> and out = sum_t p_t s_t, the derivative is
    d out / d s_t = p_t * (1 + (s_t - out) / tau). The backward pass recomputes z chunk by chunk
    from the saved inputs, so the memory kept between forward and backward is O(N * B), not
    O(N * B * T).

    NOTE: the recomputation is one extra matrix product per chunk, four instead of the three of a
    dense autograd version. Where the matrix products dominate the time (likely on a GPU, not
    measured yet), the kernel can be up to 4/3 as slow as the dense one when every token is valid.
    On a 2-core CPU the whole training head still ran at 0.94 times the dense time.
    """

    @staticmethod
    def forward(ctx, queries, keys, key_len, key_valid, tau, chunk_rows):
        # queries [N, D], keys [B * T, D], key_valid [B, T] bool or None -> out [N, B]
        num_items = keys.shape[0] // key_len
        inv_tau = 1.0 / tau
        out = queries.new_empty(queries.shape[0], num_items)
        for start in range(0, queries.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (queries[rows] * inv_tau) @ keys.t()  # z [n, B * T]
            logits = logits.view(-1, num_items, key_len)
            masked = logits if key_valid is None else _masked_fill_invalid(logits, key_valid)
            probs = masked.softmax(dim=-1)
            # sum_t p_t s_t = tau * sum_t p_t z_t, with z unmasked because p is 0 at masked positions.
            out[rows] = probs.mul_(logits).sum(dim=-1).mul_(tau)
        ctx.save_for_backward(queries, keys, out, key_valid)
        ctx.key_len, ctx.tau, ctx.chunk_rows = key_len, tau, chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        queries, keys, out, key_valid = ctx.saved_tensors
        key_len, tau, chunk_rows = ctx.key_len, ctx.tau, ctx.chunk_rows
        num_items = keys.shape[0] // key_len
        inv_tau = 1.0 / tau
        grad_out = grad_out.contiguous()
        need_queries, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_queries = torch.empty_like(queries) if need_queries else None
        grad_keys = torch.zeros_like(keys) if need_keys else None
        for start in range(0, queries.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            query_chunk = queries[rows]
            logits = ((query_chunk * inv_tau) @ keys.t()).view(-1, num_items, key_len)  # z = s / tau
            upstream = grad_out[rows].unsqueeze(-1)  # g [n, B, 1]
            # g * (1 + (s - out) / tau) = g * z + g * (1 - out / tau)
            offset = upstream * (1.0 - out[rows].unsqueeze(-1) * inv_tau)
            grad_sim = torch.addcmul(offset, logits, upstream)
            masked = logits if key_valid is None else _masked_fill_invalid(logits, key_valid)
            grad_sim = grad_sim.mul_(masked.softmax(dim=-1)).view(-1, num_items * key_len)  # d loss / d s
            if need_queries:
                torch.mm(grad_sim, keys, out=grad_queries[rows])
            if need_keys:
                grad_keys.addmm_(grad_sim.t(), query_chunk)
        return grad_queries, grad_keys, None, None, None, None


def _weighted_softmax_average(
    queries: torch.Tensor,
    query_weights: torch.Tensor,
    keys: torch.Tensor,
    tau: float,
    key_mask: Optional[torch.Tensor],
    chunk_elements: Optional[int],
) -> torch.Tensor:
    """Return [Bq, Bk] with entry (q, k) = sum_i w_{q,i} * softmax-average of q's token i over item k's tokens.

    `queries` [Bq, Tq, D] and `keys` [Bk, Tk, D] are already L2-normalised, `query_weights` is [Bq, Tq].
    Only query tokens with a non-zero weight are scored. The gradient with respect to a zero weight
    is therefore returned as 0 rather than as the token's average. That is the exact chain-rule
    result whenever the weights come from a masked softmax or a fixed mean, as in the model, because
    there the derivative of a zero weight with respect to the inputs is 0.
    """
    num_queries, query_len, dim = queries.shape
    num_keys, key_len, _ = keys.shape
    flat_weights = query_weights.to(queries.dtype).reshape(-1)
    selected = flat_weights.nonzero().squeeze(-1)  # indices into [Bq * Tq]
    packed = queries.reshape(-1, dim).index_select(0, selected)  # [N, D]
    owner = torch.div(selected, query_len, rounding_mode="floor")  # the query item of each packed token
    key_valid = None if key_mask is None else key_mask.to(keys.device).bool()

    averages = _SoftmaxAverage.apply(
        packed, keys.reshape(-1, dim), key_len, key_valid, tau, _chunk_rows(num_keys * key_len, chunk_elements)
    )  # [N, Bk]
    weighted = averages * flat_weights.index_select(0, selected).unsqueeze(-1)
    return queries.new_zeros(num_queries, num_keys).index_add(0, owner, weighted)


def i2t_similarity(
    video_tokens: torch.Tensor,
    video_weights: torch.Tensor,
    text_tokens: torch.Tensor,
    tau: float = DEFAULT_TAU,
    text_mask: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """Compute the clip-to-words similarity I2T_ab = sum_i alpha_{a,i} c_ab(i) for every video-text pair.

    Args:
        video_tokens: [Bv, Tv, D] un-normalised video token features.
        video_weights: [Bv, Tv] clip weights (learned or uniform), 0 at the CLS slot and at padding.
        text_tokens: [Bt, Tt, D] un-normalised text token features.
        tau: softmax temperature of the inner softmax over words.
        text_mask: optional [Bt, Tt] mask. When given, the inner softmax runs over the valid words
            only. When None, it runs over all Tt positions, as in the released code.
        chunk_elements: similarity entries per chunk (default `DEFAULT_CHUNK_ELEMENTS`); it bounds
            the temporary memory and does not change the result.

    Returns:
        [Bv, Bt] scores, without any logit scale. Clips with weight 0 are skipped, so the gradient
        with respect to a zero weight is 0.
    """
    video = F.normalize(video_tokens, dim=-1)
    text = F.normalize(text_tokens, dim=-1)
    return _weighted_softmax_average(video, video_weights, text, tau, text_mask, chunk_elements)


def t2i_similarity(
    video_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_weights: torch.Tensor,
    tau: float = DEFAULT_TAU,
    video_mask: Optional[torch.Tensor] = None,
    chunk_elements: Optional[int] = None,
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
        chunk_elements: similarity entries per chunk (default `DEFAULT_CHUNK_ELEMENTS`).

    Returns:
        [Bv, Bt] scores, without any logit scale. Words with weight 0 are skipped, so the gradient
        with respect to a zero weight is 0.
    """
    video = F.normalize(video_tokens, dim=-1)
    text = F.normalize(text_tokens, dim=-1)
    return _weighted_softmax_average(text, text_weights, video, tau, video_mask, chunk_elements).t()


def _dual_block(
    video: torch.Tensor,
    video_weights: torch.Tensor,
    text: torch.Tensor,
    text_weights: torch.Tensor,
    dual_mix: float,
    tau: float,
    video_mask: Optional[torch.Tensor],
    text_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Return d * I2T + (1 - d) * T2I [nv, nt] for one block of normalised tokens, from one shared similarity."""
    num_videos, video_len, dim = video.shape
    num_texts, text_len, _ = text.shape
    logits = ((video.reshape(-1, dim) / tau) @ text.reshape(-1, dim).t()).view(num_videos, video_len, num_texts, text_len)

    if video_mask is None and text_mask is None and 2.0 / tau < _SAFE_EXP_RANGE:
        # Unit tokens bound the logits to [-1/tau, 1/tau], so exp(z - 1/tau) lies in [exp(-2/tau), 1]
        # without overflow or underflow, and both softmaxes can share one exponential:
        # softmax-average = sum(e * z) / sum(e) over the words (I2T) or over the clips (T2I).
        exps = (logits - 1.0 / tau).exp_()
        weighted = logits.mul_(exps)  # e * z, in place because z is not needed again
        clip_scores = weighted.sum(dim=-1).div_(exps.sum(dim=-1))  # c / tau [nv, Tv, nt]
        word_scores = weighted.sum(dim=1).div_(exps.sum(dim=1))  # w / tau [nv, nt, Tt]
        i2t = torch.einsum("ain,ai->an", clip_scores, video_weights)
        t2i = torch.einsum("anj,nj->an", word_scores, text_weights)
        return (dual_mix * i2t + (1.0 - dual_mix) * t2i) * tau

    over_words = logits if text_mask is None else _masked_fill_invalid(logits, text_mask.bool()[None, None])
    clip_scores = (over_words.softmax(dim=-1).mul_(logits)).sum(dim=-1)  # c / tau [nv, Tv, nt]
    i2t = torch.einsum("ain,ai->an", clip_scores, video_weights)
    del over_words, clip_scores

    over_clips = logits if video_mask is None else _masked_fill_invalid(logits, video_mask.bool()[:, :, None, None])
    word_scores = (over_clips.softmax(dim=1).mul_(logits)).sum(dim=1)  # w / tau [nv, nt, Tt]
    t2i = torch.einsum("anj,nj->an", word_scores, text_weights)
    return (dual_mix * i2t + (1.0 - dual_mix) * t2i) * tau


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

    The work runs in blocks of `block_size` videos times `block_size` texts. Both directions of a
    block use one similarity tensor of block_size^2 * Tv * Tt floats, and with the softmax
    temporaries the peak is about three such tensors (for block_size 64, Tv = 65 and Tt = 32,
    3 x 34 MB), on top of the [Nv, Nt] score matrix and the normalised token features.

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
            scores[rows, cols] = _dual_block(
                video_tokens[rows],
                video_weights[rows],
                text_tokens[cols],
                text_weights[cols],
                dual_mix,
                tau,
                None if video_mask is None else video_mask[rows],
                None if text_mask is None else text_mask[cols],
            )

    if logit_scale is not None:
        scores *= logit_scale
    return scores
