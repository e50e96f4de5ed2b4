"""Tests of modules.heads: token weights, the distribution head, sampling and pooling."""
import math

import pytest
import torch
import torch.nn.functional as F

from modules import heads
from modules.heads import (
    DistributionHead,
    TokenWeightHead,
    pool_samples,
    sample_gaussian,
    text_pool_mask,
    uniform_weights,
)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.t()
    return out if layer.bias is None else out + layer.bias


def _feed_forward(x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
    return _linear(_gelu(_linear(x, mlp.fc1)), mlp.fc2)


def _reference_distribution_head(head: DistributionHead, x: torch.Tensor, num_heads: int):
    """Evaluation-mode forward written head by head from the formula, with the scale (D * heads)^-0.5."""
    batch, length, dim = x.shape
    head_dim = dim // num_heads
    scale = 1.0 / math.sqrt(dim * num_heads)
    x0 = _layer_norm(_gelu(_linear(x, head.fc)), head.norm1)
    qkv = x0 @ head.attn.qkv.weight.t()  # [B, T, 3D]: q, k, v blocks, each split into heads
    q_all, k_all, v_all = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    outputs = []
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        q, k, v = q_all[..., cols], k_all[..., cols], v_all[..., cols]
        weights = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        outputs.append(weights @ v)
    attention = torch.cat(outputs, dim=-1)  # [B, T, D]
    mu_hat = _linear(attention[..., : dim // 2], head.attn.mu_proj)
    log_sigma_hat = _linear(attention[..., dim // 2 :], head.attn.logsig_proj)
    mu = x + mu_hat
    mu = mu + _feed_forward(_layer_norm(mu, head.norm2), head.mu_mlp)
    log_sigma = log_sigma_hat + _feed_forward(_layer_norm(log_sigma_hat, head.norm3), head.logsig_mlp)
    return mu, log_sigma


def test_token_weight_head_softmax_over_valid():
    torch.manual_seed(0)
    head = TokenWeightHead(8)
    tokens = torch.randn(3, 5, 8)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    with torch.no_grad():
        weights = head(tokens, mask)
        scores = head.fc(tokens).squeeze(-1)
    for b in range(3):
        valid = [i for i in range(5) if mask[b, i]]
        denominator = sum(math.exp(float(scores[b, i])) for i in valid)
        for i in range(5):
            expected = math.exp(float(scores[b, i])) / denominator if mask[b, i] else 0.0
            assert float(weights[b, i]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert torch.all(weights[mask == 0] == 0)


def test_token_weight_head_empty_row():
    torch.manual_seed(0)
    head = TokenWeightHead(8)
    tokens = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]])
    weights = head(tokens, mask)
    assert torch.all(weights[0] == 0)
    assert float(weights[1].detach().sum()) == pytest.approx(1.0)
    weights.sum().backward()
    assert torch.isfinite(tokens.grad).all()


def test_token_weight_head_layout():
    head = TokenWeightHead(16)
    assert isinstance(head.fc, torch.nn.Sequential)
    assert [type(m) for m in head.fc] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert head.fc[0].weight.shape == (16, 16)
    assert head.fc[2].weight.shape == (1, 16)


def test_uniform_weights():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    weights = uniform_weights(mask)
    expected = torch.tensor([[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 0]])
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, expected)


def test_distribution_head_shapes_and_names():
    head = DistributionHead(dim=16, heads=2)
    mu, log_sigma = head(torch.randn(3, 7, 16))
    assert mu.shape == (3, 7, 16)
    assert log_sigma.shape == (3, 7, 16)
    names = set(dict(head.named_parameters()))
    assert {"fc.weight", "norm1.weight", "attn.qkv.weight", "attn.mu_proj.weight", "attn.logsig_proj.weight",
            "norm2.weight", "norm3.weight", "mu_mlp.fc1.weight", "logsig_mlp.fc2.bias"} <= names
    assert "attn.qkv.bias" not in names
    assert head.attn.mu_proj.weight.shape == (16, 8)
    assert head.mu_mlp.fc1.weight.shape == (64, 16)


def test_distribution_head_attention_scale():
    assert DistributionHead(dim=512, heads=8).scale == pytest.approx(1.0 / 64.0)
    assert DistributionHead(dim=16, heads=2).scale == pytest.approx(1.0 / math.sqrt(32.0))


def test_distribution_head_matches_reference():
    torch.manual_seed(1)
    head = DistributionHead(dim=16, heads=2).double().eval()
    # Larger LayerNorm gains make the attention logits, and hence the scale, matter.
    with torch.no_grad():
        head.norm1.weight.uniform_(2.0, 4.0)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mu, log_sigma = head(x)
    ref_mu, ref_log_sigma = _reference_distribution_head(head, x, num_heads=2)
    assert torch.allclose(mu, ref_mu, atol=1e-10)
    assert torch.allclose(log_sigma, ref_log_sigma, atol=1e-10)


def test_distribution_head_residual_on_mean_only():
    torch.manual_seed(2)
    head = DistributionHead(dim=16, heads=2).eval()
    with torch.no_grad():
        for layer in (head.attn.mu_proj, head.attn.logsig_proj, head.mu_mlp.fc2, head.logsig_mlp.fc2):
            layer.weight.zero_()
            layer.bias.zero_()
    x = torch.randn(2, 5, 16)
    mu, log_sigma = head(x)
    assert torch.equal(mu, x)
    assert torch.equal(log_sigma, torch.zeros_like(x))


def test_distribution_head_uses_every_position():
    torch.manual_seed(3)
    head = DistributionHead(dim=16, heads=2).eval()
    x = torch.randn(1, 5, 16)
    changed = x.clone()
    changed[0, 4] += 3.0  # a "padding" position still changes the other tokens through attention
    mu, _ = head(x)
    mu_changed, _ = head(changed)
    assert not torch.allclose(mu[0, :4], mu_changed[0, :4])


def test_distribution_head_dropout_in_training():
    torch.manual_seed(4)
    head = DistributionHead(dim=16, heads=2, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    assert not torch.equal(head(x)[0], head(x)[0])
    head.eval()
    assert torch.equal(head(x)[0], head(x)[0])


def test_sample_gaussian_mean_first():
    mu = torch.randn(2, 3, 4)
    log_sigma = torch.randn(2, 3, 4)
    samples = sample_gaussian(mu, log_sigma, num_samples=2)
    assert samples.shape == (2, 2, 3, 4)
    assert torch.equal(samples[:, 0], mu)
    assert not torch.equal(samples[:, 1], mu)


def test_sample_gaussian_empirical_std():
    generator = torch.Generator().manual_seed(5)
    mu = torch.tensor([[[0.5, -1.0, 2.0]]])  # [1, 1, 3]
    log_sigma = torch.tensor([[[-1.0, 0.0, 0.7]]])
    samples = sample_gaussian(mu, log_sigma, num_samples=40001, generator=generator)[:, 1:]
    std = samples.std(dim=1)[0, 0]
    mean = samples.mean(dim=1)[0, 0]
    sigma = log_sigma.exp()[0, 0]
    assert torch.allclose(std, sigma, rtol=0.03)
    assert torch.allclose(mean, mu[0, 0], atol=4 * float(sigma.max()) / math.sqrt(40000))


def test_sample_gaussian_noise_hook(monkeypatch):
    def fake_noise(shape, like, generator=None):
        return torch.arange(math.prod(shape), dtype=like.dtype).reshape(shape)

    monkeypatch.setattr(heads, "gaussian_noise", fake_noise)
    mu = torch.randn(2, 3, 4, requires_grad=True)
    log_sigma = torch.randn(2, 3, 4, requires_grad=True)
    samples = sample_gaussian(mu, log_sigma, num_samples=3)
    noise = fake_noise((2, 2, 3, 4), mu)
    expected = mu.detach()[:, None] + log_sigma.detach().exp()[:, None] * noise
    assert torch.allclose(samples[:, 1:], expected)

    samples[:, 1:].sum().backward()
    assert torch.allclose(log_sigma.grad, (log_sigma.detach().exp()[:, None] * noise).sum(dim=1))
    assert torch.allclose(mu.grad, torch.full_like(mu, 2.0))


def test_pool_samples_masked_mean():
    torch.manual_seed(6)
    samples = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    pooled = pool_samples(samples, mask)
    for b in range(2):
        for k in range(2):
            valid = [t for t in range(4) if mask[b, t]]
            mean = [sum(float(samples[b, k, t, d]) for t in valid) / len(valid) for d in range(3)]
            norm = math.sqrt(sum(m * m for m in mean))
            for d in range(3):
                assert float(pooled[b, k, d]) == pytest.approx(mean[d] / norm, rel=1e-12)


def test_text_pool_mask_drops_sot():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    pool_mask = text_pool_mask(text_mask)
    assert torch.equal(pool_mask, torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]]))
    assert torch.equal(text_mask[:, 0], torch.tensor([1, 1]))


def test_pool_samples_ignores_padding_values():
    samples = torch.randn(1, 2, 4, 3)
    changed = samples.clone()
    changed[:, :, 3] = 100.0
    mask = torch.tensor([[1, 1, 1, 0]])
    assert torch.allclose(pool_samples(samples, mask), pool_samples(changed, mask))
    assert torch.allclose(pool_samples(samples, mask).norm(dim=-1), torch.ones(1, 2))
    assert torch.allclose(pool_samples(samples, mask), F.normalize(samples[:, :, :3].mean(2), dim=-1))


def test_distribution_head_checkpointing_same_results():
    # Dropout is active, so the recomputation must replay the same masks.
    torch.manual_seed(3)
    plain = DistributionHead(16, heads=2, dropout=0.3)
    checkpointed = DistributionHead(16, heads=2, dropout=0.3, checkpoint_activations=True)
    checkpointed.load_state_dict(plain.state_dict())
    tokens = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
    results = []
    for head in (plain, checkpointed):
        head.train()
        leaf = tokens.clone().requires_grad_()
        torch.manual_seed(5)
        mu, log_sigma = head(leaf)
        (mu.sin().sum() + log_sigma.cos().sum()).backward()
        results.append((mu.detach(), log_sigma.detach(), leaf.grad, [p.grad for p in head.parameters()]))
    (mu, log_sigma, grad, grads), (mu_c, log_sigma_c, grad_c, grads_c) = results
    assert torch.equal(mu, mu_c)
    assert torch.equal(log_sigma, log_sigma_c)
    assert torch.allclose(grad, grad_c, atol=1e-6)
    for g, g_c in zip(grads, grads_c):
        assert torch.allclose(g, g_c, atol=1e-6)


def test_distribution_head_checkpointing_saves_less():
    def saved_elements(head: DistributionHead) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        tokens = torch.randn(2, 6, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            mu, log_sigma = head(tokens)
        return total

    torch.manual_seed(6)
    plain = DistributionHead(16, heads=2, dropout=0.0)
    checkpointed = DistributionHead(16, heads=2, dropout=0.0, checkpoint_activations=True)
    assert saved_elements(checkpointed) < saved_elements(plain) / 4


def test_distribution_head_checkpoint_pieces_exact():
    # Without dropout, pieces of one item give the plain head's results and gradients.
    torch.manual_seed(7)
    plain = DistributionHead(16, heads=2, dropout=0.0)
    pieces = DistributionHead(16, heads=2, dropout=0.0, checkpoint_activations=True, checkpoint_items=1)
    pieces.load_state_dict(plain.state_dict())
    tokens = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(8))
    results = []
    for head in (plain, pieces):
        leaf = tokens.clone().requires_grad_()
        mu, log_sigma = head(leaf)
        (mu.sin().sum() + log_sigma.cos().sum()).backward()
        results.append((mu.detach(), log_sigma.detach(), leaf.grad, [p.grad for p in head.parameters()]))
    (mu, log_sigma, grad, grads), (mu_p, log_sigma_p, grad_p, grads_p) = results
    assert torch.allclose(mu, mu_p, atol=1e-6)
    assert torch.allclose(log_sigma, log_sigma_p, atol=1e-6)
    assert torch.allclose(grad, grad_p, atol=1e-6)
    for g, g_p in zip(grads, grads_p):
        assert torch.allclose(g, g_p, atol=1e-6)


@pytest.mark.parametrize("use_generator", [False, True])
def test_replayed_noise_matches_stored(use_generator):
    torch.manual_seed(3)
    mu = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    log_sigma = (0.3 * torch.randn(2, 5, 4, dtype=torch.float64)).requires_grad_()
    upstream = torch.randn(2, 3, 5, 4, dtype=torch.float64)

    def run(replay: bool):
        generator = torch.Generator().manual_seed(11) if use_generator else None
        if not use_generator:
            torch.manual_seed(11)
        samples = heads.sample_gaussian(mu, log_sigma, 3, generator=generator, replay_noise=replay)
        grads = torch.autograd.grad((samples * upstream).sum(), (mu, log_sigma))
        after = generator.get_state() if use_generator else torch.get_rng_state()
        return samples.detach(), grads, after

    stored_samples, stored_grads, stored_after = run(False)
    replayed_samples, replayed_grads, replayed_after = run(True)
    assert torch.equal(replayed_samples, stored_samples)
    for replayed, stored in zip(replayed_grads, stored_grads):
        torch.testing.assert_close(replayed, stored, rtol=1e-12, atol=1e-12)
    # The generator ends where a direct draw leaves it, so later draws are unchanged.
    assert torch.equal(replayed_after, stored_after)


def test_replayed_noise_saves_less():
    mu = torch.randn(4, 6, 8, requires_grad=True)
    log_sigma = torch.randn(4, 6, 8, requires_grad=True)
    saved = {}
    for replay in (False, True):
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            heads.sample_gaussian(mu, log_sigma, 3, replay_noise=replay)
        saved[replay] = sum(sizes)
    # The stored path keeps the noise [4, 2, 6, 8] and exp(log_sigma) [4, 6, 8]; the replay keeps log_sigma.
    assert saved[False] - saved[True] >= 4 * 2 * 6 * 8
