"""Per-token heads of UPRet: learned token weights, the distribution head, sampling and pooling.

Shapes use B for the batch, T for the token positions, D for the embedding width and K for the
number of Monte-Carlo samples. Masks are 1 (or True) at valid positions and 0 at padding.
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TokenWeightHead",
    "uniform_weights",
    "DistributionHead",
    "gaussian_noise",
    "sample_gaussian",
    "pool_samples",
    "text_pool_mask",
]


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` [B, T] over the positions where `mask` is set, exactly 0 elsewhere.

    The masked scores are set to the dtype's lowest finite value rather than -inf, so a row
    without any valid position yields zeros instead of NaN, in the values and in the gradient.
    """
    valid = mask.bool()
    filled = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    return filled.softmax(dim=-1) * valid.to(scores.dtype)


class TokenWeightHead(nn.Module):
    """Learned token weights: an MLP score per token, softmax over the valid tokens.

    alpha_{a,i} = softmax over valid i of g(x_{a,i}), with g = Linear(D, D), ReLU, Linear(D, 1)
    applied to the un-normalised token features. Invalid positions get weight exactly 0.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Compute the token weights.

        Args:
            tokens: [B, T, D] un-normalised token features.
            mask: [B, T], 1 at valid tokens.

        Returns:
            [B, T] weights that sum to 1 over the valid tokens of each row, 0 elsewhere. A row
            without valid tokens is all zeros.
        """
        scores = self.fc(tokens).squeeze(-1)  # [B, T]
        return _masked_softmax(scores, mask)


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """Return CiCo's uniform token weights: 1/|valid| at the valid positions of `mask` [B, T], 0 elsewhere.

    A row without valid positions is all zeros. A floating `mask` keeps its dtype, any other mask gives
    the default floating dtype (float32 unless changed).
    """
    weights = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)


class _FeedForward(nn.Module):
    """Two-layer MLP: Linear(D, H), GELU, Dropout, Linear(H, D), Dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class _SplitAttention(nn.Module):
    """Self-attention whose concatenated head outputs are split into a mean half and a log-sigma half.

    There is no output projection over the full width. Instead the first D/2 channels of the
    attention output feed `mu_proj` and the last D/2 channels feed `logsig_proj`, each D/2 -> D.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        # NOTE: the released UPRet head scales q k^T by (dim * heads)^-0.5 (1/64 for D = 512 and
        # 8 heads), 8 times smaller than the usual head_dim^-0.5. It is kept for fidelity.
        self.scale = (dim * heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_drop = nn.Dropout(dropout)
        self.mu_proj = nn.Linear(dim // 2, dim)
        self.mu_proj_drop = nn.Dropout(dropout)
        self.logsig_proj = nn.Linear(dim // 2, dim)
        self.logsig_proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.heads, head_dim)  # [B, T, 3, H, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, D/H]

        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, length, dim)  # [B, T, D]

        mu_hat = self.mu_proj_drop(self.mu_proj(out[..., : dim // 2]))
        log_sigma_hat = self.logsig_proj_drop(self.logsig_proj(out[..., dim // 2 :]))
        return mu_hat, log_sigma_hat


class DistributionHead(nn.Module):
    """Per-token diagonal Gaussian head of UPRet (mean and log standard deviation).

    With X the un-normalised token features [B, T, D]:

        X0 = LayerNorm1(GELU(Linear(X)))
        O = MultiHeadAttention(X0)                     # no mask: every position takes part
        mu_hat = Dropout(Linear(O[..., :D/2])),  l_hat = Dropout(Linear(O[..., D/2:]))
        mu = X + mu_hat;        mu = mu + MLP_mu(LayerNorm2(mu))
        log_sigma = l_hat + MLP_sigma(LayerNorm3(l_hat))   # no residual to X

    The attention uses the scale (D * heads)^-0.5 and dropout on the attention weights. The
    parameter names follow the released UPRet head (`fc`, `norm1`, `attn.qkv`, `attn.mu_proj`,
    `attn.logsig_proj`, `norm2`, `norm3`, `mu_mlp`, `logsig_mlp`). The released head also
    carried two unused projections, which are left out here.

    With `checkpoint_activations` set, the attention branch and the two MLP branches each keep only
    their inputs for backward and recompute their activations then (torch.utils.checkpoint, which
    replays the dropout masks). Each branch runs on pieces of at most `checkpoint_items` items, so
    the recomputation in backward keeps the activations of one piece only. The memory kept for
    backward drops from about 20 [B, T, D]-sized tensors to 5, and the forward pass runs twice.
    Without dropout the results and gradients are unchanged. With dropout and more than
    `checkpoint_items` items, the masks are drawn piece by piece, so they differ from those of
    the plain head while following the same distribution.
    """

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        checkpoint_activations: bool = False,
        checkpoint_items: int = 32,
    ) -> None:
        super().__init__()
        if checkpoint_items < 1:
            raise ValueError(f"checkpoint_items must be positive, got {checkpoint_items}")
        self.checkpoint_activations = checkpoint_activations
        self.checkpoint_items = checkpoint_items
        if dim % heads != 0 or dim % 2 != 0:
            raise ValueError(f"dim must be even and divisible by heads, got dim={dim}, heads={heads}")
        hidden_dim = int(dim * mlp_ratio)
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SplitAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mu_mlp = _FeedForward(dim, hidden_dim, dropout)
        self.logsig_mlp = _FeedForward(dim, hidden_dim, dropout)

    @property
    def scale(self) -> float:
        """Attention logit scale (D * heads)^-0.5."""
        return self.attn.scale

    def _attention_branch(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.attn(self.norm1(self.act(self.fc(tokens))))

    def _mu_branch(self, tokens: torch.Tensor, mu_hat: torch.Tensor) -> torch.Tensor:
        mu = tokens + mu_hat
        return mu + self.mu_mlp(self.norm2(mu))

    def _log_sigma_branch(self, log_sigma_hat: torch.Tensor) -> torch.Tensor:
        return log_sigma_hat + self.logsig_mlp(self.norm3(log_sigma_hat))

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Map token features [B, T, D] to (mu, log_sigma), both [B, T, D]."""
        if not (self.checkpoint_activations and torch.is_grad_enabled()):
            mu_hat, log_sigma_hat = self._attention_branch(tokens)
            return self._mu_branch(tokens, mu_hat), self._log_sigma_branch(log_sigma_hat)
        pieces = tokens.split(self.checkpoint_items)
        hats = [checkpoint(self._attention_branch, piece, use_reentrant=False) for piece in pieces]
        mu = [checkpoint(self._mu_branch, piece, mu_hat, use_reentrant=False) for piece, (mu_hat, _) in zip(pieces, hats)]
        log_sigma = [checkpoint(self._log_sigma_branch, log_sigma_hat, use_reentrant=False) for _, log_sigma_hat in hats]
        return torch.cat(mu), torch.cat(log_sigma)


def gaussian_noise(
    shape: Sequence[int], like: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Draw standard normal noise of `shape` with the dtype and device of `like`.

    Every random draw of `sample_gaussian` goes through this function, so tests can replace it.
    """
    return torch.randn(tuple(shape), dtype=like.dtype, device=like.device, generator=generator)


class _ReplayedNoise(torch.autograd.Function):
    """``exp(log_sigma)[:, None] * noise`` that draws the noise again in backward instead of storing it.

    ``draw`` returns the same noise each time it is called (it restores a saved generator state), so
    the gradient equals autograd's while only ``log_sigma``, which the caller keeps anyway, is saved.
    """

    @staticmethod
    def forward(ctx, log_sigma: torch.Tensor, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.draw = draw
        ctx.save_for_backward(log_sigma)
        return log_sigma.exp().unsqueeze(1) * draw()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], None]:
        (log_sigma,) = ctx.saved_tensors
        grad = (grad_output * ctx.draw()).sum(dim=1) * log_sigma.exp()
        return grad, None


def _replayable_draw(shape: Sequence[int], like: torch.Tensor,
                     generator: Optional[torch.Generator]) -> Callable[[], torch.Tensor]:
    """Return a function that draws the noise of `shape` that `gaussian_noise` draws now, every time it runs.

    The caller's generator (or the global one) advances by one draw, as with a direct call.
    """
    if generator is not None:
        state = generator.get_state()
        gaussian_noise(shape, like, generator)  # advances the generator as a direct draw would

        def draw() -> torch.Tensor:
            replay = torch.Generator(device=like.device)
            replay.set_state(state)
            return gaussian_noise(shape, like, replay)

        return draw

    devices = [like.device] if like.device.type == "cuda" else []
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(like.device) if devices else None
    gaussian_noise(shape, like, None)  # advances the global generator as a direct draw would

    def draw() -> torch.Tensor:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, like.device)
            return gaussian_noise(shape, like, None)

    return draw


def sample_gaussian(
    mu: torch.Tensor,
    log_sigma: torch.Tensor,
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    replay_noise: bool = False,
) -> torch.Tensor:
    """Draw reparameterised samples of per-token diagonal Gaussians.

    Sample 0 is the mean itself, z_0 = mu. Samples k = 1..K-1 are z_k = mu + exp(log_sigma) * eps_k
    with eps_k ~ N(0, I) drawn independently per sample, token and channel, so exp(log_sigma) is
    the standard deviation. Gradients flow to both mu and log_sigma.

    Args:
        mu: [B, T, D] means.
        log_sigma: [B, T, D] log standard deviations.
        num_samples: K >= 1, the number of samples including the mean.
        generator: optional random generator for the noise.
        replay_noise: draw the noise again in backward instead of keeping it, which saves one
            [B, K - 1, T, D] tensor and one [B, T, D] tensor. The values and gradients are the same,
            provided `gaussian_noise` returns the same noise for the same generator state.

    Returns:
        [B, K, T, D] samples.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    mean = mu.unsqueeze(1)  # [B, 1, T, D]
    if num_samples == 1:
        return mean
    noise_shape = (mu.shape[0], num_samples - 1) + tuple(mu.shape[1:])
    if replay_noise and torch.is_grad_enabled():
        stochastic = mean + _ReplayedNoise.apply(log_sigma, _replayable_draw(noise_shape, mu, generator))
        return torch.cat([mean, stochastic], dim=1)
    noise = gaussian_noise(noise_shape, mu, generator)  # [B, K-1, T, D]
    stochastic = mean + log_sigma.exp().unsqueeze(1) * noise
    return torch.cat([mean, stochastic], dim=1)


def pool_samples(samples: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pool each sample's tokens over the valid positions, then L2-normalise.

    Args:
        samples: [B, K, T, D] token samples.
        mask: [B, T], 1 at the positions to average (video: the real clips; text: see
            `text_pool_mask`).

    Returns:
        [B, K, D] unit-norm pooled samples. A row without valid positions pools to zeros.
    """
    weights = mask.to(samples.dtype)[:, None, :, None]  # [B, 1, T, 1]
    pooled = (samples * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)  # [B, K, D]
    return F.normalize(pooled, dim=-1)


def text_pool_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """Return the text pooling mask [B, T]: `text_mask` (SOT..EOT) with position 0 (SOT) cleared."""
    pool_mask = text_mask.clone()
    pool_mask[:, 0] = 0
    return pool_mask
