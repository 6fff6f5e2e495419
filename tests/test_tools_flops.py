"""tools/flops.py (FLOPs per image, peaks, achieved fraction) and tools/profile_step.py (kernel classes).

Counts are checked against hand-computed values for linear layers (2 FLOPs per multiply-add; a weight
gradient and an input gradient each cost one forward's worth), and the profile on a tiny CPU model.
"""

import dataclasses
import importlib

import pytest
import torch
from torch import nn

from tools import flops, profile_step


def test_linear_forward_is_two_flops_per_multiply_add():
    B, n_in, n_out = 4, 6, 5
    model = nn.Linear(n_in, n_out)
    forward, training = flops.count_step_flops(model, torch.randn(B, n_in))
    assert forward == 2 * n_in * n_out * B
    # the input needs no gradient: backward computes the weight gradient only (bias: a sum, not counted)
    assert training == 2 * forward


def test_linear_training_is_three_forwards_with_both_gradients():
    B, n_in, n_out = 3, 7, 2
    forward, training = flops.count_step_flops(nn.Linear(n_in, n_out), torch.randn(B, n_in, requires_grad=True))
    assert forward == 2 * n_in * n_out * B
    assert training == 3 * forward  # forward + input gradient + weight gradient


def test_frozen_first_layer_has_no_backward():
    B, a, b, c = 2, 8, 6, 4
    model = nn.Sequential(nn.Linear(a, b), nn.Linear(b, c))
    x = torch.randn(B, a)
    forward, training = flops.count_step_flops(model, x)
    assert forward == 2 * B * (a * b + b * c)
    # layer 2: input and weight gradients; layer 1: weight gradient only (its input is the data)
    assert training == forward + 2 * (2 * B * b * c) + 2 * B * a * b
    model[0].requires_grad_(False)  # as a frozen stem: layer 1 has no backward at all, and its output
    _, frozen = flops.count_step_flops(model, x)  # needs no gradient, so layer 2 skips the input gradient
    assert frozen == forward + 2 * B * b * c


def tiny_model(**changes):
    transformer = importlib.import_module("03_transformer")
    config = dataclasses.replace(transformer.PRESETS["demo"], num_classes=5, pretrained=False, **changes)
    return transformer.Query2Label(config)


def test_query2label_counts_meta_equal_cpu_and_add_up():
    model = tiny_model()
    meta = flops.flops_per_image(model, 64)  # shapes only
    cpu = flops.flops_per_image(model, 64, device="cpu")  # real arithmetic
    assert meta == cpu
    assert meta.backbone_forward > 0 and meta.head_forward > 0
    assert meta.forward == meta.backbone_forward + meta.head_forward
    assert meta.forward < meta.training <= 3 * meta.forward
    assert flops.training_flops_per_image(model, 64) == meta.training
    assert next(model.parameters()).device.type == "cpu"  # the caller's model is not moved


def test_frozen_stem_lowers_the_training_count_only():
    trained, frozen = (flops.flops_per_image(tiny_model(freeze_stem=f), 64) for f in (False, True))
    assert frozen.forward == trained.forward
    assert frozen.training < trained.training


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA A10G", None), ("Some Future GPU", None),
])
def test_peak_lookup_longest_match(name, peak):
    value, source = flops.peak_tflops(name)
    assert value == peak
    assert source  # always says where the number comes from, or why there is none


def test_peak_override_wins_and_must_be_positive():
    assert flops.peak_tflops("NVIDIA H200", override=100.0) == (100.0, "--peak-tflops")
    with pytest.raises(ValueError):
        flops.peak_tflops(None, override=0.0)


def test_achieved_fraction():
    tflops, fraction = flops.achieved(images_per_s=1000, flops_per_image=3e11, peak=600.0)
    assert tflops == pytest.approx(300.0, rel=1e-12)
    assert fraction == pytest.approx(0.5, rel=1e-12)
    assert flops.achieved(10, 1e12)[1] is None  # no peak, no fraction
    assert "50.0 % of 600" in flops.describe("model", 1000, 3e11, 600.0)


def test_flops_command_line(capsys):
    flops.main(["--model", "demo", "--img-size", "64", "--peak-tflops", "1", "--images-per-s", "10"])
    out = capsys.readouterr().out
    assert "training step" in out and "ceiling" in out and "% of 1 TFLOP/s" in out


@pytest.mark.parametrize("name, label", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16", "convolution"),
    ("aten::convolution_backward", "convolution"), ("aten::mkldnn_convolution", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn", "matmul"), ("aten::addmm", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "element-wise"),
    ("triton_poi_fused_add_relu_3", "element-wise"), ("triton_red_fused_native_layer_norm_5", "element-wise"),
    ("void at::native::(anonymous namespace)::fused_adamw_kernel", "element-wise"),
    ("aten::native_batch_norm", "element-wise"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"), ("void cudnn::engines_precompiled::nchwToNhwcKernel", "copies"),
    ("triton_poi_fused__to_copy_7", "copies"), ("aten::copy_", "copies"),
    ("aten::empty", "other"),
])
def test_classify(name, label):
    assert profile_step.classify(name) == label


def test_profile_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "profile.md"
    profile_step.main(["--model", "demo", "--img-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                       "--device", "cpu", "--top", "5", "--markdown", str(out), "--timed-steps", "2",
                       "--peak-tflops", "1"])
    text = out.read_text()
    assert "| convolution |" in text and "| matmul |" in text and "aten::" in text
    assert "% of 1 TFLOP/s" in text  # the unprofiled timing, with its fraction of the given peak
    s = profile_step.setup("demo", 64, 2, "cpu")
    rows, wall_ms, kernel_ms = profile_step.profile_steps(s.step, s.images, s.targets, steps=1, warmup=0)
    share = profile_step.shares(rows)
    assert sum(share.values()) == pytest.approx(1.0, abs=1e-9)
    assert share["convolution"] > 0 and share["matmul"] > 0 and share["element-wise"] > 0
    assert wall_ms > 0 and kernel_ms > 0
