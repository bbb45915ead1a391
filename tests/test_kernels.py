"""The expert-kernel policy, asked about devices this machine doesn't have (capability, dtype, torch version injected)."""
import pytest
import torch

from nanomoe_ds import kernels
from nanomoe_ds.config import ConfigError
from nanomoe_ds.kernels import Load, Target

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
WIDTHS = (768, 3072)  # GPT-2 small: n_embd, expert_hidden
CUDA_CAPS = {"V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "L4": (8, 9), "H100": (9, 0), "B200": (10, 0)}
VERSIONS = [(2, 5), (2, 7), (2, 8), (2, 9), (2, 11), (2, 13)]


def cuda(card, dtype, version=(2, 13)):
    return Target("cuda", dtype, CUDA_CAPS[card], version)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("card", list(CUDA_CAPS))
def test_auto_never_picks_a_kernel_that_cannot_run(card, dtype, version):
    target = cuda(card, dtype, version)
    impl = kernels.choose("auto", target, WIDTHS)
    kernels.check(impl, target, WIDTHS)  # whatever auto picks passes the refusal check
    if impl == "grouped_mm":  # and only on the fused path: no host sync, no fallback
        assert kernels.grouped_mm_fused(target, WIDTHS)


@pytest.mark.parametrize("card, dtype, version, want", [
    ("H100", BF16, (2, 8), "grouped_mm"),  # the fused Hopper kernel
    ("B200", BF16, (2, 13), "grouped_mm"),
    ("H100", BF16, (2, 7), "bmm"),  # torch._grouped_mm does not exist yet
    ("H100", FP32, (2, 13), "bmm"),  # fp32 would take the per-group fallback with a host sync
    ("H100", FP16, (2, 13), "bmm"),
    ("A100", BF16, (2, 13), "bmm"),  # SM80: fallback only
    ("V100", FP16, (2, 13), "bmm"),  # ds_configs/fp16.json's GPUs: no grouped GEMM at all
    ("T4", FP16, (2, 5), "bmm"),
])
def test_auto_on_gpus(card, dtype, version, want):
    assert kernels.choose("auto", cuda(card, dtype, version), WIDTHS) == want


def test_auto_on_hopper_needs_aligned_widths():
    assert kernels.choose("auto", cuda("H100", BF16), (770, 3072)) == "bmm"  # 770 * 2 bytes is not a multiple of 16


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("version", VERSIONS)
def test_auto_on_cpu_and_mps_is_a_plain_matmul_kernel(dtype, version):
    cpu = Target("cpu", dtype, None, version)
    assert kernels.choose("auto", cpu, WIDTHS) == "loop"  # rows unknown
    assert kernels.choose("auto", cpu, WIDTHS, Load(16384, 2100, 8)) == "loop"  # 2048 rows per expert
    assert kernels.choose("auto", cpu, WIDTHS, Load(1536, 230, 8)) == "bmm"  # 192 rows per expert
    assert kernels.choose("auto", Target("mps", dtype, None, version), WIDTHS) == "bmm"


@pytest.mark.parametrize("load, want", [
    (Load(1536, 192, 8), "bmm"),  # few rows, perfectly balanced
    (Load(8 * 319, 400, 8), "bmm"),  # just under the rows rule, 1.25x padding
    (Load(8 * 320, 400, 8), "loop"),  # at the rows rule
    (Load(1536, 288, 8), "bmm"),  # padding exactly 1.5x the rows
    (Load(1536, 289, 8), "loop"),  # more than 1.5x: the busiest expert would make bmm pad too much
    (Load(1536, 1536, 8), "loop"),  # every row to one expert: bmm would compute 8x the rows
    (Load(65536, 1100, 64), "loop"),  # 1024 rows per expert (the fine-grained benchmark shape)
])
def test_cpu_size_rule(load, want):
    assert kernels.choose("auto", Target("cpu", FP32, None, (2, 13)), WIDTHS, load) == want


def test_the_cpu_rule_never_reaches_a_gpu():
    """Rows never change a GPU's pick (reading them there would be a device-to-host sync)."""
    for load in (Load(1536, 192, 8), Load(65536, 1100, 64)):
        assert kernels.choose("auto", cuda("A100", BF16), WIDTHS, load) == "bmm"
        assert kernels.choose("auto", cuda("H100", BF16), WIDTHS, load) == "grouped_mm"


def test_forced_kernels_are_kept():
    for impl in kernels.IMPLS:
        assert kernels.choose(impl, cuda("H100", BF16), WIDTHS) == impl


@pytest.mark.parametrize("target, widths", [
    (cuda("H100", BF16, (2, 7)), WIDTHS),  # absent before 2.8
    (cuda("A100", BF16, (2, 8)), WIDTHS),  # 2.8 has only the Hopper kernel
    (cuda("V100", FP16), WIDTHS),  # below SM80: no fallback either
    (Target("cpu", FP32, None, (2, 8)), WIDTHS),  # no CPU kernel in 2.8
    (Target("cpu", FP32, None, (2, 13)), (6, 8)),  # 24-byte rows: unaligned
    (Target("mps", BF16, None, (2, 13)), WIDTHS),
])
def test_forced_grouped_mm_refused_where_it_cannot_run(target, widths):
    with pytest.raises(ConfigError, match="^moe_impl=grouped_mm cannot run on .*; use moe_impl=auto"):
        kernels.check("grouped_mm", target, widths)


@pytest.mark.parametrize("target", [cuda("A100", FP32, (2, 9)), cuda("H100", FP16), Target("cpu", BF16, None, (2, 9))])
def test_forced_grouped_mm_allowed_on_its_fallback(target):
    kernels.check("grouped_mm", target, WIDTHS)
    assert not kernels.grouped_mm_fused(target, WIDTHS)


def test_plain_kernels_run_everywhere():
    for target in (cuda("V100", FP16, (2, 5)), Target("cpu", FP32, None, (2, 5)), Target("mps", FP16, None, (2, 5))):
        for impl in ("bmm", "loop"):
            kernels.check(impl, target, (6, 10))


def test_torch_version_parsing():
    assert kernels.torch_version("2.13.0+cpu") == (2, 13)
    assert kernels.torch_version("2.11.0a0+git1234") == (2, 11)
    assert kernels.torch_version() >= (2, 5)


def test_this_machine_agrees_with_the_policy():
    """On this machine's CPU, the real torch runs every kernel the policy allows."""
    target = kernels.target_of(torch.zeros(1), FP32)
    assert target.device_kind == "cpu" and target.capability is None
    if kernels.grouped_mm_runs(target, (16, 32)):
        out = torch._grouped_mm(torch.randn(8, 16), torch.randn(2, 16, 32), offs=torch.tensor([3, 8], dtype=torch.int32))
        assert out.shape == (8, 32)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_cuda_every_runnable_kernel_matches_loop(dtype):
    """On this GPU: auto's pick and every kernel the policy allows agree with the loop kernel, forward and backward."""
    from nanomoe_ds.moe import GroupedExperts
    d, h, E = 64, 128, 8
    x = torch.randn(1000, d, device="cuda")
    counts = torch.tensor([300, 0, 150, 50, 200, 100, 125, 75], device="cuda")
    target = kernels.target_of(x, dtype)
    results = {}
    for impl in ("auto",) + kernels.IMPLS:
        if not kernels.runs(impl, target, (d, h)):
            continue
        torch.manual_seed(0)
        ex = GroupedExperts(E, d, h, impl=impl).cuda()
        for p in ex.parameters():
            torch.nn.init.normal_(p, std=0.05)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != FP32):
            out = ex(xi, counts)
        out.float().square().sum().backward()
        results[impl] = (out.float(), xi.grad, ex.w_in.grad)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == FP32 else dict(atol=3e-2, rtol=3e-2)
    for impl, got in results.items():
        for a, b in zip(got, results["loop"]):
            torch.testing.assert_close(a, b, **tol, msg=impl)
    print(f"cuda {torch.cuda.get_device_name()} {dtype}: auto -> {kernels.choose('auto', target, (d, h))}; "
          f"ran {sorted(results)}")
