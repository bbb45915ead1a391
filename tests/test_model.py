"""GPT: shapes, causality, MoE on/off, parameter counts, GPT-2 loading."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nanomoe_ds import checkpoint_dir, start, train_state
from nanomoe_ds.config import ConfigError, GPTConfig
from nanomoe_ds.model import GPT
from nanomoe_ds.mlp import MLP
from nanomoe_ds.moe import MoE


def tiny(**kw):
    base = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPTConfig(**{**base, **kw})


@pytest.mark.parametrize("use_moe", [False, True])
def test_shapes_and_loss(use_moe):
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=use_moe, num_experts=4))
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 50) and loss.ndim == 0
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    assert all(isinstance(b.mlp, MoE if use_moe else MLP) for b in model.transformer.h)


@pytest.mark.parametrize("use_moe", [False, True])
def test_causality(use_moe):
    """Changing a future token leaves the logits at earlier positions unchanged."""
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=use_moe, num_experts=4)).eval()
    idx = torch.randint(0, 50, (2, 16))
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 50
    a, _ = model(idx, idx)
    b, _ = model(idx2, idx2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_residual_around_moe():
    """With all expert weights zeroed, the MoE adds nothing and the block is attention + residual."""
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=True, num_experts=4, bias=False)).eval()
    for m in model.moe_layers():
        m.experts.w_out.data.zero_()
    x = torch.randn(2, 16, 16)
    blk = model.transformer.h[0]
    expected = x + blk.attn(blk.ln_1(x))
    out, routing = blk(x)  # an MoE block returns its routing record too
    assert torch.allclose(out, expected, atol=1e-6) and routing.kept.sum() == 2 * 16 * 2


def test_active_params_count_topk_experts():
    cfg = tiny(use_moe=True, num_experts=8, num_experts_per_tok=2, bias=False)
    model = GPT(cfg)
    per_expert = 2 * cfg.n_embd * cfg.expert_hidden
    total, active = model.get_num_params(), model.get_num_params(active=True)
    assert total - active == cfg.n_layer * 6 * per_expert
    dense = GPT(tiny(bias=False))
    # top-2 of 8 experts: exactly 2 dense MLPs' worth of expert weights, plus the router
    assert active == dense.get_num_params() + cfg.n_layer * (per_expert + cfg.num_experts * cfg.n_embd)
    # MFU counts active parameters: top-2 of 8 experts costs what top-2 of 2 costs
    two = GPT(tiny(use_moe=True, num_experts=2, num_experts_per_tok=2, bias=False))
    assert active - two.get_num_params(active=True) == cfg.n_layer * 6 * cfg.n_embd  # only the router grew
    assert model.flops_per_token() < GPT(tiny(use_moe=True, num_experts=8, num_experts_per_tok=8,
                                             bias=False)).flops_per_token()  # MFU counts active experts only


def test_aux_loss_in_training_loss_not_in_eval_loss():
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=True, num_experts=4, aux_loss_coef=0.5, z_loss_coef=0.1))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss, report = model(idx, idx, report=True)
    ce = F.cross_entropy(logits.view(-1, 50), idx.view(-1))
    assert torch.allclose(report.ce, ce)
    assert torch.allclose(loss, ce + 0.5 * report.aux_loss + 0.1 * report.z_loss)
    assert loss > ce + 0.4  # the aux term (>= ~1) is really in there
    model.eval()
    logits, loss = model(idx, idx)
    assert torch.allclose(loss, F.cross_entropy(logits.view(-1, 50), idx.view(-1)))


def test_weight_tying_and_crop():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    model.crop_block_size(8)
    logits, _ = model(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8)))
    assert logits.shape == (1, 8, 50)


def test_optimizer_groups_decay_matrices_only():
    model = GPT(tiny(use_moe=True, num_experts=4))
    groups = model.optimizer_groups(0.1)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 and "b_" not in names[id(p)] for p in decay)
    assert {names[id(p)].split(".")[-1] for p in no_decay} == {"weight", "bias", "b_in", "b_out"}  # norms, biases
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True  # one kernel on CPU too


def test_fused_adamw_matches_the_default_implementation():
    """Given the same gradients, the fused CPU AdamW takes the same steps as the foreach one, to fp32 rounding."""
    def run(fused):
        torch.manual_seed(0)
        model = GPT(tiny(use_moe=True, num_experts=4))
        opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-2, betas=(0.9, 0.95), fused=fused)
        grads = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        return model.state_dict()

    fused, default = run(True), run(False)
    for k in fused:
        torch.testing.assert_close(fused[k], default[k], rtol=1e-6, atol=1e-7, msg=k)


def test_generate_top_k_and_length():
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=True, num_experts=4)).eval()
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 20, temperature=0.8, top_k=5)
    assert out.shape == (1, 21)


def test_generate_at_temperature_zero_appends_the_most_likely_token():
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=True, num_experts=4, capacity_factor=1.0)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 3))
    out = model.generate(prompt, 4, temperature=0, top_k=5)
    for step in range(4):  # each token is the argmax of the logits of everything before it
        context = out[:, :3 + step]
        assert torch.equal(out[:, 3 + step], model(context)[0][:, -1].argmax(-1))


@pytest.mark.parametrize("hf_act, ours", [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                          ("gelu_fast", "gelu_tanh"), ("gelu", "gelu")])
def test_from_pretrained_matches_transformers(tmp_path, hf_act, ours):
    """Load a tiny GPT2LMHeadModel saved locally and match its logits, in its own GELU."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02): pre-activations large enough for the two GELUs to differ visibly
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=16,
                                    activation_function=hf_act, initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.activation == ours
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        ref = hf(idx).logits
        ours_logits, _ = model(idx, idx)
        torch.testing.assert_close(ours_logits, ref, rtol=0, atol=1e-5)
        for block in model.transformer.h:  # the other GELU: the test has teeth
            block.mlp.gelu_variant = "gelu" if ours == "gelu_tanh" else "gelu_tanh"
        assert (model(idx, idx)[0] - ref).abs().max() > 1e-4


@pytest.mark.parametrize("hf_kw, msg", [
    (dict(activation_function="relu"), "this GPT-2 has activation_function='relu', which this model does not implement"),
    (dict(n_inner=24), "this GPT-2 has n_inner=24"),
    (dict(layer_norm_epsilon=1e-6), "this GPT-2 has layer_norm_epsilon=1e-06"),
    (dict(scale_attn_by_inverse_layer_idx=True), "this GPT-2 has scale_attn_by_inverse_layer_idx=True"),
])
def test_from_pretrained_refuses_variants_it_cannot_reproduce(tmp_path, hf_kw, msg):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16, **hf_kw)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as e:
        GPT.from_pretrained(str(tmp_path))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_unreachable_gpt2_name_is_one_line(tmp_path, monkeypatch):
    """No network and no cache: transformers' OSError becomes one line."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, without retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # even where it is cached
    with pytest.raises(ConfigError) as e:
        GPT.from_pretrained("distilgpt2")
    assert str(e.value).startswith("cannot load GPT-2 'distilgpt2' with transformers: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activation_is_followed_by_dense_shared_and_routed_mlps(activation):
    torch.manual_seed(0)
    model = GPT(tiny(use_moe=True, moe_every=2, num_shared_experts=1, activation=activation))
    dense_mlp, moe = model.transformer.h[0].mlp, model.transformer.h[1].mlp
    assert dense_mlp.gelu_variant == moe.shared_mlp.gelu_variant == moe.experts.gelu_variant == activation
    x = torch.randn(5, 16) * 3
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    expected = dense_mlp.c_proj(F.gelu(dense_mlp.c_fc(x), approximate=approximate))
    torch.testing.assert_close(dense_mlp(x), expected, rtol=0, atol=0)


def test_checkpoints_from_before_the_activation_key_load_with_exact_gelu(tmp_path):
    """Such checkpoints are single-file ckpt.pt (the format before sharding): read through LegacyCheckpoint."""
    model = GPT(tiny())
    args = dataclasses.asdict(model.config)
    del args["activation"]
    torch.save({"model_args": args, "model": model.state_dict(), "optimizer_state": {"step": 0, "moments": {}},
                "topology": train_state.topology("local", 1, 1, None, "float32"), "rng": train_state.rng_state(),
                "iter_num": 0}, tmp_path / "ckpt.pt")
    loaded = start.model_from_checkpoint(checkpoint_dir.open_checkpoint(str(tmp_path)), dropout=0.1)
    assert loaded.config.activation == "gelu" and loaded.config.dropout == 0.1
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
