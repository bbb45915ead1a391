"""The DeepSpeed JSON's reconciliation with the trainer's config, in-process: any world size, any device answer."""
import json
import re

import pytest

from conftest import REPO

from nanomoe_ds.config import ConfigError, from_argv
from nanomoe_ds.data import fit_accumulation
from nanomoe_ds.ds_config import activation_checkpointing, as_run, drop_idle_zero, fit_ep_size, reconcile
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
    """What each rank works out before training, for every shipped preset and the shipped JSONs (ds_configs/).
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


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_jsons_carry_the_fast_settings(name):
    """torch's AdamW (no JIT-built op), fused where the device has it: one kernel over ZeRO's flat partitions."""
    params = json.load(open(REPO / "ds_configs" / f"{name}.json"))["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] == "auto"
    model_cfg, train_cfg = from_argv(["--batch_size=4", "--gradient_accumulation_steps=2"])
    ds = reconcile(json.load(open(REPO / "ds_configs" / f"{name}.json")), model_cfg, train_cfg, 2, "cpu",
                   Support(bfloat16=True, float16=True))
    assert ds["optimizer"]["params"]["fused"] is True  # torch >= 2.4 fuses AdamW on CPUs and GPUs


def test_fused_left_as_the_json_says():
    model_cfg, train_cfg = from_argv(["--batch_size=4", "--gradient_accumulation_steps=2"])
    cfg = json.load(open(REPO / "ds_configs/zero1.json"))
    cfg["optimizer"]["params"]["fused"] = False
    ds = reconcile(cfg, model_cfg, train_cfg, 2, "cuda", Support(True, True))
    assert ds["optimizer"]["params"]["fused"] is False
    del cfg["optimizer"]["params"]["fused"]  # a user's JSON without the key gets the fused kernel too
    assert reconcile(cfg, model_cfg, train_cfg, 2, "cuda", Support(True, True))["optimizer"]["params"]["fused"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_on_one_rank_runs_as_stage0(stage):
    ds = {"zero_optimization": {"stage": stage, "contiguous_gradients": True}, "train_batch_size": 4}
    one, note = drop_idle_zero(ds, data_parallel_size=1)
    assert one == {"zero_optimization": {"stage": 0}, "train_batch_size": 4}
    assert note == (f"note: ZeRO-{stage} on 1 rank partitions nothing; running ZeRO-0, which computes the same "
                    f"update without ZeRO-{stage}'s per-step copies")
    assert ds["zero_optimization"]["stage"] == stage  # the caller's dict is not changed
    assert drop_idle_zero(ds, data_parallel_size=2) == (ds, None)  # two ranks: ZeRO partitions


@pytest.mark.parametrize("asked", [True, False])
def test_the_run_config_drops_idle_zero_only_when_asked(asked):
    """as_run, the one path of the trainer and the planner: reconcile, then ZeRO-0 on one fp32 rank if asked."""
    cfg = {**json.load(open(REPO / "ds_configs/zero2.json")), "bf16": {"enabled": False}}
    model_cfg, train_cfg = from_argv(["--batch_size=4", f"--zero_single_rank_as_stage0={asked}"])
    ran, note = as_run(cfg, model_cfg, train_cfg, 1, "cpu", Support(True, False))
    assert ran == (drop_idle_zero(reconcile(cfg, model_cfg, train_cfg, 1, "cpu", Support(True, False)), 1)[0]
                   if asked else reconcile(cfg, model_cfg, train_cfg, 1, "cpu", Support(True, False)))
    assert ran["zero_optimization"]["stage"] == (0 if asked else 2) and (note is not None) == asked


def test_zero_stage_kept_with_offload_in_bf16_or_at_stage0():
    offload = {**json.load(open(REPO / "ds_configs/zero2_offload.json")), "bf16": {"enabled": False}}
    assert drop_idle_zero(offload, 1) == (offload, None)  # offloading is a memory choice, not a partition
    zero0 = json.load(open(REPO / "ds_configs/zero0.json"))
    assert drop_idle_zero(zero0, 1) == (zero0, None)
    # bf16 (as shipped) keeps ZeRO-1/2: DeepSpeed's ZeRO-0 bf16 wrapper has rules of its own
    # (e.g. it refuses "data_types": {"grad_accum_dtype": "fp32"}, which ZeRO-1/2 accept)
    bf16 = json.load(open(REPO / "ds_configs/zero2.json"))
    assert bf16["bf16"]["enabled"] and drop_idle_zero(bf16, 1) == (bf16, None)


def test_activation_checkpointing_from_the_flag_or_the_json_block():
    model_cfg, train_cfg = from_argv(["--n_layer=4"])
    assert activation_checkpointing({}, model_cfg, train_cfg) is False
    assert activation_checkpointing({"activation_checkpointing": {}}, model_cfg, train_cfg) is True
    block = {"partition_activations": False, "cpu_checkpointing": False, "number_checkpoints": 4}
    assert activation_checkpointing({"activation_checkpointing": block}, model_cfg, train_cfg) is True
    train_cfg.activation_checkpointing = True
    assert activation_checkpointing({}, model_cfg, train_cfg) is True


@pytest.mark.parametrize("block, msg", [
    ({"partition_activations": True}, "the DeepSpeed JSON's \"activation_checkpointing\" sets partition_activations, "
                                      "which this trainer does not implement (it recomputes every block with "
                                      "torch.utils.checkpoint); set partition_activations to false, or remove the "
                                      "block and use --activation_checkpointing=True"),
    ({"cpu_checkpointing": True}, "the DeepSpeed JSON's \"activation_checkpointing\" sets cpu_checkpointing"),
    ({"number_checkpoints": 2}, "the DeepSpeed JSON's activation_checkpointing.number_checkpoints=2, but this trainer "
                                "checkpoints every block (n_layer=4); remove number_checkpoints"),
])
def test_activation_checkpointing_options_not_honoured_are_refused(block, msg):
    model_cfg, train_cfg = from_argv(["--n_layer=4"])
    with pytest.raises(ConfigError, match="^" + re.escape(msg)):
        activation_checkpointing({"activation_checkpointing": block}, model_cfg, train_cfg)


def test_fp16_keeps_its_stage_on_one_rank_and_zero0_fp16_moe_is_refused():
    fp16 = reconcile_fp16_json(Support(True, True))  # ZeRO-1: its loss scaling stays in ZeRO's optimizer
    assert drop_idle_zero(fp16, 1) == (fp16, None)
    with pytest.raises(ConfigError, match=r"^fp16 with ZeRO-0 and use_moe=True is not supported: the exact MoE "
                                          r"gradient clip on ZeRO-0 would see loss-scaled gradients"):
        cfg = json.load(open(REPO / "ds_configs/fp16.json"))
        cfg["zero_optimization"] = {"stage": 0}
        model_cfg, train_cfg = from_argv(["--batch_size=4", "--gradient_accumulation_steps=2", "--use_moe=True"])
        reconcile(cfg, model_cfg, train_cfg, 2, "cpu", Support(True, True))


@pytest.mark.parametrize("requested, world, experts, expected", [
    (2, 2, 8, 2), (2, 4, 8, 2), (8, 8, 8, 8),  # divides the ranks: as asked
    (2, 1, 8, 1),  # one node of two lost: expert parallelism off
    (4, 2, 8, 2), (4, 6, 8, 2),  # the largest that divides both the ranks and the experts
    (6, 3, 6, 3), (6, 4, 6, 2),
])
def test_ep_size_fits_the_ranks_there_are(requested, world, experts, expected):
    fitted, note = fit_ep_size(requested, world, experts)
    assert fitted == expected
    assert world % fitted == 0 and experts % fitted == 0
    if fitted == requested:
        assert note is None
    else:
        assert note == (f"note: ep_size {requested} does not divide the {world} ranks; running ep_size {expected} "
                        f"(ep_size {requested} returns when the ranks allow it)")


@pytest.mark.parametrize("zero, message", [
    ({"offload_optimizer": {"device": "nvme"}}, "ZeRO-3 with offload_optimizer to NVMe is not supported"),
    ({"offload_param": {"device": "nvme"}}, "ZeRO-3 with offload_param to NVMe is not supported"),
    ({"offload_optimizer": {"device": "cpu", "ratio": 0.5}}, "ZeRO-3 with a partial offload_optimizer \"ratio\""),
    ({"mics_shard_size": 2}, "ZeRO-3 with MiCS (mics_shard_size) is not supported"),
])
def test_zero3_layouts_the_checkpoints_cannot_map_are_refused(zero, message):
    model_cfg, train_cfg = from_argv(["--use_moe=False", "--deepspeed_config=x.json"])
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        reconcile({"zero_optimization": {"stage": 3, **zero}}, model_cfg, train_cfg, 2, "cuda", Support(True, True))
    offloaded = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
    assert reconcile({"zero_optimization": offloaded}, model_cfg, train_cfg, 2, "cuda", Support(True, True))


def test_zero3_is_refused_with_moe_before_training():
    """DeepSpeed's ZeRO-3 does not partition native MoE layers; dense models train under it (test_checkpoint)."""
    model_cfg, train_cfg = from_argv(["--use_moe=True", "--deepspeed_config=x.json"])
    with pytest.raises(ConfigError, match="^ZeRO-3 does not support native MoE layers in DeepSpeed; use ZeRO-1 or ZeRO-2"):
        reconcile({"zero_optimization": {"stage": 3}}, model_cfg, train_cfg, 2, "cuda", Support(True, True))
    dense_cfg, dense_train_cfg = from_argv(["--use_moe=False", "--deepspeed_config=x.json"])
    ds = reconcile({"zero_optimization": {"stage": 3}}, dense_cfg, dense_train_cfg, 2, "cuda", Support(True, True))
    assert ds["zero_optimization"]["stage"] == 3
