"""Mixed precision, loss scaling, SDPA attention, torch.compile fallback and the GPU benchmark script.

Everything runs on the CPU: bf16 and fp16 autocast both work there in torch 2.x, and
``torch.amp.GradScaler("cpu")`` exercises the same loss-scaling code as on CUDA.
"""

import importlib
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from modules import compilation, engine
from modules.clip import CLIP, CLIPConfig, ResidualAttentionBlock, SelfAttention
from modules.compilation import CompiledWithFallback
from modules.criterion import RetrievalLoss
from modules.distributed import DistInfo
from modules.model import RetrievalModel
from test_driver import _data_args

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 4
FEATURE_LEN = 6
TEXT_LEN = 8


def _tiny_model(method: str = "upret") -> RetrievalModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16, vocab_size=49408, context_length=TEXT_LEN, text_width=16, text_layers=1, text_heads=2,
        video_input_dim=1024, video_width=16, video_layers=1, video_heads=2, feature_len=FEATURE_LEN,
    )
    return RetrievalModel(config, method=method, sample_num=2, dist_heads=2, dist_dropout=0.0)


def _batches(num: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(num):
        text = torch.zeros(BATCH, TEXT_LEN, dtype=torch.long)
        for row, length in enumerate([3, 5, 4, 8]):
            text[row, 0] = 49406
            text[row, 1:length - 1] = torch.randint(1, 1000, (length - 2,), generator=generator)
            text[row, length - 1] = 49407
        video = torch.randn(BATCH, FEATURE_LEN, 1024, generator=generator)
        video_mask = torch.zeros(BATCH, FEATURE_LEN + 1, dtype=torch.long)
        for row, clips in enumerate([6, 2, 3, 1]):
            video_mask[row, 1:clips + 1] = 1
            video[row, clips:] = 0
        text_aug = text.clone()
        text_aug[1, [1, 2]] = text_aug[1, [2, 1]]  # the random swap of the augmentation, in one sentence
        batches.append({"text_ids": text, "text_aug_ids": text_aug, "video": video, "video_mask": video_mask,
                        "index": torch.arange(BATCH)})
    return batches


def _train(model, batches, precision="fp32", scaler=None, optimizer=None, max_grad_norm=1.0, seed=3):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.manual_seed(seed)
    terms, step = engine.train_one_epoch(
        model, RetrievalLoss(method=model.method), batches, optimizer, scheduler, epoch=0, global_step=0,
        dist_info=DistInfo(), precision=precision, max_grad_norm=max_grad_norm, log_every=0, scaler=scaler,
    )
    return terms, step, scheduler


def _floating_tensors(outputs):
    for key, value in outputs.items():
        if isinstance(value, dict):
            for name, tensor in value.items():
                yield f"{key}/{name}", tensor
        elif torch.is_tensor(value):
            yield key, value


# ---------------------------------------------------------------------------------------------------------------------
# autocast


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_autocast_context_matmul_dtype(precision, dtype):
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with engine.autocast_context(torch.device("cpu"), precision):
        assert (a @ b).dtype == dtype


def test_autocast_context_unknown_rejected():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        engine.autocast_context(torch.device("cpu"), "fp8")


@pytest.mark.parametrize("method", ["upret", "cico"])
def test_bf16_model_outputs_are_fp32(method):
    model = _tiny_model(method)
    batch = _batches(1)[0]
    inputs = (batch["text_ids"], batch["text_aug_ids"], batch["video"], batch["video_mask"])
    torch.manual_seed(5)
    reference = model(*inputs)
    torch.manual_seed(5)
    with engine.autocast_context(torch.device("cpu"), "bf16"):
        outputs = model(*inputs)

    for name, tensor in _floating_tensors(outputs):
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
    # The encoders did run in bf16: their tokens carry bf16 rounding, within bf16's relative precision.
    tokens, expected = outputs["video"]["tokens"], reference["video"]["tokens"]
    assert not torch.equal(tokens, expected)
    torch.testing.assert_close(tokens, expected, atol=0.05, rtol=0.05)


def test_criterion_ignores_outer_autocast():
    model = _tiny_model()
    batch = _batches(1)[0]
    outputs = model(batch["text_ids"], batch["text_aug_ids"], batch["video"], batch["video_mask"])
    criterion = RetrievalLoss(method="upret")
    expected = criterion(outputs)
    with engine.autocast_context(torch.device("cpu"), "bf16"):
        actual = criterion(outputs)
    assert actual["loss"].dtype == torch.float32
    torch.testing.assert_close(actual["loss"], expected["loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual["loss/ot"], expected["loss/ot"], atol=1e-6, rtol=1e-6)


def test_bf16_training_close_to_fp32():
    batches = _batches(3)
    fp32_terms, _, _ = _train(_tiny_model(), batches, precision="fp32")
    bf16_model = _tiny_model()
    bf16_terms, steps, _ = _train(bf16_model, batches, precision="bf16")

    assert steps == 3
    assert math.isfinite(bf16_terms["loss"])
    assert bf16_terms["loss"] == pytest.approx(fp32_terms["loss"], rel=0.02)
    assert bf16_terms["loss/ot"] == pytest.approx(fp32_terms["loss/ot"], rel=0.05, abs=1e-3)
    assert bf16_terms["skipped_steps"] == 0.0
    for param in bf16_model.parameters():
        assert param.dtype == torch.float32  # master weights stay fp32 under autocast


# ---------------------------------------------------------------------------------------------------------------------
# loss scaling


def test_scaler_unscales_before_clipping():
    # With SGD the update is lr * clipped gradient, so a clip applied to the scaled gradient would shrink the
    # step by the loss scale. A scaled step must equal the unscaled one, whose norm is lr * max_grad_norm.
    lr, max_norm = 0.1, 1e-3
    batches = _batches(1)

    def run(scaler):
        model = _tiny_model()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        _train(model, batches, scaler=scaler, optimizer=optimizer, max_grad_norm=max_norm)
        return {name: p.detach() - before[name] for name, p in model.named_parameters()}

    plain = run(None)
    scaled = run(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    plain_norm = torch.sqrt(sum(delta.double().pow(2).sum() for delta in plain.values()))
    assert plain_norm.item() == pytest.approx(lr * max_norm, rel=1e-3)
    for name, delta in plain.items():
        torch.testing.assert_close(scaled[name], delta, atol=1e-9, rtol=1e-4, msg=name)


def _poison_gradient(model, steps):
    """Make the gradient of the video projection infinite at the given step indices (0-based)."""
    calls = {"count": 0}

    def hook(grad):
        step = calls["count"]
        calls["count"] += 1
        return torch.full_like(grad, float("inf")) if step in steps else grad

    model.clip.visual.proj.register_hook(hook)


def test_scaler_skips_overflow_without_error():
    model = _tiny_model()
    _poison_gradient(model, steps={1})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    terms, steps, scheduler = _train(model, _batches(3), scaler=scaler)

    assert steps == 3
    assert terms["skipped_steps"] == 1.0
    assert math.isfinite(terms["loss"])
    assert scheduler.last_epoch == 2  # the schedule does not advance on the skipped step
    assert scaler.get_scale() == 2.0 ** 9
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_scaler_skipped_step_keeps_weights():
    model = _tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _poison_gradient(model, steps={0})
    terms, _, scheduler = _train(model, _batches(1), scaler=torch.amp.GradScaler("cpu"))
    assert terms["skipped_steps"] == 1.0
    assert scheduler.last_epoch == 0
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_scaler_consecutive_skips_raise(monkeypatch):
    monkeypatch.setattr(engine, "MAX_CONSECUTIVE_SKIPPED_STEPS", 2)
    model = _tiny_model()
    _poison_gradient(model, steps={0, 1, 2})
    with pytest.raises(engine.NonFiniteGradientError, match="skipped 2 steps in a row"):
        _train(model, _batches(3), scaler=torch.amp.GradScaler("cpu"))


def test_scaler_non_finite_loss_raises():
    model = _tiny_model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(float("nan"))
    with pytest.raises(engine.NonFiniteLossError, match="bf16 or fp32"):
        _train(model, _batches(1), precision="fp16", scaler=torch.amp.GradScaler("cpu"))


def test_fp16_training_with_cpu_scaler():
    model = _tiny_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    terms, steps, _ = _train(model, _batches(2), precision="fp16", scaler=scaler)
    assert steps == 2
    assert math.isfinite(terms["loss"])
    for param in model.parameters():
        assert param.dtype == torch.float32


def test_disabled_scaler_is_plain_step():
    batches = _batches(2)
    plain_model, disabled_model = _tiny_model(), _tiny_model()
    plain, _, _ = _train(plain_model, batches)
    disabled, _, _ = _train(disabled_model, batches, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert disabled["loss"] == plain["loss"]
    for (name, a), b in zip(plain_model.named_parameters(), disabled_model.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------------------------
# driver: --precision and --compile


@pytest.fixture(scope="module")
def driver():
    sys.path.insert(0, str(REPO_ROOT / "CLCL"))
    return importlib.import_module("main_task_retrieval")


@pytest.mark.parametrize("requested, expected", [("auto", "fp32"), ("fp32", "fp32"), ("bf16", "bf16"),
                                                 ("fp16", "fp16")])
def test_resolve_precision_cpu(driver, requested, expected):
    assert driver.resolve_precision(requested, torch.device("cpu")) == expected


def test_resolve_precision_fp16_cpu_warns(driver, caplog):
    with caplog.at_level(logging.WARNING, logger="upret"):
        driver.resolve_precision("fp16", torch.device("cpu"))
    assert "fp16 on the CPU" in caplog.text


@pytest.mark.parametrize("bf16_supported, auto", [(True, "bf16"), (False, "fp16")])
def test_resolve_precision_cuda(driver, monkeypatch, bf16_supported, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    cuda = torch.device("cuda", 0)
    assert driver.resolve_precision("auto", cuda) == auto
    assert driver.resolve_precision("fp16", cuda) == "fp16"
    if bf16_supported:
        assert driver.resolve_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(ValueError, match="Tesla V100 does not support bf16"):
            driver.resolve_precision("bf16", cuda)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import make_surrogate_features

    make_surrogate_features.main([
        "demo", "--out", str(root), "--train_sentences", "16", "--dev_sentences", "8",
        "--test_sentences", "8", "--min_frames", "10", "--max_frames", "30",
    ])
    return root


def _driver_args(corpus: Path, output_dir: Path) -> list[str]:
    return [*_data_args(corpus, output_dir), "--log_every", "0", "--do_train", "--epochs", "1", "--batch_size", "8"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_driver_trains_in_precision(driver, corpus, tmp_path, precision):
    results = driver.main(_driver_args(corpus, tmp_path) + ["--precision", precision])
    assert results["config"]["precision"] == precision
    train_terms = results["history"][0]["train"]
    assert math.isfinite(train_terms["loss"])
    assert 0 <= train_terms["skipped_steps"] <= 2  # fp16 may skip its first steps while the scale settles
    if precision == "bf16":
        assert train_terms["skipped_steps"] == 0


def test_driver_compile_falls_back(driver, corpus, tmp_path, monkeypatch):
    def broken_compile(module, **kwargs):
        def run(*args, **kwargs):
            raise RuntimeError("simulated compiler failure: no C compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    results = driver.main(_driver_args(corpus, tmp_path) + ["--compile"])
    assert results["config"]["compile"] is True
    assert math.isfinite(results["history"][0]["train"]["loss"])
    log = (tmp_path / "log.txt").read_text()
    assert "torch.compile failed, running the model eagerly instead" in log
    assert "simulated compiler failure" in log


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile wrapper


def test_compile_fallback_on_first_call(monkeypatch, caplog):
    calls = []

    def broken_compile(module, **kwargs):
        def run(*args, **kwargs):
            calls.append(args)
            raise OSError("simulated: cc not found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    linear = torch.nn.Linear(3, 2)
    wrapper = CompiledWithFallback(linear)
    assert wrapper.compiled
    x = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger=compilation.logger.name):
        out = wrapper(x)
    assert torch.equal(out, linear(x))
    assert not wrapper.compiled
    assert "OSError: simulated: cc not found" in wrapper.fallback_reason
    assert "running the model eagerly" in caplog.text
    wrapper(x)
    assert len(calls) == 1  # after the fallback the compiled callable is never tried again


def test_compile_fallback_when_compile_raises(monkeypatch):
    def raising_compile(module, **kwargs):
        raise RuntimeError("simulated: Windows not supported")

    monkeypatch.setattr(torch, "compile", raising_compile)
    linear = torch.nn.Linear(3, 2)
    wrapper = CompiledWithFallback(linear)
    assert not wrapper.compiled
    x = torch.randn(2, 3)
    assert torch.equal(wrapper(x), linear(x))


def test_compile_fallback_without_dynamo(monkeypatch):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    wrapper = CompiledWithFallback(torch.nn.Linear(3, 2))
    assert not wrapper.compiled
    assert "TorchDynamo does not support" in wrapper.fallback_reason


def test_compile_model_error_after_success_raises(monkeypatch):
    def flaky_compile(module, **kwargs):
        state = {"calls": 0}

        def run(*args, **kwargs):
            state["calls"] += 1
            if state["calls"] == 2:
                raise ValueError("bad input shape")
            return module(*args, **kwargs)
        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    wrapper = CompiledWithFallback(torch.nn.Linear(3, 2))
    wrapper(torch.randn(1, 3))
    with pytest.raises(ValueError, match="bad input shape"):
        wrapper(torch.randn(1, 3))
    assert wrapper.compiled


def test_compile_wrapper_exposes_module():
    from modules.checkpoint import unwrap_model

    model = _tiny_model("cico")
    wrapper = CompiledWithFallback(model)
    assert unwrap_model(wrapper) is model
    assert list(wrapper.parameters()) == list(model.parameters())
    assert set(wrapper.state_dict()) == {f"module.{key}" for key in model.state_dict()}


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="TorchDynamo is not supported here")
def test_compile_block_matches_eager():
    # Real TorchInductor compilation of one transformer block, forward and backward. Without a working C
    # compiler the wrapper falls back, and the check of the results still holds.
    torch.manual_seed(0)
    block = ResidualAttentionBlock(8, 2)
    valid = torch.tensor([[True, True, True, True, True], [True, True, True, False, False]])
    x = torch.randn(2, 5, 8)
    wrapper = CompiledWithFallback(block)

    x_compiled = x.clone().requires_grad_(True)
    out = wrapper(x_compiled, key_padding_mask=valid)
    out.square().sum().backward()
    x_eager = x.clone().requires_grad_(True)
    expected = block(x_eager, key_padding_mask=valid)
    expected.square().sum().backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
    if not wrapper.compiled:
        pytest.skip(f"compilation failed and the wrapper fell back: {wrapper.fallback_reason}")


# ---------------------------------------------------------------------------------------------------------------------
# attention


def _explicit_attention(attn: SelfAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + M) V per head, with M = -inf where ``allowed`` [B, 1 or heads, N, N] is False."""
    batch, length, width = x.shape
    head_dim = width // attn.heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def heads(t):
        return t.reshape(batch, length, attn.heads, head_dim).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim)
    bias = torch.zeros_like(scores).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores + bias, dim=-1)
    mixed = (probs @ heads(v)).transpose(1, 2).reshape(batch, length, width)
    return attn.out_proj(mixed)


def test_attention_padding_mask_matches_explicit():
    torch.manual_seed(0)
    attn = SelfAttention(16, 4)
    x = torch.randn(3, 7, 16)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 0] = False  # the video CLS slot is never a key
    valid[1, 4:] = False
    valid[2, [0, 2, 5, 6]] = False
    with torch.no_grad():
        ours = attn(x, key_padding_mask=valid)
        expected = _explicit_attention(attn, x, valid[:, None, None, :].expand(3, 1, 7, 7))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_attention_causal_matches_explicit():
    torch.manual_seed(1)
    attn = SelfAttention(16, 2)
    x = torch.randn(2, 6, 16)
    lower = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        ours = attn(x, causal=True)
        expected = _explicit_attention(attn, x, lower[None, None])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_attention_causal_with_padding_matches_explicit():
    torch.manual_seed(2)
    attn = SelfAttention(16, 2)
    x = torch.randn(2, 6, 16)
    valid = torch.tensor([[True] * 6, [True, True, True, True, False, False]])
    allowed = valid[:, None, None, :] & torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        ours = attn(x, causal=True, key_padding_mask=valid)
        expected = _explicit_attention(attn, x, allowed)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_text_tower_is_causal():
    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=16, context_length=TEXT_LEN, text_width=16, text_layers=2, text_heads=2,
                        video_width=16, video_layers=1, video_heads=2, feature_len=FEATURE_LEN)
    clip = CLIP(config).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 3] = 2368
    with torch.no_grad():
        before, after = clip.encode_text(ids), clip.encode_text(changed)
    # Token j attends to ids 0..j only, so positions before the change keep their features and later ones change.
    torch.testing.assert_close(after[0, :3], before[0, :3], atol=0.0, rtol=0.0)
    for position in range(3, TEXT_LEN):
        assert not torch.allclose(after[0, position], before[0, position]), position


# ---------------------------------------------------------------------------------------------------------------------
# scripts/bench_gpu.sh


def test_bench_gpu_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", UPRET_SKIP_SETUP="1")
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "bench_gpu.sh"), "--dry-run"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "bench_gpu" / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    assert summary["train"]["exit_code"] == 0
    results = json.loads((tmp_path / "bench_gpu" / "train" / "results.json").read_text())
    assert results["steps"] == summary["train"]["steps"]
    assert math.isfinite(results["history"][-1]["train"]["loss"])


def test_bench_gpu_without_cuda_fails_early(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = dict(os.environ, OUT=str(tmp_path), UPRET_SKIP_SETUP="1")
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "bench_gpu.sh")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
    assert "--dry-run" in result.stderr
