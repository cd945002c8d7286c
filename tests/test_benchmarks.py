"""The benchmark scripts' own logic that runs without a GPU."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def train_step():
    path = Path(__file__).parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("benchmark_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("capacity, largest", [(0, 0), (7, 0), (8, 8), (15, 8), (16, 16), (100, 96), (104, 104),
                                               (1000, 1000), (5000, 4096)])
def test_largest_batch_is_the_largest_multiple_of_8_that_fits(train_step, capacity, largest):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert train_step.largest_batch(fits) == largest
    assert all(batch % 8 == 0 for batch in tried)
    # Doubling then bisecting: a handful of tries, never one past the limit.
    assert len(tried) <= 14 and max(tried) <= 4096


def test_batch_sizes_reject_what_is_neither_a_size_nor_max(train_step):
    assert train_step.batch_sizes(["8", "max"]) == ["8", "max"]
    for bad in ("0", "-8", "eight", "8.5"):
        with pytest.raises(SystemExit, match=f"--batch {bad}"):
            train_step.batch_sizes([bad])


MODES = {
    "steps": ["--inputs", "--batch", "--max-memory-fraction", "--skip-render", "--compile", "--cuda-graphs"],
    "count-flops": ["--inputs", "--batch", "--weights"],
    "kernel-floor": ["--batch", "--repeats"],
    "attention": ["--batch", "--repeats"],
    "profile": ["--inputs", "--batch", "--compile", "--slowest"],
}


@pytest.mark.parametrize("mode, options", MODES.items())
def test_each_mode_is_a_subcommand_whose_help_lists_its_options(train_step, mode, options, capsys):
    with pytest.raises(SystemExit) as exit_status:
        train_step.build_parser().parse_args([mode, "--help"])
    assert exit_status.value.code == 0
    printed = capsys.readouterr().out
    assert all(option in printed for option in [*options, "--sizes", "--backbones"])


def test_subcommands_run_their_own_mode_with_the_shared_options(train_step):
    parser = train_step.build_parser()
    steps = parser.parse_args(["steps", "--inputs", "scenes", "--sizes", "576x880", "--batch", "8", "max",
                               "--compile", "--cuda-graphs"])
    assert steps.run is train_step.time_steps and steps.batch == ["8", "max"] and steps.inputs.name == "scenes"
    assert steps.backbones == ["dinov2_vits14"] and steps.repeats == 5 and steps.max_memory_fraction == 0.85
    assert train_step.requested_batches(steps) == ["8", "max"]
    profile = parser.parse_args(["profile", "--inputs", "scenes", "--batch", "64", "--slowest", "40"])
    assert profile.run is train_step.profile_step and train_step.requested_batches(profile) == [64]
    floor = parser.parse_args(["kernel-floor", "--batch", "8", "64"])
    assert floor.run is train_step.kernel_floor and train_step.requested_batches(floor) == [8, 64]
    assert parser.parse_args(["count-flops", "--inputs", "scenes"]).run is train_step.count_flops
    assert parser.parse_args(["attention", "--repeats", "20"]).run is train_step.attention_backends


def test_only_the_steps_search_the_largest_batch(train_step):
    for mode in ("kernel-floor", "attention"):
        args = train_step.build_parser().parse_args([mode, "--batch", "8", "max"])
        with pytest.raises(SystemExit, match=f"--batch max only applies to the timed steps.*give {mode} sizes"):
            train_step.requested_batches(args)


@pytest.mark.parametrize("command", [
    [],  # a mode is required
    ["--inputs", "scenes", "--kernel-floor"],  # the modes were flags before they were subcommands
    ["kernel-floor", "--inputs", "scenes"],
    ["attention", "--skip-render"],
    ["count-flops", "--inputs", "scenes", "--repeats", "3"],
])
def test_a_mode_is_required_and_takes_only_its_own_options(train_step, command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        train_step.build_parser().parse_args(command)
    assert exit_status.value.code == 2


@pytest.mark.filterwarnings("ignore:random weights")
def test_flop_formula_gives_the_published_step_for_vit_s_at_the_authors_size(train_step):
    """ViT-S/14 at 576x880 (41 x 62 tokens), 65,536 prototypes: 11.86 TFLOP a step at batch 8 and 94.87 at 64,
    the figures benchmarks/README.md reports for the step."""
    from snd_stages.config import TrainCfg
    from snd_stages.models.checkpoints import build_model

    cfg = TrainCfg(backbone="dinov2_vits14", weights="random", allow_random_weights=True)
    vit = build_model(cfg).teacher.get_base_model()
    rows, columns = train_step.token_grid([cfg.backbone], 576, 880)
    assert (rows, columns, cfg.prototypes) == (41, 62, 65536)
    assert train_step.network_flops(vit, rows * columns, 8, cfg.prototypes) / 1e12 == pytest.approx(11.858, abs=1e-3)
    assert train_step.network_flops(vit, rows * columns, 64, cfg.prototypes) / 1e12 == pytest.approx(94.866, abs=1e-3)


@pytest.fixture(scope="module")
def counted_step(train_step):
    """torch's FlopCounterMode over the parts of a small network-only step on the CPU, with attention in its math
    form (plain batched products, so backward's are counted as autograd runs them: no recomputed scores)."""
    import contextlib

    import timm
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from snd_stages.config import TrainCfg
    from snd_stages.models.backbones import backbone_spec
    from snd_stages.models.distill import StudentTeacher
    from snd_stages.stages.train import TrainingSample, distillation_step

    torch.manual_seed(0)
    # Head width 64 as in DINOv2; 257 tokens of width 64, so attention is 40 % of each block's products and
    # rank-1 LoRA (not model FLOPs) stays under 1 % of the student's.
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, embed_dim=64, num_heads=1,
                            depth=2, num_classes=0, dynamic_img_size=True)
    model = StudentTeacher(vit, backbone_spec("dinov2_vits14"), out_dim=256, lora_rank=1, lora_alpha=1.0)
    cfg = TrainCfg(prototypes=256, lora_rank=1, lora_alpha=1.0)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    batch = [TrainingSample(images, None, images[1], None, None, None)] * 2
    cpu, no_autocast = torch.device("cpu"), contextlib.nullcontext

    def count(function) -> int:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    def step():
        targets = train_step.network_targets(model, batch, (16, 16), cpu, no_autocast)
        loss, _ = distillation_step(model, batch, cfg, cpu, no_autocast, targets=targets, with_kl=False)
        loss.backward()

    floats = images.float() / 255
    return {
        "vit": vit,
        "teacher": count(lambda: model.teacher_tokens(torch.cat([floats, floats]))),
        "student": count(lambda: model.student_tokens(floats).sum().backward()),
        "step": count(step),
    }


def test_flop_formula_counts_what_the_network_only_step_multiplies(train_step, counted_step):
    vit, patches, batch = counted_step["vit"], 16 * 16, 2
    teacher = train_step.backbone_flops(vit, patches, 2 * batch, training=False)
    student = train_step.backbone_flops(vit, patches, batch, training=True)
    # The teacher (merged) multiplies exactly the model's products; the student adds its rank-1 LoRA products.
    assert counted_step["teacher"] == pytest.approx(teacher, rel=1e-3)
    assert 1.0 <= counted_step["student"] / student < 1.01
    # Attention's backward is two forwards: booked as one, the student's formula falls 16 % short of the count.
    assert counted_step["student"] / (student - 4 * 257**2 * 64 * len(vit.blocks) * batch) > 1.15
    step = train_step.network_flops(vit, patches, batch, prototypes=256)
    assert 1.0 <= counted_step["step"] / step < 1.01


@pytest.mark.parametrize("name, category", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_NNT", "matrix products"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matrix products"),
    ("triton_tem_fused_addmm_gelu_0", "matrix products"),
    ("triton_per_fused__to_copy_add_mul_native_layer_norm_3", "Inductor's fused kernels"),
    ("_soft_cross_entropy_rows_kernel", "loss rows (Triton)"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
])
def test_profile_sorts_kernels_into_the_steps_parts(train_step, name, category):
    assert train_step.kernel_category(name) == category


def test_a_runs_shares_are_taken_against_its_highest_ceiling_pass(train_step):
    """A step timed between two ceiling passes is measured against the higher one, whichever came first, so that a
    pass taken while the GPU ran slow cannot flatter the step."""
    ceilings = train_step.RunCeiling()
    with pytest.raises(ValueError, match="no GEMM-ceiling pass"):
        ceilings.share(300.0)
    ceilings.add(train_step.GemmCeiling(700.0, (4096, 4096, 4096)))
    assert ceilings.share(280.0) == pytest.approx(40.0)
    ceilings.add(train_step.GemmCeiling(800.0, (8192, 8192, 12288)))
    ceilings.add(train_step.GemmCeiling(750.0, (16384, 8192, 8192)))
    assert ceilings.highest().shape == (8192, 8192, 12288)
    assert ceilings.share(280.0) == pytest.approx(35.0)
    assert "700, 800, 750 TFLOP/s" in ceilings.describe()


@pytest.mark.gpu
def test_gemm_ceiling_is_the_fastest_product_of_its_search(train_step):
    """The ceiling is a maximum over its shapes (so no shape of the search beats it by more than timing noise), and
    a real GPU's cuBLAS stays below the datasheet peak."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    ceiling = train_step.gemm_ceiling_tflops(repeats=5)
    assert ceiling.shape[0] in train_step.CEILING_SIDES and ceiling.tflops > 0
    assert train_step.matmul_tflops(8192, 8192, 8192, 5) <= 1.05 * ceiling.tflops
    if not math.isnan(train_step.peak_tflops()):  # a GPU the datasheet table knows
        assert ceiling.tflops < train_step.peak_tflops()


@pytest.fixture(scope="module")
def reconstructors():
    path = Path(__file__).parents[1] / "benchmarks" / "reconstructors.py"
    spec = importlib.util.spec_from_file_location("benchmark_reconstructors", path)
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs: its dataclass looks its module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("size, multiple, valid", [((576, 880), 16, (576, 880)), ((576, 880), 64, (576, 896)),
                                                   ((448, 768), 64, (448, 768)), ((20, 40), 64, (64, 64))])
def test_sizes_move_to_the_nearest_a_model_takes(reconstructors, size, multiple, valid):
    assert reconstructors.nearest_valid(size, multiple) == valid


def test_every_feed_forward_reconstructor_has_a_row(reconstructors):
    labels = [model.label for model in reconstructors.MODELS_TO_TIME]
    assert labels == ["mvsplat", "depthsplat-small", "depthsplat-small_448x768", "depthsplat-base", "depthsplat-large",
                      "depthsplat-base_448x768"]
    assert [model.size_multiple for model in reconstructors.MODELS_TO_TIME] == [16, 16, 64, 16, 16, 64]


@pytest.mark.slow
def test_reconstructors_time_every_model_at_a_tiny_size(reconstructors, tmp_path, monkeypatch, capsys):
    pytest.importorskip("open3d")
    labels = ["mvsplat", "depthsplat-small", "depthsplat-small_448x768"]
    monkeypatch.setattr("sys.argv", ["reconstructors.py", "--sizes", "64x64", "--pairs", "1", "--gap", "1",
                                     "--device", "cpu", "--models", *labels])
    reconstructors.main()
    output = capsys.readouterr().out
    for label in labels:
        assert label in output
    assert "64x64" in output and "random init" in output
