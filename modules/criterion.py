"""Training loss of UPRet and CiCo: symmetric InfoNCE over token-wise similarities, plus UPRet's OT term."""
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .optimal_transport import ot_score
from .similarity import DEFAULT_TAU, i2t_similarity, t2i_similarity

__all__ = ["info_nce", "RetrievalLoss"]

Outputs = Dict[str, Any]


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise InfoNCE: mean cross-entropy of each row of `logits` [N, N] with the diagonal as the positive."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T, D] over the channels of the tokens where `mask` [B, T] is set."""
    weights = mask.to(values.dtype).unsqueeze(-1)  # [B, T, 1]
    count = weights.sum() * values.shape[-1]
    return (values * weights).sum() / count.clamp_min(1.0)


class RetrievalLoss(nn.Module):
    """Contrastive retrieval loss over a (gathered) batch of matching video-text pairs.

    With the logit scale s = exp(logit_scale), I2T from the video tokens and the ORIGINAL text,
    T2I from the video tokens and the AUGMENTED text, and for UPRet the OT score O between the
    pooled samples of the video and of the augmented text:

        M1 = s * I2T + w_ot * O,   M2 = s * T2I + w_ot * O          (ot_mode "logits", O unscaled)
        L = 0.5 * [d * CE(M1) + (1 - d) * CE(M1^T)] + 0.5 * [d * CE(M2^T) + (1 - d) * CE(M2)]

    where CE is the row-wise InfoNCE with the diagonal as positives and d = dual_mix. With
    ot_mode "loss", O is left out of M1 and M2 and the term w_ot * 0.5 * (CE(s O) + CE(s O^T)) is
    added instead. CiCo is the same loss without O. The distribution heads receive gradient only
    through O, and the Sinkhorn plan inside O carries none.

    Gradient convention: `forward` computes the loss of the whole global batch on every process.
    Suppose `gather` is an all-gather whose backward sums the gradients of all W processes and
    returns the local slice, as `modules.distributed.gather_outputs` does. Then each local feature
    receives W times its share of the global-batch gradient, and DDP's averaging over the W
    processes divides that factor out again. Parameters used directly on the gathered tensors,
    such as the logit scale, get the same full gradient on every process, which averaging keeps.
    Either way, the parameter gradients equal those of one process computing the global batch.

    The similarities, the OT term and the loss run in float32 with autocast disabled.
    """

    def __init__(
        self,
        method: str = "upret",
        dual_mix: float = 0.5,
        tau: float = DEFAULT_TAU,
        ot_weight: float = 1.0,
        ot_eps: float = 0.1,
        sinkhorn_iters: int = 100,
        sinkhorn_tol: float = 1e-2,
        ot_aggregation: str = "max",
        ot_mode: str = "logits",
        masked_softmax: bool = False,
        gather: Optional[Callable[[Outputs], Outputs]] = None,
    ) -> None:
        super().__init__()
        if method not in ("upret", "cico"):
            raise ValueError(f"method must be 'upret' or 'cico', got {method!r}")
        if ot_mode not in ("logits", "loss"):
            raise ValueError(f"ot_mode must be 'logits' or 'loss', got {ot_mode!r}")
        if ot_aggregation not in ("max", "inner"):
            raise ValueError(f"ot_aggregation must be 'max' or 'inner', got {ot_aggregation!r}")
        if not 0.0 <= dual_mix <= 1.0:
            raise ValueError(f"dual_mix must lie in [0, 1], got {dual_mix}")
        self.method = method
        self.dual_mix = dual_mix
        self.tau = tau
        self.ot_weight = ot_weight
        self.ot_eps = ot_eps
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_tol = sinkhorn_tol
        self.ot_aggregation = ot_aggregation
        self.ot_mode = ot_mode
        self.masked_softmax = masked_softmax
        self.gather = gather

    def _symmetric_loss(self, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        d = self.dual_mix
        first = d * info_nce(m1) + (1.0 - d) * info_nce(m1.t())
        second = d * info_nce(m2.t()) + (1.0 - d) * info_nce(m2)
        return 0.5 * (first + second)

    def forward(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            outputs: {"video": {"tokens" [B, Tv, D], "mask" [B, Tv], "weights" [B, Tv], and for UPRet
                "samples" [B, K, D], "log_sigma" [B, Tv, D]}, "text": {"tokens" [B, Tt, D], "mask"
                [B, Tt]} for the original text, "text_aug": {"tokens", "mask", "weights", and for UPRet
                "samples", "log_sigma"} for the augmented text, "logit_scale": the scalar log-scale
                parameter}. Tensors are per process; `gather` turns them into the global batch.

        Returns:
            {"loss": total differentiable loss, "loss/infonce", "logit_scale" (exp value), and for
            UPRet "loss/ot", "log_sigma/video", "log_sigma/text"}. Every entry except "loss" is
            detached. "loss/ot" is mean |w_ot * O| in ot_mode "logits" and the OT loss in ot_mode "loss".
            The log-sigma means cover this process's items only.
        """
        log_sigma_terms = {}
        if self.method == "upret":
            # Logged from this process's items only, so the token-sized log-sigma tensors are never gathered.
            video_local, text_local = outputs["video"], outputs["text_aug"]
            log_sigma_terms = {
                "log_sigma/video": _masked_mean(video_local["log_sigma"].detach().float(), video_local["mask"]),
                "log_sigma/text": _masked_mean(text_local["log_sigma"].detach().float(), text_local["mask"]),
            }
            outputs = {
                key: {k: v for k, v in value.items() if k != "log_sigma"} if isinstance(value, dict) else value
                for key, value in outputs.items()
            }
        if self.gather is not None:
            outputs = self.gather(outputs)
        video, text, text_aug = outputs["video"], outputs["text"], outputs["text_aug"]
        device_type = video["tokens"].device.type

        with torch.autocast(device_type=device_type, enabled=False):
            scale = outputs["logit_scale"].float().exp()
            i2t = i2t_similarity(
                video["tokens"].float(),
                video["weights"].float(),
                text["tokens"].float(),
                tau=self.tau,
                text_mask=text["mask"] if self.masked_softmax else None,
            )
            t2i = t2i_similarity(
                video["tokens"].float(),
                text_aug["tokens"].float(),
                text_aug["weights"].float(),
                tau=self.tau,
                video_mask=video["mask"] if self.masked_softmax else None,
            )
            m1, m2 = scale * i2t, scale * t2i

            if self.method == "cico":
                loss = self._symmetric_loss(m1, m2)
                return {"loss": loss, "loss/infonce": loss.detach(), "logit_scale": scale.detach()}

            ot = ot_score(
                video["samples"].float(),
                text_aug["samples"].float(),
                eps=self.ot_eps,
                max_iter=self.sinkhorn_iters,
                tol=self.sinkhorn_tol,
                aggregation=self.ot_aggregation,
            )
            if self.ot_mode == "logits":
                ot_term = self.ot_weight * ot
                infonce = self._symmetric_loss(m1 + ot_term, m2 + ot_term)
                loss = infonce
                ot_log = ot_term.abs().mean()
            else:
                infonce = self._symmetric_loss(m1, m2)
                ot_loss = self.ot_weight * 0.5 * (info_nce(scale * ot) + info_nce(scale * ot.t()))
                loss = infonce + ot_loss
                ot_log = ot_loss

        return {
            "loss": loss,
            "loss/infonce": infonce.detach(),
            "loss/ot": ot_log.detach(),
            **log_sigma_terms,
            "logit_scale": scale.detach(),
        }
