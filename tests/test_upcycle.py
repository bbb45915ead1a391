"""Sparse upcycling: the MoE's first forward equals the dense model's, on one device and under DeepSpeed EP=2."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import REPO, tiny_args
from dist_utils import ds_json, run_ranks

from nanomoe_ds import checkpoint_dir
from nanomoe_ds.start import load_source
from nanomoe_ds.config import GATES, ConfigError, GPTConfig, from_argv
from nanomoe_ds.model import GPT
from nanomoe_ds.trainer import train
from nanomoe_ds.upcycle import expert_spread, upcycle, upcycled_config

BASE = dict(block_size=16, vocab_size=50, n_layer=4, n_head=2, n_embd=16, dropout=0.0)


def dense_model(**kw) -> GPT:
    """A dense GPT with non-zero biases (the init's are zero), so copying them is tested too."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **kw}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def moe_cfg(**kw) -> GPTConfig:
    return GPTConfig(**{**BASE, "use_moe": True, "num_experts": 4, "num_experts_per_tok": 2, **kw})


VARIANTS = {
    "routed": {},
    "top1_of_8": dict(num_experts=8, num_experts_per_tok=1),
    "shared": dict(num_shared_experts=1),
    "wide_experts": dict(expert_hidden=96),  # dense hidden is 64
    "every_2nd_two_shared": dict(moe_every=2, num_shared_experts=2),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_step0_logits_equal_dense(gate, variant, activation):
    dense = dense_model(activation=activation)
    moe = upcycle(dense, moe_cfg(gate=gate, **VARIANTS[variant]))
    assert moe.config.activation == activation and len(moe.moe_layers()) > 0
    idx = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        ref, _ = dense(idx, idx)
        out, _ = moe.eval()(idx, idx)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        # training mode with router jitter routes differently; the output is still the dense one
        moe.train()
        for m in moe.moe_layers():
            m.router.jitter = 0.5
        out, _ = moe(idx, idx)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_bias_free_dense_model():
    dense = dense_model(bias=False)
    moe = upcycle(dense, moe_cfg(num_shared_experts=1, expert_hidden=80))
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(idx, idx)[0], dense(idx, idx)[0], rtol=0, atol=1e-5)


def test_experts_are_copies_routers_fresh_and_settings_honoured():
    dense = dense_model()
    moe = upcycle(dense, moe_cfg(num_experts=8, expert_hidden=96), router_std=0.5)
    fc = dense.transformer.h[1].mlp.c_fc
    ex = moe.transformer.h[1].mlp.experts
    for e in range(8):
        torch.testing.assert_close(ex.w_in[e, :, :64], fc.weight.t(), rtol=0, atol=0)
        torch.testing.assert_close(ex.b_in[e, :64], fc.bias, rtol=0, atol=0)
    assert ex.w_out[:, 64:].abs().max() == 0 and ex.w_in[:, :, 64:].abs().max() > 0  # extra units: fresh in, zero out
    router = moe.transformer.h[1].mlp.router.weight
    assert 0.4 < router.std() < 0.6  # N(0, router_std)
    # noise breaks the symmetry between copies, and (documented) the exact start
    noisy = upcycle(dense, moe_cfg(), noise=0.1)
    w = noisy.transformer.h[0].mlp.experts.w_in
    assert (w[0] - w[1]).abs().max() > 1e-3
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (noisy.eval()(idx, idx)[0] - dense(idx, idx)[0]).abs().max() > 1e-4


def test_expert_spread():
    assert expert_spread(upcycle(dense_model(), moe_cfg()).transformer.h[0].mlp.experts.w_in) == 0.0
    assert expert_spread(torch.eye(2)) == pytest.approx(2 ** 0.5)  # two orthogonal unit experts
    assert expert_spread(torch.tensor([[1.0], [3.0]])) == pytest.approx(2 / 2)  # distance 2, mean norm 2


def test_config_follows_the_source():
    dense_cfg = GPTConfig(**{**BASE, "activation": "gelu_tanh"})
    user = GPTConfig(n_embd=384, n_layer=6, n_head=6, use_moe=True, num_experts=8, gate="sigmoid")  # a preset's shape
    cfg = upcycled_config(dense_cfg, user)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.vocab_size) == (16, 4, 2, 16, 50)
    assert cfg.expert_hidden == 64 and cfg.activation == "gelu_tanh"  # the default width follows the source
    assert (cfg.num_experts, cfg.gate) == (8, "sigmoid")  # the MoE keys are the user's
    wide = upcycled_config(dense_cfg, dataclasses.replace(user, expert_hidden=128))
    assert wide.expert_hidden == 128


@pytest.mark.parametrize("kw, msg", [
    (dict(expert_hidden=32), "expert_hidden (32) is narrower than the dense MLP (64): a top-k router can't guarantee"),
    (dict(expert_act="swiglu"), "expert_act=swiglu experts have a gate the dense GPT-2 MLP lacks"),
    (dict(capacity_factor=1.25), "capacity_factor/eval_capacity_factor > 0 drop tokens"),
    (dict(eval_capacity_factor=2.0), "capacity_factor/eval_capacity_factor > 0 drop tokens"),
])
def test_refusals_are_one_line(kw, msg):
    with pytest.raises(ConfigError) as e:
        upcycle(dense_model(), moe_cfg(**kw))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^the source is already an MoE model"):
        upcycle(GPT(moe_cfg()), moe_cfg())


def test_hugging_face_gpt2_upcycles_to_its_logits(tmp_path):
    """A local HF GPT-2 (gelu_new), upcycled: the first forward is transformers' forward."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                    initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    dense = load_source(str(tmp_path), GPTConfig(dropout=0.0))
    moe = upcycle(dense, moe_cfg(gate="topk_softmax", num_shared_experts=1)).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(moe(idx, idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


# ------------------------------------------------ through the trainer: a dense run of ours as the source
def step0(out_dir) -> tuple[float, float, float]:
    """(train, val) loss of the step-0 eval and the first step's cross-entropy, from metrics.jsonl."""
    rows = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    ev = next(r for r in rows if r.get("iter") == 0 and "val_loss" in r)
    tr = next(r for r in rows if r.get("iter") == 0 and "ce_loss" in r)
    return ev["train_loss"], ev["val_loss"], tr["ce_loss"]


def continue_dense(char_data, src, out) -> tuple[float, float, float]:
    """The step-0 losses of continuing `src` dense on one device: what the upcycled run must start at."""
    train(*from_argv(tiny_args(char_data, out, init_from=str(src), use_moe=False, max_iters=1, eval_interval=1)))
    return step0(out)


@pytest.fixture(scope="module")
def dense_run(char_data, tmp_path_factory):
    """A dense run of ours (3 steps, GPT-2's tanh GELU), and its step-0 losses."""
    root = tmp_path_factory.mktemp("dense")
    train(*from_argv(tiny_args(char_data, root / "src", use_moe=False, max_iters=3, eval_interval=3,
                               activation="gelu_tanh")))
    return root / "src", continue_dense(char_data, root / "src", root / "cont")


@pytest.fixture(scope="module")
def hf_gpt2(char_data, tmp_path_factory):
    """A tiny Hugging Face GPT-2 saved locally, and its step-0 losses. (Losses barely feel which GELU runs:
    the logits tests above and tests/test_expert_parallel.py check that the experts keep the activation.)"""
    from transformers import GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=65, n_positions=64)).save_pretrained(
        root / "src")
    return root / "src", continue_dense(char_data, root / "src", root / "cont")


UPCYCLE = dict(max_iters=1, eval_interval=1, num_experts=4, num_experts_per_tok=2)


def test_trainer_upcycles_a_dense_run(char_data, tmp_path, dense_run):
    src, dense_losses = dense_run
    train(*from_argv(tiny_args(char_data, tmp_path, init_from=str(src), gate="sigmoid", **UPCYCLE)))
    assert step0(tmp_path) == pytest.approx(dense_losses, rel=1e-5)
    ck = checkpoint_dir.open_checkpoint(str(tmp_path)).meta
    assert ck["model_args"]["use_moe"] and ck["model_args"]["activation"] == "gelu_tanh"  # the source's, not ours


@pytest.mark.parametrize("source", ["dense_run", "hf_gpt2"])
def test_deepspeed_ep2_upcycles_after_sharding(char_data, tmp_path, source, request):
    """2 gloo ranks, ep_size=2, ZeRO-2 fp32: the full model is upcycled, then its experts are sharded."""
    src, dense_losses = request.getfixturevalue(source)
    res = run_ranks(2, ["--deepspeed_config", ds_json(tmp_path, "zero2"),
                        *tiny_args(char_data, tmp_path / "ds", init_from=str(src), ep_size=2, **UPCYCLE)])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    assert step0(tmp_path / "ds") == pytest.approx(dense_losses, rel=1e-5)
    ck = checkpoint_dir.open_checkpoint(str(tmp_path / "ds"))
    assert ck.shape("model/transformer.h.0.mlp.experts.w_in")[0] == 4  # every expert saved, from both ranks
    assert {r[3] for r in ck.meta["records"] if ".experts." in r[0]} == {"shard_00000.bin", "shard_00001.bin"}


def test_cpu_preset_upcycles_a_dense_run(char_data, tmp_path, dense_run):
    src, dense_losses = dense_run
    m, t = from_argv([str(REPO / "launch/config/upcycle_shakespeare_char_moe.py"), f"--init_from={src}",
                      f"--data_dir={char_data}", f"--out_dir={tmp_path}", "--max_iters=0", "--eval_iters=2",
                      "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2"])
    assert (m.use_moe, m.num_experts, m.num_experts_per_tok, t.device) == (True, 8, 2, "cpu")
    res = train(m, t)
    assert res["val"] == pytest.approx(dense_losses[1], rel=1e-5)


def test_gpt2_finetune_preset_parses():
    m, t = from_argv([str(REPO / "launch/config/finetune_shakespeare_moe.py")])
    assert t.init_from == "gpt2" and m.use_moe and t.dataset == "shakespeare"
