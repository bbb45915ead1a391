"""The DeepSpeed JSON's reconciliation with the trainer's config, in-process: any world size, any device answer."""
import json
import re

import pytest

from conftest import REPO

from nanomoe_ds.config import ConfigError, from_argv
from nanomoe_ds.data import fit_accumulation
from nanomoe_ds.ds_config import reconcile
from nanomoe_ds.precision import Support


def reconcile_fp16_json(support, **json_over):
    cfg = json.load(open(REPO / "ds_configs/fp16.json"))
    cfg.update(json_over)
    m, t = from_argv(["--batch_size=4", "--gradient_accumulation_steps=2"])
    return reconcile(cfg, m, t, world_size=2, device_kind="cpu", support=support)


def test_fp16_json_refused_where_the_device_lacks_fp16():
    with pytest.raises(ConfigError, match=r"^the DeepSpeed JSON asks for float16, but this CPU has no native float16 "
                                          r"\(it needs AVX512-FP16 or AMX-FP16\); use a bf16 config"):
        reconcile_fp16_json(Support(bfloat16=True, float16=False))


def test_fp16_json_accepted_where_the_device_has_fp16():
    ds = reconcile_fp16_json(Support(bfloat16=True, float16=True))
    assert ds["fp16"]["enabled"] is True and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1  # 2 global micro-batches over 2 ranks


def test_both_precisions_refused_on_every_device():
    for support in (Support(True, True), Support(True, False), Support(False, True)):
        with pytest.raises(ConfigError, match="^the DeepSpeed JSON enables both bf16 and fp16"):
            reconcile_fp16_json(support, bf16={"enabled": True})


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "launch/config").glob("*.py")))
def test_every_preset_reconciles_at_any_world_size(preset, world):
    """What each rank works out before training, for every shipped preset and the README's JSONs.
    (init_from is not part of it; the upcycling presets' source run need not exist here.)"""
    model_cfg, train_cfg = from_argv([str(REPO / "launch/config" / preset), "--init_from=scratch"])
    train_cfg.gradient_accumulation_steps, _ = fit_accumulation(train_cfg.gradient_accumulation_steps, world,
                                                                train_cfg.batch_size)
    for name in ("zero1", "zero2"):
        ds = reconcile(json.load(open(REPO / "ds_configs" / f"{name}.json")), model_cfg, train_cfg, world, "cuda",
                       Support(bfloat16=True, float16=True))
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world


@pytest.mark.parametrize("block, ours", [("wandb", "--wandb_log=True"), ("tensorboard", "--tensorboard_dir=DIR"),
                                         ("csv_monitor", "out_dir/metrics.jsonl")])
def test_monitor_blocks_refused_not_ignored(block, ours):
    with pytest.raises(ConfigError, match=f'^the DeepSpeed JSON\'s "{block}" block is not used by this trainer; '
                                          f'remove it and use {re.escape(ours)}'):
        reconcile_fp16_json(Support(True, True), fp16={"enabled": False}, **{block: {"enabled": True}})
    reconcile_fp16_json(Support(True, True), fp16={"enabled": False}, **{block: {"enabled": False}})  # a no-op block
