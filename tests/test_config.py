"""Config parsing: presets, overrides, types, and one-line refusals."""
import json

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


def test_seed_keys_and_presets_load(tmp_path):
    m, t = from_argv([str(REPO / "launch/config/train_shakespeare_char_moe.py")])
    assert m.use_moe and m.num_experts == 8 and m.num_experts_per_tok == 2
    assert t.out_dir == "out-shakespeare-char-moe" and t.dataset == "shakespeare_char"
    for p in (REPO / "launch/config").glob("*.py"):
        argv = [str(p)]
        if config.load_preset(str(p)).get("init_from", "").startswith("out-"):  # starts from a run of ours:
            (tmp_path / "run").mkdir(exist_ok=True)                             # stand one in
            (tmp_path / "run" / "iter_1").mkdir(exist_ok=True)
            (tmp_path / "run" / "iter_1" / "metadata.json").touch()
            argv.append(f"--init_from={tmp_path / 'run'}")
        from_argv(argv)  # every shipped preset is valid


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
    (["--init_from=gpt3"], "unknown init_from 'gpt3'; expected scratch, resume, auto, a GPT-2 name (gpt2, gpt2-medium"),
    (["--init_from=gpt2-foo"], "unknown init_from 'gpt2-foo'"),
    (["--activation=relu"], "unknown activation 'relu'; choose one of gelu, gelu_tanh"),
    (["--upcycle_noise=-0.1"], "upcycle_noise must be >= 0"),
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


@pytest.mark.parametrize("name", config.HF_GPT2_NAMES)
def test_every_listed_gpt2_name_is_accepted(name):
    assert config.init_source(name) == "hf"
    assert from_argv([f"--init_from={name}", "--use_moe=True"])[1].init_from == name


def write_hf_dir(path, model_type="gpt2", weights=True):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if weights:
        (path / "model.safetensors").touch()
    return str(path)


@pytest.mark.parametrize("make, msg", [
    (lambda d: write_hf_dir(d, "bert"), "holds a Hugging Face 'bert' model; only GPT-2 (model_type gpt2) can be loaded"),
    (lambda d: write_hf_dir(d, weights=False), "has a GPT-2 config.json but no weights"),
    (lambda d: d.mkdir() or str(d), "is a directory with neither a run of ours (iter_N/metadata.json) nor a Hugging Face GPT-2"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("[1]"))[0] or str(d), "config.json' is not a readable JSON"),
])
def test_local_directories_are_checked_before_loading(tmp_path, make, msg):
    path = make(tmp_path / "src")
    with pytest.raises(ConfigError) as e:
        from_argv([f"--init_from={path}"])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_local_sources_are_recognised(tmp_path):
    assert config.init_source(write_hf_dir(tmp_path / "hf")) == "hf"
    (tmp_path / "run" / "iter_1.partial").mkdir(parents=True)  # a save in progress: not a checkpoint yet
    (tmp_path / "run" / "iter_1.partial" / "metadata.json").touch()
    with pytest.raises(ConfigError, match="neither a run of ours"):
        config.init_source(str(tmp_path / "run"))
    (tmp_path / "run" / "ckpt.pt").touch()  # an older version's single-file checkpoint
    assert config.init_source(str(tmp_path / "run")) == "run"
    (tmp_path / "run" / "ckpt.pt").unlink()
    (tmp_path / "run" / "iter_3").mkdir()
    (tmp_path / "run" / "iter_3" / "metadata.json").touch()
    assert config.init_source(str(tmp_path / "run")) == "run"
    with pytest.raises(ConfigError, match="^init_from and out_dir are the same directory .* would overwrite its source"):
        from_argv([f"--init_from={tmp_path / 'run'}", f"--out_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("init_from, has_checkpoint, expected", [
    ("auto", True, "resume"), ("auto", False, "scratch"),  # the same command for a first start and a restart
    ("resume", False, "resume"), ("resume", True, "resume"), ("scratch", False, "scratch"),  # others as given
    ("gpt2", False, "gpt2"),
])
def test_init_from_auto_resumes_where_there_is_a_checkpoint(init_from, has_checkpoint, expected):
    assert config.resolve_init_from(init_from, has_checkpoint) == expected


@pytest.mark.parametrize("init_from", ["scratch", "gpt2", "/runs/dense"])
def test_a_new_start_over_a_run_is_refused(init_from):
    """Rerunning a finished run's command (scratch by default) would prune its checkpoints at the first save."""
    with pytest.raises(ConfigError, match=f"^out_dir 'o' already holds a run, which --init_from={init_from} would "
                                          "overwrite; continue it with --init_from=auto, or start over in another"):
        config.resolve_init_from(init_from, True, "o")
