"""The one precision rule for both paths, tested with injected device answers (never this host's CPU flags)."""
import math

import pytest
import torch

from nanomoe_ds import checkpoint_dir, precision
from nanomoe_ds.config import ConfigError, from_argv
from nanomoe_ds.precision import Support
from nanomoe_ds.local_engine import resolve_device
from nanomoe_ds.trainer import train

from conftest import tiny_args

NO_FP16 = Support(bfloat16=True, float16=False)  # e.g. an AMD EPYC
FP16 = Support(bfloat16=True, float16=True)  # e.g. an Intel Xeon with AVX512-FP16 / AMX
OLD_GPU = Support(bfloat16=False, float16=True)  # e.g. a V100 or T4


@pytest.mark.parametrize("kind, support, want", [
    ("cpu", FP16, "float32"), ("cpu", NO_FP16, "float32"), ("mps", FP16, "float32"),
    ("cuda", FP16, "bfloat16"), ("cuda", OLD_GPU, "float16"),
])
def test_auto_dtype(kind, support, want):
    assert precision.default_dtype(kind, support) == want


def test_fp16_refused_in_one_line_where_the_cpu_lacks_it():
    with pytest.raises(ConfigError) as e:
        precision.check("float16", "cpu", NO_FP16)
    assert str(e.value) == ("--dtype asks for float16, but this CPU has no native float16 (it needs AVX512-FP16 "
                            "or AMX-FP16); use --dtype=bfloat16 or --dtype=float32")
    with pytest.raises(ConfigError, match="^the DeepSpeed JSON asks for float16, .*use a bf16 config such as "
                                          "ds_configs/zero2.json$"):
        precision.check("float16", "cpu", NO_FP16, source="the DeepSpeed JSON")


@pytest.mark.parametrize("name", precision.DTYPES)
def test_every_dtype_accepted_where_supported(name):
    assert precision.check(name, "cpu", FP16) == name


def test_bf16_refused_on_old_gpus():
    with pytest.raises(ConfigError, match="^--dtype asks for bfloat16, but this cuda device has no bfloat16; "
                                          "use --dtype=float16$"):
        precision.check("bfloat16", "cuda", OLD_GPU)


def test_supports_answers_for_this_machine_without_raising():
    # Whatever this CPU is, the answer is a pair of booleans and bf16 is always there.
    s = precision.supports("cpu")
    assert isinstance(s.float16, bool) and s.bfloat16 is True


def test_single_device_path_uses_the_rule(tmp_path):
    _, t = from_argv(["--device=cpu", "--dtype=float16", f"--out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="^--dtype asks for float16, but this CPU has no native float16"):
        resolve_device(t, NO_FP16)
    assert resolve_device(t, FP16) == ("cpu", torch.float16)


def test_fp16_trains_on_a_cpu_that_has_it(char_data, tmp_path, monkeypatch):
    """Where the capability says yes, --dtype=float16 trains: autocast fp16 with a GradScaler, finite losses.

    torch computes fp16 on any CPU (slowly where it is emulated), so forcing the
    answer makes this test hold on every machine.
    """
    monkeypatch.setattr(precision, "supports", lambda kind: FP16)
    m, t = from_argv(tiny_args(char_data, tmp_path, dtype="float16", max_iters=3, eval_interval=3))
    res = train(m, t)
    assert len(res["train_losses"]) == 4 and all(math.isfinite(x) for x in res["train_losses"])
    ck = checkpoint_dir.open_checkpoint(str(tmp_path)).meta
    assert ck["loss_scale"]["scale"] > 1  # the loss scaler was on
