"""Tests of modules/i3d.py: layer sizes, "same" padding, the embedding and the BSL-1K checkpoint format."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules.i3d import InceptionI3d, build_i3d, load_i3d_checkpoint, read_i3d_state_dict, same_padding

# Inception blocks of I3D as (input channels, 1x1, 3x3 reduce, 3x3, 3x3 reduce, 3x3, pool projection),
# written out from the Inception-v1 table (Szegedy et al., 2015) that I3D inflates.
BLOCKS = [
    (192, 64, 96, 128, 16, 32, 32),
    (256, 128, 128, 192, 32, 96, 64),
    (480, 192, 96, 208, 16, 48, 64),
    (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128),
    (832, 256, 160, 320, 32, 128, 128),
    (832, 384, 192, 384, 48, 128, 128),
]


def _conv_bn(in_channels: int, out_channels: int, kernel: int) -> int:
    """Parameters of a bias-free 3-D convolution plus the batch-norm scale and shift."""
    return in_channels * out_channels * kernel ** 3 + 2 * out_channels


def _expected_parameters(num_classes: int) -> int:
    total = _conv_bn(3, 64, 7) + _conv_bn(64, 64, 1) + _conv_bn(64, 192, 3)
    for cin, c0, r1, c1, r2, c2, c3 in BLOCKS:
        total += _conv_bn(cin, c0, 1) + _conv_bn(cin, r1, 1) + _conv_bn(r1, c1, 3)
        total += _conv_bn(cin, r2, 1) + _conv_bn(r2, c2, 3) + _conv_bn(cin, c3, 1)
    return total + 1024 * num_classes + num_classes


def _save_bsl_format(model: InceptionI3d, path) -> None:
    """Save like the BSL-1K training code: DataParallel prefixes inside a dict with training metadata."""
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 7, "arch": "InceptionI3d", "best_acc": 0.5, "state_dict": state}, path)


@pytest.fixture(scope="module")
def real_size_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = InceptionI3d()
    # Non-trivial batch-norm statistics, so that a loader that skipped buffers would be caught.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("i3d") / "bsl5k.pth.tar"
    _save_bsl_format(model, path)
    return model.eval(), path


def test_parameter_count_matches_table():
    for num_classes in (1064, 400):
        model = InceptionI3d(num_classes=num_classes)
        assert sum(p.numel() for p in model.parameters()) == _expected_parameters(num_classes)
    assert model.embed_dim == 1024


def test_same_padding_hand_values():
    assert same_padding(224, 7, 2) == (2, 3)  # total 111 * 2 + 7 - 224 = 5, the extra pixel after
    assert same_padding(16, 7, 2) == (2, 3)
    assert same_padding(8, 3, 1) == (1, 1)
    assert same_padding(7, 2, 2) == (0, 1)
    assert same_padding(8, 2, 2) == (0, 0)


@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_same_padding_output_length(kernel, stride):
    for size in range(1, 20):
        before, after = same_padding(size, kernel, stride)
        out = F.conv1d(F.pad(torch.zeros(1, 1, size), (before, after)), torch.zeros(1, 1, kernel), stride=stride)
        assert out.shape[-1] == math.ceil(size / stride)


def test_embedding_is_2x7x7_average_pool():
    model = InceptionI3d(width_mult=1 / 16).eval()
    video = torch.rand(1, 3, 16, 224, 224) - 0.5
    with torch.no_grad():
        features = model.features(video)
        embedding = model(video)["embedding"]
    assert features.shape == (1, model.embed_dim, 2, 7, 7)
    pooled = F.avg_pool3d(features, kernel_size=(2, 7, 7), stride=1)
    assert embedding.shape == (1, model.embed_dim)
    torch.testing.assert_close(embedding, pooled.flatten(1))


def test_real_size_forward_window(real_size_checkpoint):
    model, _ = real_size_checkpoint
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 64, 64) - 0.5)
    assert out["embedding"].shape == (1, 1024)
    assert out["logits"].shape == (1, 1064)
    assert torch.isfinite(out["embedding"]).all()


def test_load_bsl_checkpoint(real_size_checkpoint):
    reference, path = real_size_checkpoint
    torch.manual_seed(1)
    loaded = build_i3d(path)
    assert loaded.num_classes == 1064
    assert not loaded.training
    reference_state = reference.state_dict()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], rtol=0, atol=0, msg=key)


def test_read_strips_module_prefix(real_size_checkpoint):
    _, path = real_size_checkpoint
    state = read_i3d_state_dict(path)
    assert "Conv3d_1a_7x7.conv3d.weight" in state
    assert "Mixed_5c.b3b.bn.running_mean" in state
    assert state["logits.conv3d.weight"].shape == (1064, 1024, 1, 1, 1)
    assert not any(key.startswith("module.") for key in state)


def test_class_count_from_checkpoint(tmp_path):
    path = tmp_path / "small.pth.tar"
    _save_bsl_format(InceptionI3d(num_classes=7, width_mult=1 / 16), path)
    assert build_i3d(path, width_mult=1 / 16).num_classes == 7


def test_mismatched_keys_named(tmp_path):
    source = InceptionI3d(num_classes=5, width_mult=1 / 16)
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    del state["module.Mixed_4c.b1b.bn.running_var"]
    state["module.extra_head.weight"] = torch.zeros(3)
    state["module.Mixed_3b.b0.conv3d.weight"] = torch.zeros(1, 1, 1, 1, 1)
    path = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": state}, path)

    target = InceptionI3d(num_classes=5, width_mult=1 / 16)
    with pytest.raises(ValueError) as error:
        load_i3d_checkpoint(target, path)
    message = str(error.value)
    assert "Mixed_4c.b1b.bn.running_var" in message
    assert "extra_head.weight" in message
    assert "Mixed_3b.b0.conv3d.weight" in message
    assert "bad.pth.tar" in message

    before = target.Mixed_3b.b0.conv3d.weight.clone()
    report = load_i3d_checkpoint(target, path, allow_partial=True)
    assert report["missing"] == ["Mixed_4c.b1b.bn.running_var"]
    assert report["unexpected"] == ["extra_head.weight"]
    assert len(report["mismatched"]) == 1
    assert report["mismatched"][0].startswith("Mixed_3b.b0.conv3d.weight")
    torch.testing.assert_close(target.Mixed_3b.b0.conv3d.weight, before)
    torch.testing.assert_close(target.Mixed_5c.b0.conv3d.weight, source.Mixed_5c.b0.conv3d.weight)


def test_missing_batch_counters_accepted(tmp_path):
    source = InceptionI3d(num_classes=5, width_mult=1 / 16)
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    report = load_i3d_checkpoint(InceptionI3d(num_classes=5, width_mult=1 / 16), path)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}


def test_unreadable_checkpoint_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt"):
        read_i3d_state_dict(path)
    with pytest.raises(FileNotFoundError, match="absent.pth.tar"):
        read_i3d_state_dict(tmp_path / "absent.pth.tar")


def test_width_mult_scales_channels():
    model = InceptionI3d(width_mult=0.25)
    assert model.embed_dim == 256
    assert model.Conv3d_1a_7x7.conv3d.out_channels == 16
    with pytest.raises(ValueError, match="width_mult"):
        InceptionI3d(width_mult=0)
