"""Config parsing: presets, overrides, types, and one-line refusals."""
import pytest

from nanomoe_ds import config
from nanomoe_ds.config import ConfigError, from_argv

from conftest import REPO


def test_preset_then_overrides_in_order(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("n_layer = 3\nlearning_rate = 1e-3\nuse_moe = True\n")
    m, t = from_argv([str(preset), "--n_layer=5", "--device=cpu", "--compile=False", "--num_experts", "6"])
    assert (m.n_layer, m.use_moe, m.num_experts, t.learning_rate, t.device, t.compile) == (5, True, 6, 1e-3, "cpu", False)
    assert m.expert_hidden == 4 * m.n_embd


def test_seed_keys_and_presets_load():
    m, t = from_argv([str(REPO / "launch/config/train_shakespeare_char_moe.py")])
    assert m.use_moe and m.num_experts == 8 and m.num_experts_per_tok == 2
    assert t.out_dir == "out-shakespeare-char-moe" and t.dataset == "shakespeare_char"
    for p in (REPO / "launch/config").glob("*.py"):
        from_argv([str(p)])  # every shipped preset is valid


def test_int_is_accepted_for_float_but_not_the_reverse():
    m, t = from_argv(["--learning_rate=1", "--capacity_factor=2"])
    assert t.learning_rate == 1.0 and isinstance(m.capacity_factor, float)
    with pytest.raises(ConfigError, match="expected int"):
        from_argv(["--n_layer=2.5"])


@pytest.mark.parametrize("argv, msg", [
    (["--n_layers=4"], "unknown config key 'n_layers'; did you mean n_layer"),
    (["--lerning_rate=1e-3"], "did you mean learning_rate"),
    (["--compile=maybe"], "cannot parse 'maybe' as bool"),
    (["--n_layer=four"], "cannot parse 'four' as int"),
    (["--batch_size=True"], "expected int, got bool"),
    (["--use_moe=True", "--num_experts=4", "--num_experts_per_tok=5"], "num_experts_per_tok must be between 1 and num_experts (4), got 5"),
    (["--use_moe=True", "--num_experts_per_tok=0"], "num_experts_per_tok must be between 1"),
    (["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    (["--use_moe=True", "--capacity_factor=-1"], "capacity_factor must be >= 0"),
    (["--use_moe=True", "--gate=softmax"], "unknown gate 'softmax'"),
    (["--use_moe=True", "--expert_hidden=-4"], "expert_hidden must be a positive integer"),
    (["--dtype=fp8"], "unknown dtype 'fp8'"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--init_from=gpt3"], "unknown init_from 'gpt3'"),
    (["missing_preset.py"], "cannot read preset file 'missing_preset.py'"),
    (["--max_iters"], "--max_iters needs a value"),
])
def test_refusals_are_one_line(argv, msg):
    with pytest.raises(ConfigError) as e:
        from_argv(argv)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_preset_with_unknown_key(tmp_path):
    preset = tmp_path / "p.py"
    preset.write_text("num_expert = 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'num_expert'; did you mean num_experts"):
        from_argv([str(preset)])


def test_deepspeed_launcher_args_are_accepted():
    # deepspeed passes --local_rank=N, and users type "--deepspeed_config path" with a space
    m, t = from_argv(["--local_rank=0", "--deepspeed_config", "ds_configs/zero2.json", "--ep_size=2", "--use_moe=True"])
    assert (t.local_rank, t.deepspeed_config, t.ep_size) == (0, "ds_configs/zero2.json", 2)


def test_keys_are_unique_across_configs():
    assert not config.MODEL_KEYS & config.TRAIN_KEYS
