"""Tests of modules/clip.py against open_clip (an independent CLIP implementation with OpenAI's names)."""

import logging
import math
import os

import pytest
import torch
from torch import nn

from modules.clip import (
    CLIP,
    CLIPConfig,
    FeatureTransformer,
    LayerNorm,
    ResidualAttentionBlock,
    SelfAttention,
    _QuickGELUProjection,
    build_clip,
    config_from_state_dict,
    load_openai_weights,
)

SENTENCES = [
    "a person signs good evening to the viewers",
    "the weather will be sunny tomorrow in the south",
    "one and two and three and four.",
]
TEXT_LEN = 32
MISMATCHED_KEYS = {"visual.conv1.weight", "visual.positional_embedding"}


def tiny_config(**overrides) -> CLIPConfig:
    values = dict(embed_dim=16, vocab_size=100, context_length=16, text_width=32, text_layers=2, text_heads=2,
                  video_input_dim=24, video_width=32, video_layers=2, video_heads=4, feature_len=6)
    values.update(overrides)
    return CLIPConfig(**values)


def tiny_open_clip_model():
    """Return a random 1-layer open_clip CLIP (width 64, QuickGELU) whose state dict uses OpenAI's names."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=16, head_width=64)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=1, layers=1)
    return OpenCLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """Build a random open_clip ViT-B-32 once, save its state dict and load it into our CLIP."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    # OpenAI's checkpoints were trained with QuickGELU, which open_clip uses only when asked to.
    reference = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).eval()
    path = tmp_path_factory.mktemp("vit_b32") / "ViT-B-32-state.pt"
    torch.save(reference.state_dict(), path)

    model = CLIP(config_from_state_dict(reference.state_dict())).eval()
    report = load_openai_weights(model, path)
    return reference, model, report


# ---------------------------------------------------------------------------------------------------------------------
# full-size checks against open_clip ViT-B-32


def test_config_inferred_from_vit_b32(vit_b32):
    _, model, _ = vit_b32
    assert model.config == CLIPConfig.vit_b32()


def test_load_report_vit_b32(vit_b32):
    reference, model, report = vit_b32
    mismatched = {key: (src, dst) for key, src, dst in report.mismatched}
    assert set(mismatched) == MISMATCHED_KEYS
    assert mismatched["visual.conv1.weight"] == ((768, 3, 32, 32), (768, 1024, 1, 1))
    assert mismatched["visual.positional_embedding"] == ((50, 768), (65, 768))
    assert report.missing == []
    assert report.unexpected == []
    assert set(report.loaded) == set(reference.state_dict()) - MISMATCHED_KEYS


def test_loaded_tensors_equal_vit_b32(vit_b32):
    reference, model, report = vit_b32
    ours = model.state_dict()
    theirs = reference.state_dict()
    for key in report.loaded:
        assert torch.equal(ours[key], theirs[key]), key


def test_text_eot_feature_matches_open_clip(vit_b32):
    import open_clip

    reference, model, _ = vit_b32
    ids = open_clip.tokenize(SENTENCES)  # [3, 77]
    eot = ids.argmax(dim=-1)
    assert int(eot.max()) < TEXT_LEN

    with torch.no_grad():
        expected = reference.encode_text(ids, normalize=False)  # [3, 512]
        tokens = model.encode_text(ids[:, :TEXT_LEN])  # [3, 32, 512]
    assert tokens.shape == (len(SENTENCES), TEXT_LEN, 512)
    ours = tokens[torch.arange(len(SENTENCES)), eot]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_visual_block_matches_open_clip(vit_b32):
    reference, model, _ = vit_b32
    torch.manual_seed(1)
    x = torch.randn(2, 65, 768)
    with torch.no_grad():
        expected = reference.visual.transformer.resblocks[3](x)
        ours = model.visual.transformer.resblocks[3](x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_visual_block_key_padding_matches_open_clip(vit_b32):
    reference, model, _ = vit_b32
    torch.manual_seed(2)
    x = torch.randn(2, 65, 768)
    valid = torch.zeros(2, 65, dtype=torch.bool)
    valid[0, 1:41] = True
    valid[1, 1:4] = True

    # nn.MultiheadAttention in open_clip takes an additive [B * heads, N, N] mask with -inf on padded keys.
    additive = torch.zeros(2, 65).masked_fill(~valid, float("-inf"))
    additive = additive[:, None, None, :].expand(2, 12, 65, 65).reshape(2 * 12, 65, 65)
    with torch.no_grad():
        expected = reference.visual.transformer.resblocks[0](x, attn_mask=additive)
        ours = model.visual.transformer.resblocks[0](x, key_padding_mask=valid)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint formats


# Tracing and torch.jit.save warn about deprecation and traced control flow, neither of which matters here.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive_loads(tmp_path, caplog):
    reference = tiny_open_clip_model()
    # OpenAI's archive also stores its sizes as integer entries, which the loader must drop.
    for name in ("input_resolution", "context_length", "vocab_size"):
        if hasattr(reference, name):
            delattr(reference, name)
        reference.register_buffer(name, torch.tensor(16))
    ids = torch.randint(0, 100, (2, 16))
    traced = torch.jit.trace_module(reference, {"encode_text": (ids,)}, check_trace=False).half()
    path = tmp_path / "tiny_jit.pt"
    torch.jit.save(traced, str(path))

    stored = {key: value.float() for key, value in traced.state_dict().items()}
    model = CLIP(config_from_state_dict(stored))
    with caplog.at_level(logging.WARNING, logger="modules.clip"):
        report = load_openai_weights(model, path)

    mismatch_logs = [record.getMessage() for record in caplog.records if "shape-mismatched" in record.getMessage()]
    assert len(mismatch_logs) == 1
    assert "visual.conv1.weight: checkpoint (64, 3, 8, 8) vs model (64, 1024, 1, 1)" in mismatch_logs[0]
    assert "visual.positional_embedding: checkpoint (5, 64) vs model (65, 64)" in mismatch_logs[0]

    assert {key for key, _, _ in report.mismatched} == MISMATCHED_KEYS
    assert report.missing == []
    # open_clip keeps its causal mask as a buffer, which a traced module exports; the model has no such entry.
    assert report.unexpected == ["attn_mask"]
    ours = model.state_dict()
    assert ours["token_embedding.weight"].dtype == torch.float32
    for key in report.loaded:
        assert torch.equal(ours[key], stored[key]), key
    assert len(report.loaded) == len(ours) - len(MISMATCHED_KEYS)


def test_wrapped_state_dict_loads(tmp_path):
    reference = tiny_open_clip_model()
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)

    model, report = build_clip(pretrained=path)
    assert model.config.text_width == 64
    assert model.config.video_width == 64
    assert model.config.text_layers == 1
    assert model.config.embed_dim == 16
    assert model.config.feature_len == 64
    assert report is not None
    assert torch.equal(model.text_projection, reference.text_projection)


def test_random_bytes_rejected(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(4096))
    model = CLIP(tiny_config())
    with pytest.raises(ValueError, match="noise.pt"):
        load_openai_weights(model, path)


def test_missing_checkpoint_raises(tmp_path):
    model = CLIP(tiny_config())
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt"):
        load_openai_weights(model, tmp_path / "absent.pt")


def test_own_state_dict_round_trip(tmp_path):
    # Head counts are not stored in weights, so the round trip needs OpenAI's 64-wide heads.
    config = tiny_config(text_width=64, text_heads=1, video_width=128, video_heads=2)
    model = CLIP(config)
    path = tmp_path / "own.pt"
    torch.save(model.state_dict(), path)

    assert config_from_state_dict(model.state_dict()) == config
    clone = CLIP(config)
    report = load_openai_weights(clone, path)
    assert report.mismatched == []
    assert report.missing == []
    assert torch.equal(clone.visual.conv1.weight, model.visual.conv1.weight)


# ---------------------------------------------------------------------------------------------------------------------
# config, masks, initialisation


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="feature_length"):
        CLIPConfig.from_dict({"feature_length": 32})
    assert CLIPConfig.from_dict({"feature_len": 32}).feature_len == 32


def test_text_mask_sot_to_eot():
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0],
                        [49406, 49407, 0, 0, 0, 0],
                        [49406, 1, 2, 3, 4, 49407]])
    expected = torch.tensor([[1.0, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 1]])
    assert torch.equal(CLIP.text_mask(ids), expected)


def test_text_tokens_ignore_later_positions():
    torch.manual_seed(0)
    model = CLIP(tiny_config()).eval()
    ids = torch.randint(1, 100, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(1, 100, (2, 4))
    with torch.no_grad():
        before = model.encode_text(ids)
        after = model.encode_text(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_text_longer_than_context_rejected():
    model = CLIP(tiny_config())
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))


def test_initialisation_scales():
    torch.manual_seed(0)
    config = tiny_config(text_width=64, video_width=256, video_heads=4)
    model = CLIP(config)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.visual.positional_embedding.std().item() == pytest.approx(256 ** -0.5, rel=0.1)
    assert model.visual.transformer.resblocks[0].attn.in_proj_weight.std().item() == pytest.approx(
        256 ** -0.5, rel=0.1)
    # PyTorch's Conv2d default is Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = config.video_input_dim ** -0.5
    assert model.visual.conv1.weight.abs().max().item() <= bound


def test_layer_norm_computes_in_float32():
    torch.manual_seed(0)
    weight = torch.randn(8)
    bias = torch.randn(8)
    x = torch.randn(3, 8) * 100 + 1000

    # fp32 weights with fp16 activations: the output keeps the activation dtype.
    norm = LayerNorm(8)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    out = norm(x.half())
    assert out.dtype == torch.float16
    expected = nn.functional.layer_norm(x.half().float(), (8,), weight, bias).half()
    assert torch.equal(out, expected)

    # fp16 weights (a model converted with .half()) with fp32 activations still compute in fp32.
    out = norm.half()(x)
    assert out.dtype == torch.float32
    expected = nn.functional.layer_norm(x, (8,), weight.half().float(), bias.half().float())
    torch.testing.assert_close(out, expected)


def test_attention_causal_and_padding_by_hand():
    torch.manual_seed(0)
    width, heads, length = 8, 2, 5
    attn = SelfAttention(width, heads)
    x = torch.randn(2, length, width)
    valid = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])

    # Reference: explicit per-head softmax(q k^T / sqrt(d)) with masked scores set to -inf.
    q, k, v = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    def split(t):
        return t.view(2, length, heads, width // heads).transpose(1, 2)  # [B, heads, N, head_dim]

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    allowed = valid[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    # The first query of row 1 has no allowed key (causal + padded), so it is left out of the comparison.
    mixed = (probs.nan_to_num(0.0) @ split(v)).transpose(1, 2).reshape(2, length, width)
    expected = attn.out_proj(mixed)

    with torch.no_grad():
        ours = attn(x, causal=True, key_padding_mask=valid)
    torch.testing.assert_close(ours[0], expected[0])
    torch.testing.assert_close(ours[1, 1:], expected[1, 1:])


# ---------------------------------------------------------------------------------------------------------------------
# video tower


def make_video(batch: int, config: CLIPConfig, lengths):
    video = torch.randn(batch, config.feature_len, config.video_input_dim)
    mask = torch.zeros(batch, 1 + config.feature_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, 1:1 + length] = 1
        video[row, length:] = 0
    return video, mask


def test_video_output_shape():
    config = tiny_config()
    model = CLIP(config).eval()
    video, mask = make_video(3, config, [6, 2, 4])
    with torch.no_grad():
        tokens = model.encode_video(video, mask)
    assert tokens.shape == (3, 1 + config.feature_len, config.embed_dim)


def test_video_padding_ignored_as_keys():
    torch.manual_seed(0)
    config = tiny_config()
    model = CLIP(config).eval()
    video, mask = make_video(2, config, [3, 5])
    noisy = video.clone()
    noisy[0, 3:] = torch.randn(3, config.video_input_dim) * 10
    noisy[1, 5:] = torch.randn(1, config.video_input_dim) * 10
    with torch.no_grad():
        before = model.encode_video(video, mask)
        after = model.encode_video(noisy, mask)

    # CLS (position 0) and the real clips are queries over the real clips only, so they must not move.
    torch.testing.assert_close(after[0, :4], before[0, :4], rtol=0, atol=1e-5)
    torch.testing.assert_close(after[1, :6], before[1, :6], rtol=0, atol=1e-5)
    assert not torch.allclose(after[0, 4:], before[0, 4:])


def test_video_valid_clip_changes_output():
    torch.manual_seed(0)
    config = tiny_config()
    model = CLIP(config).eval()
    video, mask = make_video(1, config, [3])
    changed = video.clone()
    changed[0, 2] += 1.0
    with torch.no_grad():
        before = model.encode_video(video, mask)
        after = model.encode_video(changed, mask)
    assert not torch.allclose(after[0, 1], before[0, 1])


def test_conv1_matches_conv_layout():
    torch.manual_seed(0)
    config = tiny_config()
    tower = FeatureTransformer(config.video_input_dim, config.video_width, 1, 4, config.feature_len,
                               config.embed_dim)
    video = torch.randn(2, config.feature_len, config.video_input_dim)
    # The released code applied the convolution to [B, 1024, L, 1]; the linear form must give the same map.
    conv_out = tower.conv1(video.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1)
    linear_out = nn.functional.linear(video, tower.conv1.weight.flatten(1))
    torch.testing.assert_close(linear_out, conv_out, rtol=1e-5, atol=1e-6)


def test_video_wrong_length_rejected():
    config = tiny_config()
    model = CLIP(config)
    video = torch.randn(1, config.feature_len + 1, config.video_input_dim)
    mask = torch.ones(1, config.feature_len + 2, dtype=torch.long)
    mask[:, 0] = 0
    with pytest.raises(ValueError, match="feature_len"):
        model.encode_video(video, mask)


def test_video_mask_shape_rejected():
    config = tiny_config()
    model = CLIP(config)
    video, mask = make_video(2, config, [2, 2])
    with pytest.raises(ValueError, match="video_mask"):
        model.encode_video(video, mask[:, 1:])


def test_video_mask_cls_or_empty_rejected():
    config = tiny_config()
    model = CLIP(config)
    video, mask = make_video(2, config, [2, 0])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        model.encode_video(video, mask)
    video, mask = make_video(1, config, [2])
    mask[0, 0] = 1
    with pytest.raises(ValueError, match="CLS"):
        model.encode_video(video, mask)


def _block_pair(width: int = 16, heads: int = 2):
    """Return two ResidualAttentionBlocks with equal weights: MLP activation recomputed and stored."""
    torch.manual_seed(0)
    recomputed = ResidualAttentionBlock(width, heads)
    stored = ResidualAttentionBlock(width, heads)
    stored.load_state_dict(recomputed.state_dict())
    stored.recompute_activation = False
    return recomputed, stored


def test_recomputed_mlp_matches_autograd():
    recomputed, stored = _block_pair()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    recomputed.double()
    stored.double()
    x_recomputed = x.clone().requires_grad_()
    x_stored = x.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)

    out_recomputed = recomputed(x_recomputed, key_padding_mask=mask)
    out_stored = stored(x_stored, key_padding_mask=mask)
    grad = torch.randn_like(out_stored)
    out_recomputed.backward(grad)
    out_stored.backward(grad)

    assert torch.equal(out_recomputed, out_stored)
    torch.testing.assert_close(x_recomputed.grad, x_stored.grad, rtol=1e-12, atol=1e-12)
    for name, parameter in stored.named_parameters():
        other = dict(recomputed.named_parameters())[name]
        torch.testing.assert_close(other.grad, parameter.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_recomputed_mlp_gradcheck():
    torch.manual_seed(1)
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_QuickGELUProjection.apply, (hidden, weight, bias))


def test_recomputed_mlp_keeps_fewer_activations():
    def saved_elements(block: ResidualAttentionBlock, x: torch.Tensor) -> int:
        sizes = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if not isinstance(tensor, nn.Parameter):
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            block(x.clone().requires_grad_())
        return sum(sizes)

    recomputed, stored = _block_pair(width=32, heads=2)
    x = torch.randn(2, 7, 32)
    hidden_numel = 2 * 7 * 4 * 32
    # Autograd keeps the hidden layer, its sigmoid and the activation; the recomputing block only the first.
    assert saved_elements(stored, x) - saved_elements(recomputed, x) >= 2 * hidden_numel


def test_recomputed_mlp_under_bf16_autocast():
    recomputed, stored = _block_pair()
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_recomputed = recomputed(x.clone().requires_grad_())
        out_stored = stored(x.clone().requires_grad_())
    assert out_recomputed.dtype == out_stored.dtype
    torch.testing.assert_close(out_recomputed, out_stored)
    out_recomputed.float().sum().backward()
    out_stored.float().sum().backward()
    for name, parameter in stored.named_parameters():
        other = dict(recomputed.named_parameters())[name]
        assert other.grad.dtype == torch.float32
        torch.testing.assert_close(other.grad, parameter.grad, rtol=2e-2, atol=2e-2, msg=name)
