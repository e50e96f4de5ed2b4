"""Training loss of UPRet and CiCo: symmetric InfoNCE over token-wise similarities, plus UPRet's OT term.

The loss can run in one of two layouts. Without sharding, every process scores the whole gathered
batch (B_global^2 pairs). With sharding (`comm` given), each process scores only its own videos
against every gathered text, a strip of B_local x B_global pairs. The processes then exchange a few
vectors of size B_global, so that the column softmaxes and the Sinkhorn stopping test stay global.
"""
import threading
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .optimal_transport import ot_score
from .similarity import DEFAULT_TAU, i2t_similarity, t2i_similarity

__all__ = [
    "info_nce",
    "RetrievalLoss",
    "ShardComm",
    "ProcessGroupComm",
    "ThreadGroup",
    "sharded_cross_entropy",
]

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


class ShardComm(Protocol):
    """The collectives that the sharded loss needs: this process's rank, the world size and an all-gather.

    `all_gather` takes a tensor that carries no gradient and returns [world_size, *shape] on every
    rank, in rank order. Every rank must call it the same number of times with the same shapes.
    """

    rank: int
    world_size: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...


class ProcessGroupComm:
    """`ShardComm` over the default `torch.distributed` process group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().contiguous()
        out = tensor.new_empty((self.world_size,) + tuple(tensor.shape))
        if dist.get_backend() == dist.Backend.NCCL:
            dist.all_gather_into_tensor(out, tensor)
        else:
            dist.all_gather(list(out.unbind(0)), tensor)  # gloo has no all_gather_into_tensor
        return out


class ThreadGroup:
    """Simulated ranks inside one process: one thread per rank, collectives through shared memory.

    Tests and the benchmark use it to run the sharded loss of R ranks without a process group:
    `ThreadGroup(R).run(fn)` calls `fn(comm)` in R threads, each with its own `ShardComm`, and
    returns the R results in rank order.
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be positive, got {world_size}")
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: List[Optional[torch.Tensor]] = [None] * world_size

    class _Member:
        def __init__(self, group: "ThreadGroup", rank: int) -> None:
            self.group, self.rank, self.world_size = group, rank, group.world_size

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            group = self.group
            group._slots[self.rank] = tensor.detach().clone()
            group._barrier.wait()
            out = torch.stack(group._slots)  # type: ignore[arg-type]
            group._barrier.wait()  # no rank overwrites a slot before every rank has read it
            return out

    def comm(self, rank: int) -> ShardComm:
        return ThreadGroup._Member(self, rank)

    def run(self, fn: Callable[[ShardComm], Any]) -> List[Any]:
        results: List[Any] = [None] * self.world_size
        errors: List[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(self.comm(rank))
            except BaseException as error:  # re-raised in the caller below
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def sharded_cross_entropy(
    strips: Sequence[torch.Tensor], offset: int, comm: ShardComm
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Return this rank's shares of the row-wise and column-wise InfoNCE of global logit matrices.

    Each strip [b, B] contains rows offset..offset+b of a global [B, B] matrix M whose positives are on
    the diagonal. For every strip the result is (row_share, column_share) with

        sum over ranks of row_share    = CE(M)   = (1/B) sum_a [logsumexp_b M_ab - M_aa]
        sum over ranks of column_share = CE(M^T) = (1/B) sum_b [logsumexp_a M_ab - M_bb]

    in value and in gradient with respect to the strip. The column log-sum-exps need every rank's
    rows, so the per-strip partial log-sum-exps [B] are exchanged with one all-gather. The column
    share takes its gradient from a surrogate, (1/B) sum exp(M_ab - lse_b) with lse_b held fixed,
    whose derivative is the column softmax, and its value from the rank's own columns.
    """
    num_rows, num_columns = strips[0].shape
    rows = torch.arange(num_rows, device=strips[0].device)
    partial = torch.stack([strip.detach().logsumexp(dim=0) for strip in strips])  # [S, B]
    column_lse = comm.all_gather(partial).logsumexp(dim=0)  # [S, B]

    shares = []
    for strip, lse in zip(strips, column_lse):
        positives = strip[rows, offset + rows]
        row_share = (strip.logsumexp(dim=1) - positives).sum() / num_columns
        surrogate = (strip - lse).exp().sum() / num_columns
        own_lse = lse[offset:offset + num_rows].sum() / num_columns
        column_share = (surrogate - surrogate.detach()) + own_lse - positives.sum() / num_columns
        shares.append((row_share, column_share))
    return shares


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

    Gradient convention without sharding: `forward` computes the loss of the whole global batch on
    every process. `gather` is an all-gather whose backward sums the gradients of all W processes
    and returns the local slice, as `modules.distributed.gather_outputs` does. Each local feature
    therefore receives W times its share of the global-batch gradient, and DDP's averaging over the
    W processes divides that factor out again. Parameters used directly on the gathered tensors,
    such as the logit scale, get the same full gradient on every process, which averaging keeps.

    Gradient convention with sharding (`comm` given, W = comm.world_size > 1): only the texts are
    gathered, and this process scores its own B_local videos against all B texts. Its share L_r
    of L holds its video rows of CE(M1) and CE(M2) and its text columns of CE(M1^T) and CE(M2^T),
    so the shares of all ranks sum to L. The returned "loss" has the VALUE of the global L on every
    rank and the GRADIENT of W * L_r. After the gather's summing backward, a local feature gets
    W * dL/dfeature, and the logit scale W * dL_r/dl, so DDP's average over the W ranks again
    equals the single-process gradient of L. The logged terms are global values as well.

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
        comm: Optional[ShardComm] = None,
        chunk_elements: Optional[int] = None,
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
        if chunk_elements is not None and chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
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
        self.comm = comm
        self.chunk_elements = chunk_elements

    def _symmetric_loss(self, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        d = self.dual_mix
        first = d * info_nce(m1) + (1.0 - d) * info_nce(m1.t())
        second = d * info_nce(m2.t()) + (1.0 - d) * info_nce(m2)
        return 0.5 * (first + second)

    def _sharded_symmetric_loss(self, m1: torch.Tensor, m2: torch.Tensor, offset: int) -> torch.Tensor:
        """Return this rank's share of `_symmetric_loss` from its row strips of M1 and M2."""
        d = self.dual_mix
        (rows1, columns1), (rows2, columns2) = sharded_cross_entropy([m1, m2], offset, self.comm)
        return 0.5 * (d * rows1 + (1.0 - d) * columns1) + 0.5 * (d * columns2 + (1.0 - d) * rows2)

    def _split_log_sigma(self, outputs: Outputs) -> Tuple[Outputs, Dict[str, torch.Tensor]]:
        """Return the outputs without the token-sized log-sigma tensors, and their logged means."""
        if self.method != "upret":
            return outputs, {}
        # Logged from this process's items only, so the token-sized log-sigma tensors are never gathered.
        video_local, text_local = outputs["video"], outputs["text_aug"]
        terms = {
            "log_sigma/video": _masked_mean(video_local["log_sigma"].detach().float(), video_local["mask"]),
            "log_sigma/text": _masked_mean(text_local["log_sigma"].detach().float(), text_local["mask"]),
        }
        outputs = {
            key: {k: v for k, v in value.items() if k != "log_sigma"} if isinstance(value, dict) else value
            for key, value in outputs.items()
        }
        return outputs, terms

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
        outputs, log_sigma_terms = self._split_log_sigma(outputs)
        sharded = self.comm is not None and self.comm.world_size > 1
        if sharded:
            terms = self._forward_sharded(outputs)
        else:
            if self.gather is not None:
                outputs = self.gather(outputs)
            terms = self._forward_global(outputs)
        if self.method == "upret":
            terms = {**{k: v for k, v in terms.items() if k != "logit_scale"}, **log_sigma_terms,
                     "logit_scale": terms["logit_scale"]}
        return terms

    def _scores(
        self, video: Outputs, text: Outputs, text_aug: Outputs, sum_across_shards=None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Return I2T, T2I and (UPRet) O, each [B_video, B_text], in float32."""
        i2t = i2t_similarity(
            video["tokens"].float(),
            video["weights"].float(),
            text["tokens"].float(),
            tau=self.tau,
            text_mask=text["mask"] if self.masked_softmax else None,
            chunk_elements=self.chunk_elements,
        )
        t2i = t2i_similarity(
            video["tokens"].float(),
            text_aug["tokens"].float(),
            text_aug["weights"].float(),
            tau=self.tau,
            video_mask=video["mask"] if self.masked_softmax else None,
            chunk_elements=self.chunk_elements,
        )
        if self.method == "cico":
            return i2t, t2i, None
        ot = ot_score(
            video["samples"].float(),
            text_aug["samples"].float(),
            eps=self.ot_eps,
            max_iter=self.sinkhorn_iters,
            tol=self.sinkhorn_tol,
            aggregation=self.ot_aggregation,
            sum_across_shards=sum_across_shards,
        )
        return i2t, t2i, ot

    def _forward_global(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        video, text, text_aug = outputs["video"], outputs["text"], outputs["text_aug"]
        with torch.autocast(device_type=video["tokens"].device.type, enabled=False):
            scale = outputs["logit_scale"].float().exp()
            i2t, t2i, ot = self._scores(video, text, text_aug)
            m1, m2 = scale * i2t, scale * t2i
            if ot is None:
                loss = self._symmetric_loss(m1, m2)
                return {"loss": loss, "loss/infonce": loss.detach(), "logit_scale": scale.detach()}

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
        return {"loss": loss, "loss/infonce": infonce.detach(), "loss/ot": ot_log.detach(),
                "logit_scale": scale.detach()}

    def _forward_sharded(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        comm = self.comm
        video = outputs["video"]
        local_size = video["tokens"].shape[0]
        offset = comm.rank * local_size
        texts = {"text": outputs["text"], "text_aug": outputs["text_aug"]}
        if self.gather is not None:
            texts = self.gather(texts)
        text, text_aug = texts["text"], texts["text_aug"]
        if text["tokens"].shape[0] != local_size * comm.world_size:
            raise ValueError(
                f"sharded loss: {text['tokens'].shape[0]} gathered texts, expected {comm.world_size} ranks x "
                f"{local_size} local items; every rank must pass the same local batch size"
            )

        def sum_across_shards(tensor: torch.Tensor) -> torch.Tensor:
            return comm.all_gather(tensor).sum(dim=0)

        with torch.autocast(device_type=video["tokens"].device.type, enabled=False):
            scale = outputs["logit_scale"].float().exp()
            i2t, t2i, ot = self._scores(video, text, text_aug, sum_across_shards)  # strips [b, B]
            m1, m2 = scale * i2t, scale * t2i
            zero = m1.new_zeros(())
            ot_abs_sum, ot_loss = zero, zero
            if ot is not None and self.ot_mode == "logits":
                ot_term = self.ot_weight * ot
                infonce = self._sharded_symmetric_loss(m1 + ot_term, m2 + ot_term, offset)
                ot_abs_sum = ot_term.detach().abs().sum()
            else:
                infonce = self._sharded_symmetric_loss(m1, m2, offset)
                if ot is not None:
                    (rows, columns), = sharded_cross_entropy([scale * ot], offset, comm)
                    ot_loss = self.ot_weight * 0.5 * (rows + columns)
            share = infonce + ot_loss

            # One all-gather turns every share into its global value.
            logged = torch.stack([share.detach(), infonce.detach(), ot_loss.detach(), ot_abs_sum]).double()
            totals = comm.all_gather(logged).sum(dim=0).float()
            scaled = comm.world_size * share
            loss = scaled - scaled.detach() + totals[0]

        terms = {"loss": loss, "loss/infonce": totals[1], "logit_scale": scale.detach()}
        if ot is not None:
            num_pairs = float(local_size * comm.world_size) ** 2
            terms["loss/ot"] = totals[3] / num_pairs if self.ot_mode == "logits" else totals[2]
        return terms
