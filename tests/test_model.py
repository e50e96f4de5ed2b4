"""Tests of modules/model.py: which text feeds which branch, token weights, pooled samples and the CiCo baseline.

The references below are written position by position from the masks' definitions (real clips for the video,
1..EOT for the text), so they do not reuse the model's own pooling or masking code.
"""

import math

import pytest
import torch

from modules import heads
from modules.clip import CLIPConfig
from modules.model import MAX_LOGIT_SCALE, RetrievalModel, build_model

SOT = 49406
EOT = 49407
TEXT_LEN = 8
FEATURE_LEN = 5
VIDEO_DIM = 1024
EMBED_DIM = 16
ATOL = 1e-5

# Rows end at EOT positions 1, 3, 7 (no padding) and 2. The augmented rows swap two words where a row has two, so
# their EOT positions match the originals, as random swap guarantees.
TEXT_IDS = [
    [SOT, EOT, 0, 0, 0, 0, 0, 0],
    [SOT, 320, 1125, EOT, 0, 0, 0, 0],
    [SOT, 500, 501, 502, 503, 504, 505, EOT],
    [SOT, 4000, EOT, 0, 0, 0, 0, 0],
]
TEXT_AUG_IDS = [
    [SOT, EOT, 0, 0, 0, 0, 0, 0],
    [SOT, 1125, 320, EOT, 0, 0, 0, 0],
    [SOT, 500, 504, 502, 503, 501, 505, EOT],
    [SOT, 4001, EOT, 0, 0, 0, 0, 0],
]
# Position 0 is the CLS slot. The rows hold 3 real clips, all 5 clips, 1 clip and 2 clips.
VIDEO_MASK = [
    [0, 1, 1, 1, 0, 0],
    [0, 1, 1, 1, 1, 1],
    [0, 1, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 0],
]


def tiny_config() -> CLIPConfig:
    return CLIPConfig(embed_dim=EMBED_DIM, vocab_size=49408, context_length=TEXT_LEN, text_width=16, text_layers=1,
                      text_heads=2, video_input_dim=VIDEO_DIM, video_width=16, video_layers=1, video_heads=2,
                      feature_len=FEATURE_LEN)


def tiny_model(method: str = "upret", sample_num: int = 2) -> RetrievalModel:
    torch.manual_seed(0)
    model = RetrievalModel(tiny_config(), method=method, sample_num=sample_num, dist_heads=2, dist_dropout=0.0)
    return model.eval()


def make_inputs():
    """Return text_ids [4, 8], text_aug_ids [4, 8], video [4, 5, 1024] (zero-padded) and video_mask [4, 6]."""
    generator = torch.Generator().manual_seed(1)
    video_mask = torch.tensor(VIDEO_MASK)
    video = torch.randn(len(VIDEO_MASK), FEATURE_LEN, VIDEO_DIM, generator=generator)
    video = video * video_mask[:, 1:, None]
    return torch.tensor(TEXT_IDS), torch.tensor(TEXT_AUG_IDS), video, video_mask


def real_clip_positions(video_mask: torch.Tensor, row: int) -> list:
    """Return the token positions of the real clips of one row, i.e. 1..L where the mask is set (never CLS)."""
    return [i for i in range(1, video_mask.shape[1]) if int(video_mask[row, i]) == 1]


def eot_position(text_ids: torch.Tensor, row: int) -> int:
    return text_ids[row].tolist().index(EOT)


def pooled_reference(tokens: torch.Tensor, positions: list) -> torch.Tensor:
    """Average tokens [T, D] over the listed positions one by one, then divide by the Euclidean norm."""
    total = torch.zeros(tokens.shape[-1], dtype=torch.float64)
    for i in positions:
        total += tokens[i].double()
    mean = total / len(positions)
    return mean / math.sqrt(float((mean * mean).sum()))


def softmax_reference(scores: torch.Tensor, positions: list) -> torch.Tensor:
    """Softmax of scores [T] over the listed positions, 0 elsewhere, computed element by element."""
    weights = torch.zeros(scores.shape[0], dtype=torch.float64)
    denominator = sum(math.exp(float(scores[i])) for i in positions)
    for i in positions:
        weights[i] = math.exp(float(scores[i])) / denominator
    return weights


def fixed_noise(calls: list):
    """Return a stand-in for heads.gaussian_noise that draws seeded noise and records each draw in `calls`."""

    def draw(shape, like, generator=None):
        noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(7)).to(like)
        calls.append(noise)
        return noise

    return draw


def noise_for_length(calls: list, length: int) -> torch.Tensor:
    """Return the recorded noise [B, K - 1, T, D] whose token axis has `length` positions."""
    matches = [noise for noise in calls if noise.shape[2] == length]
    assert len(matches) == 1, f"expected one noise draw over {length} positions, got {len(matches)}"
    return matches[0]


# ---------------------------------------------------------------------------------------------------------------------
# forward: which text feeds which output


def test_forward_text_routing():
    model = tiny_model()
    text_ids, text_aug_ids, video, video_mask = make_inputs()
    assert not torch.equal(text_ids, text_aug_ids)

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        original_tokens = model.clip.encode_text(text_ids)
        augmented_tokens = model.clip.encode_text(text_aug_ids)
        video_tokens = model.clip.encode_video(video, video_mask)

    # The two texts must give different tokens, or the routing checks below could not tell them apart.
    assert not torch.allclose(original_tokens, augmented_tokens, atol=1e-3)
    assert torch.allclose(outputs["text"]["tokens"], original_tokens, atol=ATOL)
    assert torch.allclose(outputs["text_aug"]["tokens"], augmented_tokens, atol=ATOL)
    assert torch.allclose(outputs["video"]["tokens"], video_tokens, atol=ATOL)


def test_forward_output_keys():
    model = tiny_model()
    outputs = model(*make_inputs())

    assert set(outputs) == {"video", "text", "text_aug", "logit_scale"}
    assert set(outputs["text"]) == {"tokens", "mask"}
    assert set(outputs["text_aug"]) == {"tokens", "mask", "weights", "samples", "log_sigma"}
    assert set(outputs["video"]) == {"tokens", "mask", "weights", "samples", "log_sigma"}


def test_forward_shapes():
    model = tiny_model(sample_num=3)
    batch = len(TEXT_IDS)
    outputs = model(*make_inputs())

    assert outputs["video"]["tokens"].shape == (batch, 1 + FEATURE_LEN, EMBED_DIM)
    assert outputs["video"]["weights"].shape == (batch, 1 + FEATURE_LEN)
    assert outputs["video"]["log_sigma"].shape == (batch, 1 + FEATURE_LEN, EMBED_DIM)
    assert outputs["video"]["samples"].shape == (batch, 3, EMBED_DIM)
    assert outputs["text"]["tokens"].shape == (batch, TEXT_LEN, EMBED_DIM)
    assert outputs["text_aug"]["weights"].shape == (batch, TEXT_LEN)
    assert outputs["text_aug"]["log_sigma"].shape == (batch, TEXT_LEN, EMBED_DIM)
    assert outputs["text_aug"]["samples"].shape == (batch, 3, EMBED_DIM)


def test_forward_masks():
    model = tiny_model()
    text_ids, text_aug_ids, video, video_mask = make_inputs()
    # The last row of the augmented text loses a word, so its mask must follow its own EOT, not the original's.
    text_aug_ids[3] = torch.tensor([SOT, EOT, 0, 0, 0, 0, 0, 0])
    outputs = model(text_ids, text_aug_ids, video, video_mask)

    assert torch.equal(outputs["video"]["mask"], video_mask.float())
    for name, ids in (("text", text_ids), ("text_aug", text_aug_ids)):
        for row in range(ids.shape[0]):
            eot = eot_position(ids, row)
            expected = torch.tensor([1.0 if j <= eot else 0.0 for j in range(TEXT_LEN)])
            assert torch.equal(outputs[name]["mask"][row], expected), (name, row)


def test_forward_logit_scale_parameter():
    model = tiny_model()
    outputs = model(*make_inputs())

    assert outputs["logit_scale"] is model.clip.logit_scale
    assert model.logit_scale is model.clip.logit_scale
    assert isinstance(outputs["logit_scale"], torch.nn.Parameter)


# ---------------------------------------------------------------------------------------------------------------------
# pooled Monte Carlo samples


@pytest.mark.parametrize("sample_num", [1, 2])
def test_samples_without_noise(monkeypatch, sample_num):
    monkeypatch.setattr(heads, "gaussian_noise", lambda shape, like, generator=None: torch.zeros(tuple(shape)).to(like))
    model = tiny_model(sample_num=sample_num)
    text_ids, text_aug_ids, video, video_mask = make_inputs()

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        video_mu, _ = model.video_dist_head(outputs["video"]["tokens"])
        text_mu, _ = model.text_dist_head(outputs["text_aug"]["tokens"])

    for row in range(video.shape[0]):
        expected = pooled_reference(video_mu[row], real_clip_positions(video_mask, row)).float()
        for k in range(sample_num):
            assert torch.allclose(outputs["video"]["samples"][row, k], expected, atol=ATOL), (row, k)

    for row in range(text_aug_ids.shape[0]):
        positions = list(range(1, eot_position(text_aug_ids, row) + 1))
        expected = pooled_reference(text_mu[row], positions).float()
        for k in range(sample_num):
            assert torch.allclose(outputs["text_aug"]["samples"][row, k], expected, atol=ATOL), (row, k)


def test_samples_known_noise(monkeypatch):
    calls = []
    monkeypatch.setattr(heads, "gaussian_noise", fixed_noise(calls))
    model = tiny_model(sample_num=2)
    text_ids, text_aug_ids, video, video_mask = make_inputs()

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        video_mu, video_log_sigma = model.video_dist_head(outputs["video"]["tokens"])
        text_mu, text_log_sigma = model.text_dist_head(outputs["text_aug"]["tokens"])

    video_noise = noise_for_length(calls, 1 + FEATURE_LEN)[:, 0]  # [B, 1 + L, D]
    text_noise = noise_for_length(calls, TEXT_LEN)[:, 0]  # [B, Lt, D]
    assert torch.allclose(outputs["video"]["log_sigma"], video_log_sigma, atol=ATOL)
    assert torch.allclose(outputs["text_aug"]["log_sigma"], text_log_sigma, atol=ATOL)

    # Sample 0 is the pooled mean and sample 1 pools mu + exp(log_sigma) * noise over the same positions.
    for row in range(video.shape[0]):
        positions = real_clip_positions(video_mask, row)
        shifted = video_mu[row] + video_log_sigma[row].exp() * video_noise[row]
        assert torch.allclose(outputs["video"]["samples"][row, 0], pooled_reference(video_mu[row], positions).float(),
                              atol=ATOL)
        assert torch.allclose(outputs["video"]["samples"][row, 1], pooled_reference(shifted, positions).float(),
                              atol=ATOL)

    for row in range(text_aug_ids.shape[0]):
        positions = list(range(1, eot_position(text_aug_ids, row) + 1))
        shifted = text_mu[row] + text_log_sigma[row].exp() * text_noise[row]
        assert torch.allclose(outputs["text_aug"]["samples"][row, 0], pooled_reference(text_mu[row], positions).float(),
                              atol=ATOL)
        assert torch.allclose(outputs["text_aug"]["samples"][row, 1], pooled_reference(shifted, positions).float(),
                              atol=ATOL)


def test_text_samples_augmented_eot(monkeypatch):
    monkeypatch.setattr(heads, "gaussian_noise", lambda shape, like, generator=None: torch.zeros(tuple(shape)).to(like))
    model = tiny_model()
    text_ids, text_aug_ids, video, video_mask = make_inputs()
    # A deletion moves the EOT of the augmented row 2 from position 7 to position 5.
    text_aug_ids[2] = torch.tensor([SOT, 500, 502, 503, 504, EOT, 0, 0])

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        text_mu, _ = model.text_dist_head(outputs["text_aug"]["tokens"])

    expected = pooled_reference(text_mu[2], [1, 2, 3, 4, 5]).float()
    assert torch.allclose(outputs["text_aug"]["samples"][2, 0], expected, atol=ATOL)


def test_samples_unit_norm():
    model = tiny_model(sample_num=3)
    outputs = model(*make_inputs())

    for name in ("video", "text_aug"):
        norms = outputs[name]["samples"].norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=ATOL), name


def test_samples_backpropagate_to_heads(monkeypatch):
    monkeypatch.setattr(heads, "gaussian_noise", fixed_noise([]))
    model = tiny_model(sample_num=2)
    outputs = model(*make_inputs())

    # The stochastic sample must reach both halves of each distribution head, the mean and the log-sigma branch.
    loss = (outputs["video"]["samples"][:, 1] * outputs["text_aug"]["samples"][:, 1]).sum()
    loss.backward()
    for head in (model.video_dist_head, model.text_dist_head):
        assert head.attn.mu_proj.weight.grad is not None
        assert head.attn.mu_proj.weight.grad.abs().sum() > 0
        assert head.attn.logsig_proj.weight.grad is not None
        assert head.attn.logsig_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# token weights


def test_video_weights_over_real_clips():
    model = tiny_model()
    text_ids, text_aug_ids, video, video_mask = make_inputs()

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        scores = model.video_weight_fc.fc(outputs["video"]["tokens"]).squeeze(-1)  # [B, 1 + L]
    weights = outputs["video"]["weights"]

    for row in range(video.shape[0]):
        positions = real_clip_positions(video_mask, row)
        assert float(weights[row, positions].sum()) == pytest.approx(1.0, abs=1e-6)
        assert float(weights[row, 0]) == 0.0
        padding = [i for i in range(1, 1 + FEATURE_LEN) if i not in positions]
        assert torch.all(weights[row, padding] == 0.0), row
        expected = softmax_reference(scores[row], positions).float()
        assert torch.allclose(weights[row], expected, atol=1e-6), row


def test_text_weights_over_sot_to_eot():
    model = tiny_model()
    text_ids, text_aug_ids, video, video_mask = make_inputs()

    with torch.no_grad():
        outputs = model(text_ids, text_aug_ids, video, video_mask)
        augmented_tokens = model.clip.encode_text(text_aug_ids)
        scores = model.text_weight_fc.fc(augmented_tokens).squeeze(-1)  # [B, Lt]
    weights = outputs["text_aug"]["weights"]

    # The reference scores come from the augmented text, so weights computed from the original text fail here.
    for row in range(text_aug_ids.shape[0]):
        eot = eot_position(text_aug_ids, row)
        positions = list(range(0, eot + 1))
        assert float(weights[row, positions].sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.all(weights[row, eot + 1:] == 0.0), row
        expected = softmax_reference(scores[row], positions).float()
        assert torch.allclose(weights[row], expected, atol=1e-6), row


# ---------------------------------------------------------------------------------------------------------------------
# CiCo baseline


def test_cico_has_no_heads():
    model = tiny_model(method="cico")
    names = [name for name, _ in model.named_parameters()]

    assert names, "the CiCo model must still hold the CLIP parameters"
    assert not [name for name in names if "weight_fc" in name]
    assert not [name for name in names if "dist_head" in name]


def test_cico_uniform_weights_without_samples():
    model = tiny_model(method="cico")
    text_ids, text_aug_ids, video, video_mask = make_inputs()
    outputs = model(text_ids, text_aug_ids, video, video_mask)

    assert set(outputs["video"]) == {"tokens", "mask", "weights"}
    assert set(outputs["text_aug"]) == {"tokens", "mask", "weights"}
    assert set(outputs["text"]) == {"tokens", "mask"}

    for row in range(video.shape[0]):
        positions = real_clip_positions(video_mask, row)
        expected = torch.tensor([1.0 / len(positions) if i in positions else 0.0 for i in range(1 + FEATURE_LEN)])
        assert torch.allclose(outputs["video"]["weights"][row], expected, atol=1e-7), row

    for row in range(text_aug_ids.shape[0]):
        eot = eot_position(text_aug_ids, row)
        expected = torch.tensor([1.0 / (eot + 1) if j <= eot else 0.0 for j in range(TEXT_LEN)])
        assert torch.allclose(outputs["text_aug"]["weights"][row], expected, atol=1e-7), row


def test_cico_encoders_ignore_distribution_flag():
    model = tiny_model(method="cico")
    _, text_aug_ids, video, video_mask = make_inputs()

    assert "samples" not in model.encode_video(video, video_mask, with_distribution=True)
    assert "samples" not in model.encode_text(text_aug_ids, with_distribution=True)


# ---------------------------------------------------------------------------------------------------------------------
# encoders, logit scale, constructor


def test_encoders_without_distribution():
    model = tiny_model()
    _, text_aug_ids, video, video_mask = make_inputs()

    video_out = model.encode_video(video, video_mask, with_distribution=False)
    text_out = model.encode_text(text_aug_ids, with_distribution=False)
    assert set(video_out) == {"tokens", "mask", "weights"}
    assert set(text_out) == {"tokens", "mask", "weights"}


def test_encoders_with_distribution():
    model = tiny_model()
    _, text_aug_ids, video, video_mask = make_inputs()

    video_out = model.encode_video(video, video_mask, with_distribution=True)
    text_out = model.encode_text(text_aug_ids, with_distribution=True)
    assert set(video_out) == {"tokens", "mask", "weights", "samples", "log_sigma"}
    assert set(text_out) == {"tokens", "mask", "weights", "samples", "log_sigma"}


def test_clamp_logit_scale_at_ln_100():
    model = tiny_model()
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0))

    with torch.no_grad():
        model.clip.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0), abs=1e-6)

    # A value below the maximum is left as it is.
    with torch.no_grad():
        model.clip.logit_scale.fill_(1.5)
    model.clamp_logit_scale()
    assert float(model.logit_scale.detach()) == pytest.approx(1.5, abs=1e-7)


def test_clamp_logit_scale_custom_max():
    model = tiny_model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(3.0)
    model.clamp_logit_scale(max_value=2.0)
    assert float(model.logit_scale.detach()) == pytest.approx(2.0, abs=1e-7)


def test_constructor_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        RetrievalModel(tiny_config(), method="pcme")


@pytest.mark.parametrize("sample_num", [0, -1])
def test_constructor_rejects_small_sample_num(sample_num):
    with pytest.raises(ValueError, match="sample_num"):
        RetrievalModel(tiny_config(), sample_num=sample_num)


def test_build_model_without_weights():
    torch.manual_seed(0)
    model = build_model(tiny_config(), method="cico", sample_num=3, dist_heads=2, dist_dropout=0.0)

    assert isinstance(model, RetrievalModel)
    assert model.method == "cico"
    assert model.sample_num == 3
