"""launch/export.py --format=hf (nanomoe_ds/hf_export.py) and the model it writes (nanomoe_ds/modeling_nanomoe.py):
transformers loads it and computes our logits; greedy generation is sample.py's at temperature 0; a checkpoint
saved by 2 expert-parallel ranks exports what one device's does; refusals come before anything is written;
the export streams."""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_args
from dist_utils import ds_json, run_ranks

from nanomoe_ds import checkpoint, hf_export, train_state
from nanomoe_ds.checkpoint_dir import open_checkpoint, save
from nanomoe_ds.config import ConfigError, GPTConfig, TrainConfig, from_argv
from nanomoe_ds.model import GPT
from nanomoe_ds.start import model_from_checkpoint
from nanomoe_ds.trainer import train


# ---------------------------------------------------------------- helpers
def save_tensors(out_dir: Path, meta: dict, tensors: dict):
    """A committed one-shard checkpoint in out_dir holding `tensors` (key -> tensor) with `meta`'s small state."""
    meta = {**meta, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    save(str(out_dir), meta, [(k, 0, v.detach().reshape(-1)) for k, v in tensors.items()], rank=0, keep_last=1)


def save_model(model: GPT, out_dir: Path, **train_over) -> Path:
    """The checkpoint the single-device trainer would write of `model` (no AdamW state), at iteration 3."""
    train_cfg = TrainConfig(out_dir=str(out_dir), data_dir=str(out_dir / "no-data"), **train_over)
    meta = {**train_state.TrainState(iter_num=3).record(model.config, train_cfg), "optimizer_step": 0,
            "topology": train_state.topology("local", 1, 1, None, "float32"), "loss_scale": None}
    named = [*model.named_parameters(), *train_state.state_buffers(model)]
    save_tensors(out_dir, meta, {checkpoint.tensor_key("model", n): v for n, v in named})
    return out_dir


def load_hf(directory: Path):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True,
                                                       output_loading_info=True)
    assert not any(info.values()), info  # every weight loaded, none left over
    return model.eval()


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def safetensors_header(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


# ---------------------------------------------------------------- our logits, at every shape a user can reach
def random_config(seed: int) -> tuple[GPTConfig, int]:
    """A small random model (every 4th dense) covering the gates, expert kinds, shared experts, moe_every, biases,
    both GELUs and capacity at eval; and a shard limit that cuts some exports into several files."""
    rng = random.Random(seed)
    n_head = rng.choice([1, 2, 4])
    cfg = GPTConfig(block_size=rng.choice([8, 16]), vocab_size=rng.choice([11, 64, 97]), n_layer=rng.choice([1, 2, 3]),
                    n_head=n_head, n_embd=8 * n_head, bias=rng.random() < 0.6,
                    activation=("gelu", "gelu_tanh")[seed // 4 % 2], use_moe=seed % 4 != 3,
                    num_experts=rng.choice([2, 4, 5]), moe_every=rng.choice([1, 1, 2]),
                    num_shared_experts=rng.choice([0, 0, 1, 2]), expert_hidden=rng.choice([0, 12, 40]),
                    expert_act=rng.choice(["gelu", "swiglu"]), gate=("softmax_topk", "topk_softmax", "sigmoid")[seed % 3],
                    capacity_factor=rng.choice([0.0, 1.0]), eval_capacity_factor=rng.choice([-1.0, 0.0, 0.5, 1.25]),
                    capacity_priority=rng.choice(["score", "position"]), router_jitter=0.1, aux_loss_coef=0.02)
    cfg.num_experts_per_tok = rng.randint(1, cfg.num_experts)
    return cfg, rng.choice([10**9, 3000])


@pytest.mark.parametrize("seed", range(12))
def test_transformers_computes_our_logits_and_greedy_tokens(seed, tmp_path):
    """Exported and loaded by transformers (an MoE through its modeling file, a dense model as a stock
    GPT2LMHeadModel): the same logits to 1e-5 in fp32, and the same greedy continuation."""
    from transformers import GPT2LMHeadModel
    cfg, max_shard_bytes = random_config(seed)
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger than the init, so routing and capacity drops vary from token to token
        for p in model.parameters():
            p.normal_(0, 0.3)
        for layer in model.moe_layers():
            layer.router.score_bias.normal_(0, 0.1)
    print(hf_export.export_hf(open_checkpoint(str(save_model(model, tmp_path / "run"))), str(tmp_path / "hf"),
                              None, max_shard_bytes=max_shard_bytes))
    hf = load_hf(tmp_path / "hf")
    assert isinstance(hf, GPT2LMHeadModel) == (not cfg.use_moe)
    assert (tmp_path / "hf/modeling_nanomoe.py").exists() == cfg.use_moe  # a dense export needs no code
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], rtol=1e-5, atol=1e-5)
        prompt = idx[:, :3]
        # An MoE goes past block_size, cropping the context as our sampler does; a stock GPT-2 stops there.
        new_tokens = cfg.block_size if cfg.use_moe else cfg.block_size - 3
        ours = model.generate(prompt, new_tokens, temperature=0)
        theirs = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(theirs, ours)
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    if len(shards) > 1:  # transformers' index: every tensor, in the file that holds it, and their bytes
        index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
        headers = {p.name: safetensors_header(p.read_bytes()) for p in shards}
        assert {name: file for file, h in headers.items() for name in h if name != "__metadata__"} == index["weight_map"]
        assert index["metadata"]["total_size"] == sum(v["data_offsets"][1] - v["data_offsets"][0] for h in
                                                      headers.values() for k, v in h.items() if k != "__metadata__")

def test_model_keys_are_every_key_the_trainer_has():
    """A new GPTConfig key must be implemented by the modeling file or declared training-only: else the export
    would drop it without a word."""
    assert set(hf_export.model_keys()) | set(hf_export.TRAINING_ONLY_KEYS) == set(GPTConfig.__dataclass_fields__)
    assert not set(hf_export.model_keys()) & set(hf_export.TRAINING_ONLY_KEYS)


def test_bfloat16_export_holds_our_weights_rounded(tmp_path):
    from safetensors.torch import load_file
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, use_moe=True, num_experts=2))
    hf_export.export_hf(open_checkpoint(str(save_model(model, tmp_path / "run"))), str(tmp_path / "hf"), None,
                        dtype="bfloat16")
    written = load_file(tmp_path / "hf/model.safetensors")
    assert all(torch.equal(written[n], p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())
    assert json.loads((tmp_path / "hf/config.json").read_text())["dtype"] == "bfloat16"


def test_gpt2_bpe_files_at_hand_travel_with_the_export(tmp_path):
    """A run in GPT-2 tokens (no meta.pkl) gets GPT-2's BPE files from its init_from directory (here a tiny
    stand-in: two letters and one merge), and AutoTokenizer loads them; a small vocabulary without its meta.pkl
    gets no tokenizer, and the line says why."""
    from transformers import AutoTokenizer
    bpe = tmp_path / "gpt2"
    bpe.mkdir()
    (bpe / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    (bpe / "merges.txt").write_text("#version: 0.2\na b\n")
    model = GPT(GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=1, n_embd=8))
    line = hf_export.export_hf(open_checkpoint(str(save_model(model, tmp_path / "run", init_from=str(bpe)))),
                               str(tmp_path / "hf"), None)
    assert "GPT-2's BPE tokenizer" in line
    assert all((tmp_path / "hf" / name).read_bytes() == (bpe / name).read_bytes() for name in ("vocab.json", "merges.txt"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf"))("abab").input_ids == [2, 2]
    assert json.loads((tmp_path / "hf/config.json").read_text())["eos_token_id"] == 50256
    small = GPT(GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=8))
    line = hf_export.export_hf(open_checkpoint(str(save_model(small, tmp_path / "small"))), str(tmp_path / "hf2"), None)
    assert "no tokenizer: the run's" in line and "vocab_size 100 is not GPT-2's" in line
    assert not list((tmp_path / "hf2").glob("*token*")) and not list((tmp_path / "hf2").glob("vocab*"))


# ---------------------------------------------------------------- refusals, before anything is written
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=1, n_embd=8, use_moe=True, num_experts=2))
    return save_model(model, tmp_path / "run")


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta["model_args"].update(rope_theta=1e4),
     "the checkpoint's model key rope_theta=10000.0 is not implemented by the exported model (modeling_nanomoe.py)"),
    (lambda meta: meta["model_args"].update(gate="expert_choice"),
     "the checkpoint's gate='expert_choice' is not implemented by the exported model (modeling_nanomoe.py implements "
     "softmax_topk, topk_softmax, sigmoid)"),
    (lambda meta: meta["model_args"].update(n_embd=16, n_head=2),
     "model/transformer.wte.weight has shape [16, 8], but its model_args make it [16, 16]"),
    (lambda meta: meta["tensors"].pop("model/transformer.h.1.mlp.router.score_bias"),
     "model/transformer.h.1.mlp.router.score_bias is missing, but its model_args make it [2]"),
])
def test_what_the_export_cannot_carry_is_refused_in_one_line_before_writing(tmp_path, change, message):
    ckpt = open_checkpoint(str(tiny_checkpoint(tmp_path)))
    change(ckpt.meta)
    with pytest.raises(ConfigError) as refused:
        hf_export.export_hf(ckpt, str(tmp_path / "hf"), None)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hf, no hf.partial


def test_an_export_never_overwrites_and_a_killed_one_leaves_no_directory(tmp_path):
    ckpt = open_checkpoint(str(tiny_checkpoint(tmp_path)))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        hf_export.export_hf(ckpt, str(tmp_path / "hf"), None)
    assert files_of(tmp_path / "hf") == {"keep.txt": b"mine"}
    (tmp_path / "empty").mkdir()  # an empty directory is taken, as save_pretrained would
    hf_export.export_hf(ckpt, str(tmp_path / "empty"), None)
    (ckpt.directory / "shard_00000.bin").write_bytes(b"")  # the records are gone: the export fails as it reads
    with pytest.raises(checkpoint.CheckpointError):
        hf_export.export_hf(ckpt, str(tmp_path / "late"), None)
    assert not (tmp_path / "late").exists() and not (tmp_path / "late.partial").exists()


# ---------------------------------------------------------------- streaming: memory is a chunk, not the model
def peak_added_bytes(fn) -> int:
    """The resident set's peak during fn() above the resident set before it (the kernel's VmHWM, reset first,
    as bench/bench_ckpt.py measures)."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident set (Linux >= 4.0)

    def status(field_name: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":"))
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def test_the_export_holds_a_chunk_at_a_time_not_a_tensor(tmp_path, monkeypatch):
    """A 33 MiB MoE whose largest tensor is 16 MiB, saved in 1 MiB records and exported in 1 MiB chunks: the
    export adds a few MiB at its peak, less than one tensor and far less than the model."""
    monkeypatch.setattr(checkpoint, "RECORD_BYTES", 1 << 20)  # the reader holds one record of the checkpoint
    cfg = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=4, n_embd=256, use_moe=True, num_experts=8,
                    expert_hidden=2048)
    out = save_model(GPT(cfg), tmp_path / "run")
    ckpt = open_checkpoint(str(out))
    largest = max(torch.Size(s).numel() for s in ckpt.meta["tensors"].values()) * 4
    total = sum(torch.Size(s).numel() for s in ckpt.meta["tensors"].values()) * 4
    added = peak_added_bytes(lambda: hf_export.export_hf(ckpt, str(tmp_path / "hf"), None, chunk_elems=1 << 18))
    print(f"model {total / 2**20:.1f} MiB, largest tensor {largest / 2**20:.1f} MiB, export added {added / 2**20:.1f} MiB")
    assert largest == 16 << 20 and total > 2 * largest
    assert added < largest / 2  # a record (1 MiB), a chunk or two (1 MiB each) and the allocator's slack


# ---------------------------------------------------------------- a real run: GPT-2 -> upcycle -> train -> export
def tiny_gpt2(directory: Path) -> Path:
    """A Hugging Face GPT-2 directory as save_pretrained writes it, sized for shakespeare_char."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=None,
                               eos_token_id=None, activation_function="gelu_new")).save_pretrained(directory)
    return directory


def train_here(args: list[str]):
    """launch/train.py's run in this process, on one thread as the rank subprocesses (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(*from_argv(args))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> dict[str, Path]:
    """GPT-2 upcycled to a top-2-of-4 MoE and trained 3 steps on shakespeare_char: on one device, and on 2 gloo
    ranks under DeepSpeed ZeRO-2 with ep_size=2 (one spawned world for the module)."""
    base = tmp_path_factory.mktemp("runs")
    args = dict(init_from=str(tiny_gpt2(base / "gpt2")), max_iters=3, eval_interval=3, bias_update_rate=0.01)
    train_here(tiny_args(char_data, base / "local", **args))
    for r in run_ranks(2, ["--deepspeed_config", ds_json(base, "zero2"), *tiny_args(char_data, base / "ep2", **args),
                           "--ep_size=2"]):
        assert r.returncode == 0, r.stderr[-3000:]
    return {"local": base / "local", "ep2": base / "ep2", "base": base}


def export_run(out_dir: Path, dest: Path) -> Path:
    hf_export.export_hf(open_checkpoint(str(out_dir)), str(dest), out_dir / "metrics.jsonl")
    return dest


def test_an_upcycled_gpt2_trained_here_loads_in_transformers_with_our_logits(runs, tmp_path):
    from transformers import AutoTokenizer
    ckpt = open_checkpoint(str(runs["local"]))
    ours = model_from_checkpoint(ckpt).eval()
    hf = load_hf(export_run(runs["local"], tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    texts = ["ROMEO:\nBut, soft! what light through yonder window breaks?", "JULIET:\nO Romeo, Romeo! wherefore art thou"]
    ids = tokenizer([text[:32] for text in texts], return_tensors="pt").input_ids  # a batch of 2 x block_size
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids, ids)[0], rtol=1e-5, atol=1e-5)
    card = (tmp_path / "hf/README.md").read_text()
    rows = [json.loads(line) for line in open(runs["local"] / "metrics.jsonl")]
    evaluation = [r for r in rows if "val_loss" in r and r["iter"] == 3][-1]
    assert f"| val loss (cross-entropy) | {evaluation['val_loss']:.4f} at iteration 3 |" in card
    assert f"| tokens seen | {evaluation['tokens']:,} |" in card and evaluation["tokens"] == 3 * 4 * 2 * 32
    load = [sum(r["moe"][0]["tokens_per_expert"][e] for r in rows if "loss" in r and r["iter"] < 3) for e in range(4)]
    shares = " ".join(f"{100 * n / sum(load):.1f}" for n in load)
    assert f"| 0 | {shares} |" in card  # block 0's load over the 3 logged steps


def run_sample(argv: list[str], capsys) -> str:
    """launch/sample.py's main in this process; what it printed."""
    spec = importlib.util.spec_from_file_location("sample_script", REPO / "launch/sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    script.main(argv)
    return capsys.readouterr().out


def test_greedy_generation_is_sample_py_at_temperature_zero(runs, tmp_path, capsys):
    """Prompt in, text out: the exported model and tokenizer through transformers' generate(do_sample=False),
    and launch/sample.py --temperature=0, continue a prompt with the same 40 characters (past block_size)."""
    from transformers import AutoTokenizer
    printed = run_sample([f"--out_dir={runs['local']}", "--device=cpu", "--start=ROMEO:", "--temperature=0",
                          "--num_samples=1", "--max_new_tokens=40"], capsys)
    text = printed.split("\n", 1)[1].rsplit("\n---------------", 1)[0]  # after "loading meta from ..."
    hf = load_hf(export_run(runs["local"], tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    assert tokenizer.decode(hf.generate(ids, max_new_tokens=40, do_sample=False)[0]) == text
    assert text.startswith("ROMEO:") and len(text) == 6 + 40


def test_two_expert_parallel_ranks_export_what_one_device_does(runs, tmp_path):
    """The checkpoint 2 ranks (ZeRO-2, ep_size=2) wrote, each its share, exports the bytes of one device's
    checkpoint of the same tensors; and the same 3 steps on one device export the same files, its weights
    within the 1e-5 of docs/equivalence.md (the two paths add their gradients in other orders)."""
    ckpt = open_checkpoint(str(runs["ep2"]))
    assert ckpt.meta["topology"]["ep_size"] == 2 and len(list(ckpt.directory.glob("shard_*.bin"))) == 2
    relaid = tmp_path / "relaid"
    save_tensors(relaid, ckpt.meta, {key: ckpt.whole(key) for key in ckpt.meta["tensors"]})
    shutil.copy(runs["ep2"] / "metrics.jsonl", relaid)
    assert len(list(open_checkpoint(str(relaid)).directory.glob("shard_*.bin"))) == 1
    ep2 = files_of(export_run(runs["ep2"], tmp_path / "a/hf"))
    assert files_of(export_run(relaid, tmp_path / "b/hf")) == ep2
    local = files_of(export_run(runs["local"], tmp_path / "c/hf"))
    assert sorted(local) == sorted(ep2)
    for name in set(local) - {"README.md", "model.safetensors"}:  # config, tokenizer, code
        assert local[name] == ep2[name], name
    from safetensors.torch import load
    assert safetensors_header(local["model.safetensors"]) == safetensors_header(ep2["model.safetensors"])
    a, b = load(local["model.safetensors"]), load(ep2["model.safetensors"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=name)


def test_init_from_an_exported_moe_continues_it(runs, char_data, tmp_path):
    """--init_from=<an exported MoE> starts a new run from its weights, exactly, with the run's own training-only
    keys, and trains."""
    from nanomoe_ds.start import build_model
    exported = export_run(runs["local"], tmp_path / "hf")
    args = tiny_args(char_data, tmp_path / "again", init_from=str(exported), max_iters=1, router_jitter=0.05,
                     num_experts=8)  # the source decides the shape: num_experts=8 is not taken
    model = build_model(*from_argv(args))
    ours = model_from_checkpoint(open_checkpoint(str(runs["local"])))
    assert model.config.num_experts == 4 and model.moe_layers()[0].router.jitter == 0.05
    assert model.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(value, ours.state_dict()[name]) for name, value in model.state_dict().items())
    train_here(args)
    trained = [json.loads(line) for line in open(tmp_path / "again/metrics.jsonl") if '"loss"' in line]
    assert [r["iter"] for r in trained] == [0, 1] and all(r["loss"] < 5 for r in trained)
