"""Distillation model: LoRA placement and merging, export to timm, DINO head, loss, EMA teacher, token extraction."""

from __future__ import annotations

import copy
import functools
import math
import shutil
import socket

import peft
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from snd_stages.models.backbones import backbone_spec
from snd_stages.models.distill import StudentTeacher, ema_schedule
from snd_stages.models.heads import DINOHead
from snd_stages.models.lora import add_lora, export_backbone, lora_module_names, merged_backbone
from snd_stages.models.losses import cosine_distillation_loss, distillation_loss, prototype_cross_entropy
from snd_stages.models.tokens import patch_tokens
from snd_stages.models.weights import create_backbone

DEPTH = 2
SMALL_OUT_DIM = 512  # prototypes where a test does not need the real 65,536
VITS14 = backbone_spec("dinov2_vits14")  # what tiny_vit is, but for its depth
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# One float32 rounding step of slack for the EMA: a fused lerp and the two-term formula round differently.
EMA_TOLERANCE = dict(rtol=1e-6, atol=1e-7)


@functools.cache
def _pristine_vit(name: str, depth: int) -> VisionTransformer:
    return timm.create_model(name, pretrained=False, img_size=56, depth=depth, num_classes=0, dynamic_img_size=True)


def tiny_vit(name: str = "vit_small_patch14_dinov2", depth: int = DEPTH) -> VisionTransformer:
    """A random DINOv2-style ViT-S/14 with ``depth`` blocks, built for 56 px (a 4x4 position table).

    Every call returns a fresh copy of the same weights (copying is cheaper than timm's initialisation).
    """
    return copy.deepcopy(_pristine_vit(name, depth))


def randomize_lora_b(model: torch.nn.Module, std: float = 0.05) -> None:
    """Give every LoRA B matrix random values, so that LoRA changes the output (B is zero at init)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, std)


def perturb_head(head: DINOHead, std: float = 0.01) -> None:
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * std)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_lands_on_attention_projections_only():
    model = add_lora(tiny_vit(), VITS14.lora_targets)
    expected = [f"blocks.{i}.attn.{name}" for i in range(DEPTH) for name in ("qkv", "proj")]
    assert sorted(lora_module_names(model)) == sorted(expected)
    assert len(lora_module_names(model)) == 2 * DEPTH
    base = model.get_base_model()
    assert type(base.patch_embed.proj) is torch.nn.Conv2d
    assert all(type(block.mlp.fc1) is type(block.mlp.fc2) is torch.nn.Linear for block in base.blocks)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {
        f"base_model.model.{module}.lora_{side}.default.weight" for module in expected for side in "AB"
    }


def test_lora_reference_quirks_also_adapt_patch_embedding():
    model = add_lora(tiny_vit(), VITS14.lora_targets, reference_quirks=True)
    names = lora_module_names(model)
    assert len(names) == 2 * DEPTH + 1
    assert "patch_embed.proj" in names
    patch_lora = model.get_base_model().patch_embed.proj
    assert isinstance(patch_lora, peft.tuners.lora.Conv2d)
    assert patch_lora.lora_A["default"].weight.shape == (8, 3, 14, 14)
    assert patch_lora.lora_B["default"].weight.shape == (384, 8, 1, 1)
    assert not any("mlp" in name for name in names)


@pytest.mark.parametrize("reference_quirks", [False, True])
def test_lora_at_init_leaves_outputs_unchanged(reference_quirks):
    backbone = tiny_vit()
    base = copy.deepcopy(backbone)
    model = add_lora(backbone, VITS14.lora_targets, reference_quirks=reference_quirks)
    model.train()  # LoRA dropout active: B = 0 must still contribute exactly nothing
    images = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), base.forward_features(images))


def test_lora_rejects_targets_missing_from_blocks():
    with pytest.raises(ValueError, match="attn.qvk"):
        add_lora(tiny_vit(), targets=("attn.qvk",))


@pytest.mark.parametrize("reference_quirks", [False, True])
def test_merged_backbone_matches_lora_model(reference_quirks):
    backbone = tiny_vit()
    base = copy.deepcopy(backbone).eval()
    model = add_lora(backbone, VITS14.lora_targets, reference_quirks=reference_quirks)
    randomize_lora_b(model)
    model.eval()
    images = torch.rand(2, 3, 56, 70)
    merged = merged_backbone(model)

    assert type(merged) is VisionTransformer
    assert list(merged.state_dict()) == list(base.state_dict())
    assert len(lora_module_names(model)) == 2 * DEPTH + reference_quirks  # the original keeps its adapters
    with torch.no_grad():
        lora_output = model.forward_features(images)
        assert not torch.equal(lora_output, base.forward_features(images))
        torch.testing.assert_close(merged.forward_features(images), lora_output, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exported_backbone_loads_offline_through_timm(tmp_path, monkeypatch):
    # The full-size ViT-S/14 at 518 px, which the timm call below builds; random values without timm's (slower)
    # initialisation.
    with torch.device("meta"):
        backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    backbone.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.normal_(0.0, 0.02)
    model = add_lora(backbone, VITS14.lora_targets, reference_quirks=True)
    randomize_lora_b(model, std=0.02)
    model.eval()
    path = tmp_path / "student.safetensors"
    export_backbone(model, path)
    assert safetensors.safe_open(path, "pt").metadata()["architecture"] == "vit_small_patch14_dinov2"

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a local file needs no offline switch
    loaded = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        num_classes=0,
        dynamic_img_size=True,
    ).eval()
    reloaded = create_backbone("dinov2_vits14", path).eval()

    images = torch.rand(2, 3, 56, 70)
    with torch.no_grad():
        loaded_output = loaded.forward_features(images)
        # The same weights; create_backbone embeds patches by matrix product (PatchProjection): equal up to rounding.
        torch.testing.assert_close(reloaded.forward_features(images), loaded_output, rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded.state_dict()["patch_embed.proj.weight"], loaded.state_dict()["patch_embed.proj.weight"])
        torch.testing.assert_close(loaded_output, model.forward_features(images), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# DINO head


def test_dino_head_shapes_init_and_state_dict_keys():
    head = DINOHead(384, SMALL_OUT_DIM)
    assert head(torch.randn(3, 5, 384)).shape == (3, 5, SMALL_OUT_DIM)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.shape == (SMALL_OUT_DIM, 1) and torch.equal(magnitude, torch.ones_like(magnitude))
    # With g = 1 every prototype is a unit vector.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(SMALL_OUT_DIM))
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        assert abs(layer.weight.std().item() - 0.02) < 0.002
    assert set(head.state_dict()) == {
        *(f"mlp.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")),
        "last_layer.parametrizations.weight.original0",
        "last_layer.parametrizations.weight.original1",
    }
    assert head.mlp[0].weight.shape == (2048, 384) and head.mlp[4].weight.shape == (256, 2048)
    assert DINOHead(384).last_layer.parametrizations.weight.original1.shape == (65536, 256)


def test_dino_head_normalises_the_bottleneck():
    head = DINOHead(384, SMALL_OUT_DIM)
    tokens = torch.randn(7, 384)
    seen: list[Tensor] = []
    head.last_layer.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        logits = head(tokens)
        torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(7))
        # Scaling what enters the normalisation (the bottleneck layer's output) must not change the logits.
        head.mlp[4].weight.mul_(3.0)
        head.mlp[4].bias.mul_(3.0)
        torch.testing.assert_close(head(tokens), logits)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def test_distillation_loss_matches_direct_computation_and_gradients():
    student = torch.randn(6, 11, requires_grad=True)
    teacher = torch.randn(6, 11, requires_grad=True)
    loss = distillation_loss(student, teacher)
    direct = -(torch.softmax(teacher, dim=-1) * torch.log_softmax(student, dim=-1)).sum(dim=-1).mean()
    torch.testing.assert_close(loss, direct)
    loss.backward()
    assert teacher.grad is None
    # d loss / d student = (softmax(student) - softmax(teacher)) / N
    expected_grad = (torch.softmax(student, -1) - torch.softmax(teacher, -1)).detach() / 6
    torch.testing.assert_close(student.grad, expected_grad)


def test_distillation_loss_of_uniform_logits_is_log_k():
    classes = 65536
    loss = distillation_loss(torch.full((4, classes), 2.5), torch.full((4, classes), -1.0))
    assert math.isclose(loss.item(), math.log(classes), rel_tol=1e-6)


def test_distillation_loss_runs_in_float32_under_autocast():
    student, teacher = torch.randn(5, 300), torch.randn(5, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distillation_loss(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, distillation_loss(student.bfloat16().float(), teacher.bfloat16().float()))


def test_distillation_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(4, 9\)"):
        distillation_loss(torch.zeros(4, 8), torch.zeros(4, 9))


def head_inputs(tokens: int, prototypes: int, dim: int = 32, seed: int = 0, device: str = "cpu"):
    """Normalised bottlenecks and prototypes of a student and a teacher, the student's with gradients."""
    generator = torch.Generator().manual_seed(seed)
    def bottleneck():
        return F.normalize(torch.randn(tokens, dim, generator=generator), dim=-1).to(device)
    def prototypes_of():
        # Large enough weights that the softmaxes are far from uniform: the gradient is then not near zero.
        return (4.0 * torch.randn(prototypes, dim, generator=generator)).to(device)
    return (bottleneck().requires_grad_(), prototypes_of().requires_grad_(), bottleneck(), prototypes_of())


def plain_loss_and_gradients(student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes):
    """The plain path: whole [N, K] logits through ``F.linear`` (as the head's layer runs) and distillation_loss."""
    student_bottleneck.grad = student_prototypes.grad = None
    loss = distillation_loss(F.linear(student_bottleneck, student_prototypes), F.linear(teacher_bottleneck, teacher_prototypes))
    loss.backward()
    return loss.detach(), student_bottleneck.grad.clone(), student_prototypes.grad.clone()


def fused_loss_and_gradients(student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes, **kwargs):
    student_bottleneck.grad = student_prototypes.grad = None
    loss, entropy = prototype_cross_entropy(student_bottleneck, student_prototypes, teacher_bottleneck,
                                            teacher_prototypes, **kwargs)
    loss.backward()
    return loss.detach(), student_bottleneck.grad.clone(), student_prototypes.grad.clone(), entropy


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_fused_prototype_loss_equals_the_plain_loss_and_its_gradients(chunk_rows):
    inputs = head_inputs(tokens=50, prototypes=300)
    loss, bottleneck_grad, prototype_grad, entropy = fused_loss_and_gradients(
        *inputs, chunk_rows=chunk_rows, with_teacher_entropy=True
    )
    plain, plain_bottleneck_grad, plain_prototype_grad = plain_loss_and_gradients(*inputs)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    assert relative_error(bottleneck_grad, plain_bottleneck_grad) < 1e-5
    assert relative_error(prototype_grad, plain_prototype_grad) < 1e-5
    teacher_log_probabilities = torch.log_softmax(F.linear(inputs[2], inputs[3]), dim=-1)
    expected_entropy = -(teacher_log_probabilities.exp() * teacher_log_probabilities).sum(-1).mean()
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-6, atol=0)
    assert not entropy.requires_grad and plain - entropy > 0  # the kl: cross-entropy exceeds the entropy


def test_fused_prototype_loss_under_bf16_autocast_rounds_like_the_plain_path():
    inputs = head_inputs(tokens=40, prototypes=2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, bottleneck_grad, prototype_grad, _ = fused_loss_and_gradients(*inputs, chunk_rows=16)
        plain, plain_bottleneck_grad, plain_prototype_grad = plain_loss_and_gradients(*inputs)
    assert loss.dtype == torch.float32 and bottleneck_grad.dtype == prototype_grad.dtype == torch.float32
    # Same bf16 logits, same float32 softmaxes: the losses agree to float32 summation order.
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)
    # Gradients pass through bf16 matrix products on both paths, rounded at different points (measured 5.5e-3
    # and 4.6e-3; bf16 keeps 8 bits), and the fused one stays as near the float32 gradients as the plain one
    # (1.3e-2 vs 1.5e-2 for the bottleneck, 1.3e-2 vs 1.2e-2 for the prototypes).
    assert relative_error(bottleneck_grad, plain_bottleneck_grad) < 1e-2
    assert relative_error(prototype_grad, plain_prototype_grad) < 1e-2
    _, float32_bottleneck_grad, float32_prototype_grad = plain_loss_and_gradients(*inputs)
    assert relative_error(bottleneck_grad, float32_bottleneck_grad) < 2e-2
    assert relative_error(prototype_grad, float32_prototype_grad) < 2e-2


def test_fused_prototype_loss_gives_the_teacher_no_gradient_and_skips_unneeded_ones():
    student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes = head_inputs(20, 64)
    teacher_bottleneck.requires_grad_()
    teacher_prototypes.requires_grad_()
    student_prototypes.requires_grad_(False)
    loss, _ = prototype_cross_entropy(student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes)
    loss.backward()
    assert teacher_bottleneck.grad is None and teacher_prototypes.grad is None and student_prototypes.grad is None
    assert student_bottleneck.grad.abs().max() > 0


def test_fused_prototype_loss_rejects_mismatched_shapes():
    student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes = head_inputs(20, 64)
    with pytest.raises(ValueError, match=r"teacher \(19, 32\)"):
        prototype_cross_entropy(student_bottleneck, student_prototypes, teacher_bottleneck[:19], teacher_prototypes)
    with pytest.raises(ValueError, match=r"student \(20, 32\) x \(64, 31\)"):
        prototype_cross_entropy(student_bottleneck, student_prototypes[:, :31], teacher_bottleneck, teacher_prototypes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton rows kernel runs on CUDA only")
def test_fused_prototype_loss_on_cuda_at_65536_prototypes_matches_the_plain_path():
    inputs = head_inputs(tokens=5000, prototypes=65536, dim=256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, bottleneck_grad, prototype_grad, entropy = fused_loss_and_gradients(*inputs, with_teacher_entropy=True)
        plain, plain_bottleneck_grad, plain_prototype_grad = plain_loss_and_gradients(*inputs)
    float32, float32_bottleneck_grad, float32_prototype_grad = plain_loss_and_gradients(*inputs)
    logits = F.linear(inputs[2], inputs[3])
    log_probabilities = torch.log_softmax(logits, dim=-1)
    float32_entropy = -(log_probabilities.exp() * log_probabilities).sum(-1).mean()
    measured = dict(
        loss=relative_error(loss, plain), plain_loss_to_float32=relative_error(plain, float32),
        loss_to_float32=relative_error(loss, float32), entropy_to_float32=relative_error(entropy, float32_entropy),
        bottleneck_grad=relative_error(bottleneck_grad, plain_bottleneck_grad),
        prototype_grad=relative_error(prototype_grad, plain_prototype_grad),
        bottleneck_grad_to_float32=relative_error(bottleneck_grad, float32_bottleneck_grad),
        plain_bottleneck_grad_to_float32=relative_error(plain_bottleneck_grad, float32_bottleneck_grad),
    )
    print(measured)
    assert measured["loss"] < 1e-5 and measured["entropy_to_float32"] < 1e-3, measured
    assert measured["bottleneck_grad"] < 2e-2 and measured["prototype_grad"] < 2e-2, measured
    assert measured["bottleneck_grad_to_float32"] < 2 * measured["plain_bottleneck_grad_to_float32"] + 1e-3, measured


def test_cosine_loss_is_one_minus_the_cosine_averaged_over_covered_tokens_only():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 3, 4, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 6, 3, 4, generator=generator, requires_grad=True)
    coverage = torch.rand(2, 3, 4, generator=generator) > 0.4
    loss = cosine_distillation_loss(student, teacher, coverage)
    s, t = student.detach().double(), teacher.detach().double()
    cosines = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))  # [2, 3, 4]
    torch.testing.assert_close(loss.double(), (1 - cosines)[coverage].mean(), rtol=1e-6, atol=0)
    # An uncovered token counts for nothing: whatever the teacher holds there, the loss is the same.
    elsewhere = torch.where(coverage[:, None], teacher.detach(), 100 * torch.randn(2, 6, 3, 4, generator=generator))
    assert torch.equal(cosine_distillation_loss(student, elsewhere, coverage), loss.detach())
    loss.backward()
    assert teacher.grad is None  # the gradient flows to the student only
    per_token = student.grad.abs().sum(1)
    assert (per_token[coverage] > 0).all() and (per_token[~coverage] == 0).all()


def test_cosine_loss_of_identical_tokens_is_zero_whatever_their_scale():
    tokens = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    covered = torch.ones(2, 3, 5, dtype=torch.bool)
    assert cosine_distillation_loss(tokens, tokens, covered).abs() < 1e-6
    # Weakly covered splatted tokens are attenuated towards 0 (no alpha normalisation): only directions count.
    assert cosine_distillation_loss(tokens, 0.2 * tokens, covered).abs() < 1e-6
    torch.testing.assert_close(cosine_distillation_loss(tokens, -tokens, covered), torch.tensor(2.0))
    assert cosine_distillation_loss(tokens, -tokens, ~covered) == 0  # nothing covered, nothing to learn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cosine_distillation_loss(tokens.bfloat16(), tokens.bfloat16(), covered).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(2, 8, 3, 5\), \(2, 8, 3, 5\) and \(2, 3, 4\)"):
        cosine_distillation_loss(tokens, tokens, covered[..., :4])


# ---------------------------------------------------------------------------------------------------------------
# Student and teacher


def small_student_teacher(reference_quirks: bool = False) -> StudentTeacher:
    return StudentTeacher(tiny_vit(), VITS14, out_dim=SMALL_OUT_DIM, reference_quirks=reference_quirks)


def test_trainable_parameters_are_student_lora_and_student_head():
    model = small_student_teacher()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    lora = {
        f"student.base_model.model.blocks.{i}.attn.{module}.lora_{side}.default.weight"
        for i in range(DEPTH)
        for module in ("qkv", "proj")
        for side in "AB"
    }
    head = {f"student_head.{name}" for name in model.student_head.state_dict()}
    assert trainable == lora | head
    named = dict(model.named_parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(named[name]) for name in lora | head}
    assert len(model.trainable_parameters()) == 4 * DEPTH + 8


def test_without_heads_only_lora_trains_and_follows_by_ema():
    model = StudentTeacher(tiny_vit(), VITS14, out_dim=SMALL_OUT_DIM, heads=False)
    assert model.student_head is None and model.teacher_head is None
    assert not [name for name in model.state_dict() if name.startswith(("student_head.", "teacher_head."))]
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert len(model.trainable_parameters()) == len(trainable) == 4 * DEPTH
    assert all(".lora_" in name for name in trainable)
    randomize_lora_b(model.student)
    model.update_teacher(0.5)
    teacher, student = model.ema_pairs()
    assert len(teacher) == 4 * DEPTH
    for name, parameter in model.teacher.named_parameters():
        if ".lora_B." in name:
            torch.testing.assert_close(parameter, 0.5 * dict(model.student.named_parameters())[name], **EMA_TOLERANCE)
    assert model.train() is model and not model.teacher.training


def test_teacher_starts_as_an_exact_copy():
    model = small_student_teacher()
    teacher_state = model.teacher.state_dict()
    for name, tensor in model.student.state_dict().items():
        assert torch.equal(tensor, teacher_state[name]), name
    teacher_head_state = model.teacher_head.state_dict()
    for name, tensor in model.student_head.state_dict().items():
        assert torch.equal(tensor, teacher_head_state[name]), name


def test_update_teacher_is_the_ema_formula_on_lora_and_head_only():
    model = small_student_teacher()
    randomize_lora_b(model.student)
    perturb_head(model.student_head)
    teacher, student = model.ema_pairs()
    assert len(teacher) == len(student) == 4 * DEPTH + 8
    old_teacher = [tensor.clone() for tensor in teacher]
    frozen_before = {name: p.clone() for name, p in model.teacher.named_parameters() if ".lora_" not in name}

    model.update_teacher(0.9)

    for new, old, target in zip(teacher, old_teacher, student):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target, **EMA_TOLERANCE)
    student_params = dict(model.student.named_parameters())
    for name, parameter in model.teacher.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(parameter, frozen_before[name]) and torch.equal(parameter, student_params[name]), name


def test_update_teacher_matches_its_reference():
    model = small_student_teacher()
    randomize_lora_b(model.student)
    perturb_head(model.student_head)
    reference = copy.deepcopy(model)
    model.update_teacher(0.999)
    reference._update_teacher(0.999)
    for fast, slow in zip(model.ema_pairs()[0], reference.ema_pairs()[0]):
        torch.testing.assert_close(fast, slow, **EMA_TOLERANCE)


def test_update_teacher_reaches_the_models_tensors_after_a_cast():
    model = small_student_teacher()
    assert model.ema_pairs() is model.ema_pairs()  # paired once
    model.update_teacher(0.5)  # pairs the float32 tensors
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # casting then makes new parameter objects
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    randomize_lora_b(model.student)
    expected = {name: 0.5 * p + 0.5 * dict(model.student.named_parameters())[name]
                for name, p in model.teacher.named_parameters() if ".lora_B." in name}
    model.update_teacher(0.5)
    for name, parameter in model.teacher.named_parameters():
        if name in expected:
            assert parameter.dtype == torch.float64
            torch.testing.assert_close(parameter, expected[name], **EMA_TOLERANCE)


def test_update_teacher_keeps_identical_tensors_bit_identical():
    model = small_student_teacher()
    before = [tensor.clone() for tensor in model.ema_pairs()[0]]
    model.update_teacher(0.999)
    assert all(torch.equal(new, old) for new, old in zip(model.ema_pairs()[0], before))
    with pytest.raises(ValueError, match="1.5"):
        model.update_teacher(1.5)


def test_teacher_never_receives_gradients():
    model = small_student_teacher()
    randomize_lora_b(model.student)
    images = torch.rand(2, 3, 56, 56)
    loss = distillation_loss(
        model.student_logits(model.student_tokens(images)), model.teacher_logits(model.teacher_tokens(images))
    )
    loss.backward()
    assert all(parameter.grad is None for parameter in model.teacher.parameters())
    assert all(parameter.grad is None for parameter in model.teacher_head.parameters())
    assert all(parameter.grad is not None for parameter in model.trainable_parameters())
    frozen = [p for name, p in model.student.named_parameters() if ".lora_" not in name]
    assert frozen and all(parameter.grad is None for parameter in frozen)


def teacher_dropout_modes(model: StudentTeacher) -> set[bool]:
    return {module.training for name, module in model.teacher.named_modules() if name.endswith("lora_dropout.default")}


def test_teacher_is_deterministic_and_stays_in_eval_mode():
    model = small_student_teacher()
    randomize_lora_b(model.teacher)
    model.train()
    assert model.training and model.student.training
    assert not model.teacher.training and not model.teacher_head.training
    assert teacher_dropout_modes(model) == {False}
    images = torch.rand(2, 3, 56, 56)
    assert torch.equal(model.teacher_tokens(images), model.teacher_tokens(images))


def test_teacher_runs_merged_and_matches_its_lora_model_after_every_update():
    model = small_student_teacher()
    randomize_lora_b(model.student)
    model.eval()
    images = torch.rand(2, 3, 56, 70)
    for _ in range(2):  # the merged weights follow each EMA step
        model.update_teacher(0.5)
        with torch.no_grad():
            through_lora = patch_tokens(model.teacher, VITS14, images)
        assert relative_error(model.teacher_tokens(images), through_lora) < 1e-5
    plain = model._merged_teacher()
    assert type(plain) is VisionTransformer
    # Only the adapted weights are the view's own; the frozen rest is the teacher's own tensors, not copies.
    teacher = dict(model.teacher.named_parameters())
    shared = [name for name, p in plain.named_parameters()
              if any(p is q for q in teacher.values())]
    own = {name for name, _ in plain.named_parameters()} - set(shared)
    assert own == {f"blocks.{i}.attn.{layer}.weight" for i in range(DEPTH) for layer in ("qkv", "proj")}
    assert plain.blocks[0].attn.qkv.bias is teacher["base_model.model.blocks.0.attn.qkv.base_layer.bias"]


def test_merged_teacher_refreshes_linear_layers_in_one_product_and_convolutions_through_peft():
    # Under the reference quirks LoRA also sits on the patch-embedding convolution, which PEFT merges itself.
    model = small_student_teacher(reference_quirks=True)
    randomize_lora_b(model.student)
    model.eval()
    model.update_teacher(0.5)
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        through_lora = patch_tokens(model.teacher, VITS14, images)
    assert relative_error(model.teacher_tokens(images), through_lora) < 1e-5
    refreshed_by_peft = {type(layer).__name__ for _, layer, product in model._merged_teacher._merged if product is None}
    assert refreshed_by_peft == {"Conv2d"}
    assert sum(product is not None for _, _, product in model._merged_teacher._merged) == 2 * DEPTH


def test_merged_teacher_view_follows_the_teacher_to_another_dtype():
    model = small_student_teacher()
    randomize_lora_b(model.teacher)
    model.eval()
    images = torch.rand(1, 3, 56, 56)
    model.teacher_tokens(images)
    model.double()
    with torch.no_grad():
        expected = patch_tokens(model.teacher, VITS14, images.double())
    tokens = model.teacher_tokens(images.double())
    assert tokens.dtype == torch.float64 and relative_error(tokens, expected) < 1e-12


def test_teacher_dropout_is_active_under_reference_quirks():
    model = small_student_teacher(reference_quirks=True)
    randomize_lora_b(model.teacher)
    assert model.teacher.training and teacher_dropout_modes(model) == {True}
    images = torch.rand(2, 3, 56, 56)
    assert not torch.equal(model.teacher_tokens(images), model.teacher_tokens(images))
    model.eval()  # as in the reference, the teacher follows the module's mode
    assert not model.teacher.training and teacher_dropout_modes(model) == {False}
    model.train()
    assert model.teacher.training


def test_logit_helpers_flatten_tokens_in_batch_row_column_order():
    model = small_student_teacher()
    features = torch.randn(2, 384, 3, 4)
    logits = model.student_logits(features)
    assert logits.shape == (2 * 3 * 4, SMALL_OUT_DIM)
    torch.testing.assert_close(logits[1 * 12 + 2 * 4 + 3], model.student_head(features[1, :, 2, 3]))
    assert not model.teacher_logits(features).requires_grad


# ---------------------------------------------------------------------------------------------------------------
# Schedule


def test_ema_schedule_updates_every_tenth_step():
    updates = {step: ema_schedule(step) for step in range(35)}
    assert [step for step, momentum in updates.items() if momentum is not None] == [0, 10, 20, 30]
    assert updates[10] == 0.999
    assert [step for step in range(9) if ema_schedule(step, every=4) is not None] == [0, 4, 8]


def test_ema_schedule_cosine_ramp():
    ramp = dict(every=1, momentum=0.996, final_momentum=1.0, total_steps=100)
    assert ema_schedule(0, **ramp) == pytest.approx(0.996)
    assert ema_schedule(50, **ramp) == pytest.approx(0.998)
    assert ema_schedule(100, **ramp) == pytest.approx(1.0)
    assert ema_schedule(200, **ramp) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        ema_schedule(0, final_momentum=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Token extraction


def by_hand(backbone: VisionTransformer, images: Tensor, size: tuple[int, int], prefix: int) -> Tensor:
    """Reference extraction: resize, normalise, forward_features, drop prefix tokens, reshape to [B, C, h, w]."""
    if images.shape[-2:] != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    tokens = backbone.forward_features((images - IMAGENET_MEAN) / IMAGENET_STD)[:, prefix:]
    grid = (size[0] // 14, size[1] // 14)
    return tokens.reshape(images.shape[0], *grid, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("name", "prefix"), [("dinov2_vits14", 1), ("dinov2_vits14_reg", 5)])
def test_patch_tokens_resize_normalise_and_drop_prefix(name, prefix):
    spec = backbone_spec(name)
    backbone = tiny_vit(spec.timm_name, depth=1).eval()
    assert backbone.num_prefix_tokens == spec.prefix_tokens == prefix
    images = torch.rand(2, 3, 60, 90)
    with torch.no_grad():
        tokens = patch_tokens(backbone, spec, images)
        assert tokens.shape == (2, 384, 4, 6)
        assert torch.equal(tokens, by_hand(backbone, images, (56, 84), prefix))
        already_multiple = torch.rand(1, 3, 42, 70)
        expected = by_hand(backbone, already_multiple, (42, 70), prefix)
        assert torch.equal(patch_tokens(backbone, spec, already_multiple), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graphs_give_the_compiled_steps_while_the_weights_change_in_place():
    # The graphs read the weights at fixed addresses; the optimiser, the EMA and the merged teacher's refresh change
    # them in place between steps. A replay that saw stale weights would give the previous step's tokens. Compiled
    # without graphs, the same Inductor kernels run: the two agree to the bit (an H100 gave 0 difference in every
    # step), where consecutive steps differ by 5-100 %.
    images = torch.rand(2, 3, 70, 98, device="cuda")
    contexts = torch.rand(2, 3, 70, 98, device="cuda")

    def tokens_per_step(cuda_graphs: bool) -> list[tuple[Tensor, Tensor]]:
        backbone = tiny_vit()  # before seeding: the first call builds the shared ViT from the global generator
        torch.manual_seed(0)
        for block in backbone.blocks:  # LayerScale's 1e-5 initialisation would hide what LoRA changes
            block.ls1.gamma.data.fill_(1.0)
            block.ls2.gamma.data.fill_(1.0)
        model = StudentTeacher(backbone, VITS14, out_dim=SMALL_OUT_DIM, lora_dropout=0.0).cuda()
        randomize_lora_b(model.student, std=0.2)
        model.compile_backbones(cuda_graphs=cuda_graphs)
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=0.01)
        goal = torch.randn(2, 384, 5, 7, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        steps = []
        for _ in range(5):
            model.begin_step()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                student = model.student_tokens(images).float()
                teacher = model.teacher_tokens(contexts).float()
            loss = (student - goal).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            model.update_teacher(0.5)
            optimizer.step()
            steps.append((student.detach().clone(), teacher.clone()))
        return steps

    compiled = tokens_per_step(cuda_graphs=False)
    graphs = tokens_per_step(cuda_graphs=True)
    for (student, teacher), (next_student, next_teacher) in zip(compiled, compiled[1:]):
        assert relative_error(next_student, student) > 0.05 and relative_error(next_teacher, teacher) > 0.02
    for (graph_student, graph_teacher), (student, teacher) in zip(graphs, compiled):
        assert relative_error(graph_student, student) < 1e-6
        assert relative_error(graph_teacher, teacher) < 1e-6


def test_patch_tokens_through_the_lora_model():
    backbone = tiny_vit()
    base = copy.deepcopy(backbone).eval()
    model = add_lora(backbone, VITS14.lora_targets, reference_quirks=True).eval()
    images = torch.rand(1, 3, 60, 90)
    with torch.no_grad():
        assert torch.equal(patch_tokens(model, VITS14, images), patch_tokens(base, VITS14, images))


def test_patch_tokens_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 56, 56\)"):
        patch_tokens(tiny_vit(), VITS14, torch.rand(2, 1, 56, 56))
    with pytest.raises(ValueError, match="H >= 14"):
        patch_tokens(tiny_vit(), VITS14, torch.rand(2, 3, 10, 56))


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor on CPU needs g++")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
])
def test_compiled_backbones_give_the_eager_tokens_and_gradients(device):
    model = StudentTeacher(tiny_vit(), VITS14, out_dim=SMALL_OUT_DIM).to(device)
    randomize_lora_b(model.student)
    randomize_lora_b(model.teacher)
    model.eval()  # no dropout: both runs must see the same computation
    images = torch.rand(2, 3, 70, 98, device=device)
    direction = torch.randn(2, 384, 5, 7, device=device)

    def tokens_and_lora_gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            student = model.student_tokens(images)
            teacher = model.teacher_tokens(images)
        (student.float() * direction).sum().backward()
        gradients = [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]
        return student.detach().float(), teacher.float(), gradients

    eager = tokens_and_lora_gradients()
    model.compile_backbones()
    compiled = tokens_and_lora_gradients()
    assert model.patch_tokens is not patch_tokens
    # bf16 activations, fused differently: agreement to a few bf16 rounding steps.
    assert relative_error(compiled[0], eager[0]) < 2e-2 and relative_error(compiled[1], eager[1]) < 2e-2
    assert len(compiled[2]) == len(eager[2]) > 0
    for compiled_gradient, eager_gradient in zip(compiled[2], eager[2]):
        assert relative_error(compiled_gradient, eager_gradient) < 5e-2
    # Export merges a copy of the backbone; it computes the student's tokens on its own, compiled or not.
    with torch.autocast(device, dtype=torch.bfloat16), torch.no_grad():
        exported = patch_tokens(merged_backbone(model.student), VITS14, images).float()
    assert relative_error(exported, eager[0]) < 2e-2


def test_exports_are_byte_identical_for_the_same_tensors():
    import safetensors
    import safetensors.torch

    from snd_stages.models.lora import _canonical_header

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([-0.0, 1.5])}
    metadata = {"format": "pt", "architecture": "vit_small_patch14_dinov2", "z": "1", "m": "2"}
    blobs = {_canonical_header(safetensors.torch.save(tensors, metadata=metadata)) for _ in range(20)}
    assert len(blobs) == 1  # safetensors alone writes its metadata in hash order: several distinct files
    blob = blobs.pop()
    loaded = safetensors.torch.load(blob)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert torch.signbit(loaded["a.bias"][0])
    with safetensors.safe_open(_write(blob), "pt") as handle:
        assert handle.metadata() == metadata


def _write(blob: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as handle:
        handle.write(blob)
    return handle.name
