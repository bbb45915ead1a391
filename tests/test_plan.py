"""The plan (nanomoe_ds/plan.py) against reality: the bytes real gloo ranks allocate and hand to collectives,
and what autograd saves; its pure logic in-process."""
from __future__ import annotations

import collections
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dist_utils import as_launched, ds_json

from nanomoe_ds import plan
from nanomoe_ds.activation_checkpoint import checkpoint_blocks_
from nanomoe_ds.config import ConfigError, GPTConfig, from_argv
from nanomoe_ds.ds_config import load_ds_config
from nanomoe_ds.model import GPT

TINY = dict(device="cpu", compile=False, n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, batch_size=2,
            dropout=0.0, dataset="none", use_moe=True, num_experts=4, num_experts_per_tok=2)
DENSE = dict(use_moe=False)
SCALAR_DTYPES = ("torch.float64",)  # the trainer's losses and the exact clip's norm: a few bytes, not planned


def argv(tmp_path: Path, world: int, json_name: str, **over) -> list[str]:
    """A tiny run's command line: 2 micro-batches per rank, so a step has a boundary and a micro-batch before it."""
    args = {**TINY, "gradient_accumulation_steps": 2 * world, "out_dir": str(tmp_path / "out"), **over}
    zero = args.pop("zero", None)
    path = ds_json(tmp_path, json_name, bf16=args.pop("bf16", False), zero=zero)
    return [f"--deepspeed_config={path}", *[f"--{k}={v}" for k, v in args.items()]]


# ---------------------------------------------------------------- what a rank holds and hands over
def held_bytes(module, optimizer) -> int:
    """Bytes of every distinct storage reachable from a module (parameters, gradients, buffers) and an
    optimizer (DeepSpeed's flat buffers, partitions and buckets, the torch optimizer's state). One-element
    tensors (step counters, norms, flags) are left out: the plan leaves them out too."""
    seen_objects, storages = set(), {}

    def visit(obj, depth):
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.numel() > 1 and obj.untyped_storage().data_ptr():
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
            if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
                visit(obj.grad, depth)
            return
        if depth > 8 or id(obj) in seen_objects:
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                visit(tensor, depth + 1)
        elif isinstance(obj, dict):
            for key, value in list(obj.items()):
                visit(key, depth + 1)
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for value in obj:
                visit(value, depth + 1)
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "collections") and hasattr(obj, "__dict__") \
                and "ProcessGroup" not in type(obj).__name__:
            for value in vars(obj).values():
                visit(value, depth + 1)

    visit(module, 0)
    visit(optimizer, 0)
    return sum(storages.values())


# torch.distributed's function -> (the plan's kind, the input's position and keyword)
COLLECTIVES = {"all_to_all_single": ("all_to_all", 1, "input"), "all_reduce": ("all_reduce", 0, "tensor"),
               "reduce": ("reduce", 0, "tensor"), "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
               "all_gather_into_tensor": ("all_gather", 1, "input_tensor")}


def count_collectives(log: collections.Counter):
    """Wrap torch.distributed's collectives (they still run) to add each call's input bytes to log[(kind, group)]."""
    import torch.distributed as dist
    for name, (kind, position, keyword) in COLLECTIVES.items():
        real = getattr(dist, name)

        def counted(*args, _real=real, _kind=kind, _position=position, _keyword=keyword, **kwargs):
            tensor = args[_position] if len(args) > _position else kwargs[_keyword]
            if tensor.numel() > 1 and str(tensor.dtype) not in SCALAR_DTYPES:
                group = kwargs.get("group")
                log[(_kind, dist.get_world_size(group) if group is not None else dist.get_world_size())] += \
                    tensor.numel() * tensor.element_size()
            return _real(*args, **kwargs)
        setattr(dist, name, counted)


class RandomBatches:
    """data.Batches' interface over this rank's fixed random tokens."""

    def __init__(self, vocab: int, batch: int, block: int, rank: int):
        self.x = torch.randint(0, vocab, (batch, block), generator=torch.Generator().manual_seed(rank))

    def get(self, split: str, it: int, micro: int, stream: int = 0):
        return self.x, self.x


def measure_configs(rank: int, world: int, configs: list, out: str):
    """Each config in turn on these ranks, built as the trainer builds it: bytes held between the micro-batches,
    at the boundary and after the second step, and the bytes handed to collectives in that step."""
    as_launched(rank, world)
    from nanomoe_ds.ds_engine import make_engine_factory
    from nanomoe_ds.trainer import train_step
    log = collections.Counter()
    count_collectives(log)
    results = []
    for args in configs:
        model_cfg, train_cfg = from_argv(args)
        torch.manual_seed(0)
        model = GPT(model_cfg)
        if train_cfg.activation_checkpointing:
            checkpoint_blocks_(model)
        engine = make_engine_factory(model_cfg, train_cfg)(model, train_cfg)
        batches = RandomBatches(model_cfg.vocab_size, train_cfg.batch_size, model_cfg.block_size, rank)
        train_step(engine, batches, 0, 1e-3, lambda: False, None)  # the first step makes the optimizer's state
        x, _ = batches.get("train", 1, 0)
        log.clear()
        held = lambda: held_bytes(engine.engine.module, engine.engine.optimizer)  # noqa: E731
        between = held()  # with one micro-batch a rank, nothing comes between
        for micro in range(engine.micro_batches // world):
            engine.backward(engine.forward(x, x)[1])
            between = held() if micro == 0 and engine.micro_batches > world else between
        boundary = held()
        engine.step(1e-3)
        results.append({"between": between, "boundary": boundary, "after": held(),
                        "collectives": [[kind, group, n] for (kind, group), n in log.items()]})
        del engine, model
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def fuzzed(seed: int, count: int, ep_sizes: tuple) -> list[dict]:
    """Random small MoE shapes and settings, each with a ZeRO stage and an ep_size the world allows."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        experts = rng.choice([e for e in (2, 4, 8) if e % max(ep_sizes) == 0] or [max(ep_sizes)])
        out.append(dict(json_name=rng.choice(["zero0", "zero1", "zero2"]), ep_size=rng.choice(ep_sizes),
                        n_layer=rng.randint(1, 3), n_embd=rng.choice([8, 16, 24]), num_experts=experts,
                        num_experts_per_tok=rng.randint(1, experts), moe_every=rng.randint(1, 2),
                        num_shared_experts=rng.randint(0, 1), expert_act=rng.choice(["gelu", "swiglu"]),
                        expert_hidden=rng.choice([0, 12]), bias=rng.choice([True, False]),
                        vocab_size=rng.choice([32, 50, 64]), gradient_accumulation_steps=rng.choice([1, 2, 3])))
    return out


def world_configs(world: int) -> list[dict]:
    """Every ZeRO stage with each ep_size the world allows (and dense ZeRO-3), bf16's masters, offload,
    activation checkpointing, and fuzzed shapes."""
    eps = [e for e in (1, 2, 4) if world % e == 0]
    keep = dict(zero_single_rank_as_stage0=False)  # on one rank, keep the stage (else it runs as ZeRO-0)
    configs = [dict(json_name=f"zero{stage}", ep_size=ep, **keep) for stage in (0, 1, 2) for ep in eps]
    configs += [dict(json_name=f"zero{stage}", **DENSE, **keep) for stage in ((2, 3) if world == 2 else (3,))]
    if world == 2:  # a tiny model: bf16 costs nothing here
        configs += [dict(json_name="zero0", ep_size=2, bf16=True), dict(json_name="zero2_offload", ep_size=2),
                    dict(json_name="zero2", ep_size=2, activation_checkpointing=True)]
    return configs + fuzzed(world, {1: 1, 2: 2, 4: 0}[world], tuple(eps))  # 4 ranks: the full matrix is enough


def run_world(world: int, tmp_path: Path, forkserver) -> list[tuple[list[str], list[dict]]]:
    """One world of ranks forked from the forkserver measures every config of world_configs(world): (argv, each
    rank's measurements)."""
    configs = []
    for i, over in enumerate(world_configs(world)):
        over = dict(over)
        micro = over.pop("gradient_accumulation_steps", 2)
        configs.append(argv(tmp_path, world, over.pop("json_name"), **over,
                            gradient_accumulation_steps=micro * world))
    forkserver.spawn_ranks(measure_configs, (world, configs, str(tmp_path)), world, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    return [(args, [ranks[r][i] for r in range(world)]) for i, args in enumerate(configs)]


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda w: f"{w}rank")
def measured(request, tmp_path_factory, forkserver):
    return request.param, run_world(request.param, tmp_path_factory.mktemp(f"world{request.param}"), forkserver)


def planned_layout(args: list[str], world: int) -> tuple[plan.Inventory, plan.Layout, int]:
    model_cfg, train_cfg = from_argv(args)
    layout = plan.layout_of(model_cfg, train_cfg, world, load_ds_config(train_cfg.deepspeed_config), "cpu")
    return plan.inventory(model_cfg), layout, train_cfg.batch_size


def test_model_states_are_what_each_rank_allocates(measured):
    """Between the micro-batches of a step, at its boundary and after it, every rank holds exactly the planned bytes."""
    world, results = measured
    for args, ranks in results:
        inv, layout, _ = planned_layout(args, world)
        for rank, got in enumerate(ranks):
            states = plan.model_states(inv, layout, rank)
            want = {"after": states.resting, "boundary": states.resting + states.grads,
                    "between": states.resting + states.accumulating}
            assert {k: got[k] for k in want} == want, f"rank {rank} of {world}: {layout} {args}"


def test_collective_bytes_are_what_a_step_hands_over(measured):
    """The bytes a real step hands to each collective equal the plan's; the all-to-all summed over the ranks
    (a rank returns as many rows as it received, which routing decides; the ranks together send T*k each)."""
    world, results = measured  # one rank too: ZeRO-1/2/3 call their reductions on a group of one
    for args, ranks in results:
        inv, layout, batch = planned_layout(args, world)
        want = plan.collectives(inv, batch, layout)
        got = [{(kind, group): n for kind, group, n in r["collectives"]} for r in ranks]
        for key, nbytes in want.items():
            if key[0] == "all_to_all":
                assert sum(g.get(key, 0) for g in got) == world * nbytes, f"{key} {layout} {args}"
            else:
                assert all(g.get(key, 0) == nbytes for g in got), f"{key}: {[g.get(key) for g in got]} {layout} {args}"
        assert all(set(g) <= set(want) for g in got), f"unplanned collectives {got} {layout} {args}"


# ---------------------------------------------------------------- in-process
def autograd_saves(model_cfg: GPTConfig, batch_size: int, checkpointed: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (parameters excluded: they are
    model state), counted with saved-tensor hooks as bench/bench_engine.py does."""
    torch.manual_seed(0)
    model = GPT(model_cfg)
    if checkpointed:
        checkpoint_blocks_(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor
    x, y = torch.randint(0, model_cfg.vocab_size, (2, batch_size, model_cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(x, y)
    loss.backward()
    return sum(storages.values())


SHAPES = {"moe": (dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, use_moe=True, num_experts=4,
                       num_experts_per_tok=2), 2),
          "mixed": (dict(n_layer=3, n_head=3, n_embd=48, block_size=32, vocab_size=96, use_moe=True, num_experts=8,
                         num_experts_per_tok=2, moe_every=2, num_shared_experts=1, expert_act="swiglu",
                         expert_hidden=96, z_loss_coef=0.001), 3)}


@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_activations_within_20_percent_of_what_autograd_saves(shape, checkpointed):
    """grouped_mm, the kernel a GPU runs (bmm pads every expert to the fullest one: more, by routing)."""
    over, batch = SHAPES[shape]
    model_cfg = GPTConfig(**over, dropout=0.0, moe_impl="grouped_mm")
    planned = plan.activations(plan.inventory(model_cfg), batch, plan.Layout(), checkpointed).saved
    measured = autograd_saves(model_cfg, batch, checkpointed)
    assert planned == pytest.approx(measured, rel=0.2), (planned, measured)


def test_the_plain_engine_holds_what_is_planned(tmp_path):
    """One device, plain PyTorch: fp32 weights, gradients and AdamW moments, nothing else."""
    from nanomoe_ds.local_engine import LocalEngine
    model_cfg, train_cfg = from_argv([f"--{k}={v}" for k, v in {**TINY, "out_dir": tmp_path}.items()])
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cpu", torch.float32)
    x = torch.randint(0, model_cfg.vocab_size, (train_cfg.batch_size, model_cfg.block_size))
    engine.backward(engine.forward(x, x)[1])
    states = plan.model_states(plan.inventory(model_cfg), plan.layout_of(model_cfg, train_cfg, 1, None, "cpu"))
    assert held_bytes(engine.module, engine.optimizer) == states.weights + states.grads
    engine.step(1e-3)
    assert held_bytes(engine.module, engine.optimizer) == states.resting


def layout_for(world: int, json_name: str, **over) -> plan.Layout:
    path = REPO / "ds_configs" / f"{json_name}.json"
    model_cfg, train_cfg = from_argv([f"--{k}={v}" for k, v in {**TINY, "gradient_accumulation_steps": 2,
                                                                "deepspeed_config": path, **over}.items()])
    return plan.layout_of(model_cfg, train_cfg, world, load_ds_config(str(path)), "cuda")


def test_layout_is_the_trainers_reconciliation():
    """The same fitting and refusals as the trainer: ep_size and the global batch fitted to the ranks, ZeRO-0
    where a stage would partition over one rank (fp32 only), contradictions refused in one line."""
    assert layout_for(2, "zero2", ep_size=4).ep_size == 2
    assert layout_for(4, "zero1", ep_size=2).micro_batches == 4  # 2 micro-batches rounded up to the ranks
    fp32 = json.loads((REPO / "ds_configs/zero2.json").read_text()) | {"bf16": {"enabled": False}}
    model_cfg, train_cfg = from_argv([f"--{k}={v}" for k, v in TINY.items()])
    assert plan.layout_of(model_cfg, train_cfg, 1, fp32, "cpu").zero_stage == 0
    assert layout_for(1, "zero2").zero_stage == 2 and layout_for(1, "zero2").dtype == "bfloat16"
    assert layout_for(2, "zero2_offload").offload
    with pytest.raises(ConfigError, match="ZeRO-3 does not support native MoE"):
        layout_for(2, "zero3")
    with pytest.raises(ConfigError, match="contradicts batch_size=2"):
        plan.layout_of(model_cfg, train_cfg, 2, {"train_micro_batch_size_per_gpu": 8}, "cuda")
    with pytest.raises(ConfigError, match="needs DeepSpeed"):
        plan.layout_of(model_cfg, train_cfg, 2, None, "cuda")


def test_zero_partition_pads_to_twice_the_ranks():
    """[10, 7] over 2 ranks: 17 elements pad to 20, partitions of 10; rank 1's holds the second parameter
    and the first one's gradient touches only rank 0's."""
    assert plan.zero_partition([10, 7], 2, 0) == (20, 10, 10)
    assert plan.zero_partition([10, 7], 2, 1) == (20, 10, 7)
    assert plan.zero_partition([3, 5, 4], 4, 1) == (16, 4, 5)  # the second, elements [3, 8), spans partitions 0 and 1


def random_setup(rng: random.Random) -> tuple[GPTConfig, plan.Layout, int]:
    world = rng.choice([1, 2, 4, 8, 16])
    experts = rng.choice([1, 2, 4, 8, 16, 64])
    model_cfg = GPTConfig(n_layer=rng.randint(1, 6), n_head=2, n_embd=rng.choice([16, 32, 64]),
                          block_size=rng.choice([16, 64, 256]), vocab_size=rng.choice([65, 512, 50304]),
                          use_moe=rng.random() < 0.8, num_experts=experts, num_experts_per_tok=rng.randint(1, experts),
                          moe_every=rng.randint(1, 2), num_shared_experts=rng.randint(0, 2),
                          expert_act=rng.choice(["gelu", "swiglu"]), capacity_factor=rng.choice([0.0, 1.25]))
    ep = rng.choice([e for e in (1, 2, 4, 8) if world % e == 0 and experts % e == 0 and (e == 1 or model_cfg.use_moe)])
    stage = rng.choice([0, 1, 2] + ([3] if not model_cfg.use_moe else []))
    layout = plan.Layout(world, ep, stage, rng.choice(["float32", "bfloat16"]), world * rng.randint(1, 3),
                         rng.random() < 0.5, offload=stage == 2 and rng.random() < 0.3,
                         reduce_bucket=rng.choice([1000, 10**8]))
    return model_cfg, layout, rng.randint(1, 8)


def test_fuzzed_plans_hold_their_invariants():
    """Over random configs: the plan's rank is the one holding the most; in bf16 ZeRO-2 holds no more model state
    than ZeRO-1, nor ZeRO-1 than ZeRO-0, buckets aside (in fp32 it can: ZeRO-1/2 add an fp32 master partition where
    ZeRO-0 steps the weights); the largest batch found fits and one more does not; a plan that does not fit says
    why in one line."""
    rng = random.Random(0)
    for _ in range(40):
        model_cfg, layout, batch = random_setup(rng)
        inv = plan.inventory(model_cfg)
        result = plan.plan_for(inv, batch, layout, plan.Device(memory=rng.choice([2**20, 2**26, 2**34])))
        bf16 = dataclasses.replace(layout, dtype="bfloat16", offload=False)
        held = [plan.heaviest_rank(inv, dataclasses.replace(bf16, zero_stage=stage)) for stage in (0, 1, 2)]
        held = [states.resting + max(states.grads, states.accumulating - states.bucket) for states in held]
        padding = 4 * 2 * layout.world_size * 2  # ZeRO-1/2 pad each group's flat buffer to 2 x its ranks
        assert held[2] <= held[1] <= held[0] + padding or layout.world_size == 1, (model_cfg, layout, held)
        ranks = [plan.model_states(inv, layout, rank) for rank in range(layout.world_size)]
        assert max(s.resting + s.grads for s in ranks) == result.states.resting + result.states.grads
        advice = result.advice
        assert (advice.verdict is None) == (result.peak <= result.device.memory)
        assert advice.verdict is None or "\n" not in advice.verdict and advice.verdict.startswith("does not fit: ")
        if advice.max_batch:
            bigger = [plan.plan_for(inv, advice.max_batch + d, layout).peak for d in (0, 1)]
            assert bigger[0] <= result.device.memory < bigger[1]
        assert "\n" not in plan.summary_line(result) and all("\n" not in line for line in plan.describe(result))


def test_flops_per_token_is_the_mfu_formula():
    model_cfg = GPTConfig(**SHAPES["mixed"][0])
    assert plan.inventory(model_cfg).flops_per_token == GPT(model_cfg).flops_per_token()


MEDIUM_64 = GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304, use_moe=True,
                      num_experts=64, num_experts_per_tok=2)


@pytest.mark.parametrize("layout, memory_gib, says", [
    (plan.Layout(8, 1, 0, "bfloat16", 8), 80, "alone take 195.36 GiB per rank of 80.00 GiB; use --ep_size=4"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 36, "batch_size=8 needs 42.25 GiB per rank of 36.00 GiB; use --activation_"
                                             "checkpointing=True or --batch_size=5"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 30, "; use --batch_size=2 or --activation_checkpointing=True --batch_size=7"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 27, "; use --activation_checkpointing=True --batch_size=2"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 25.7, "one sequence of 1024 tokens needs 611.63 MiB of activations even wi"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 20, "; offload the optimizer state (ds_configs/zero2_offload.json)"),
    (plan.Layout(8, 8, 1, "bfloat16", 8), 4, "alone take 25.56 GiB per rank of 4.00 GiB; use more ranks"),
])
def test_a_plan_that_cannot_fit_says_why_in_one_line(layout, memory_gib, says):
    result = plan.plan_for(plan.inventory(MEDIUM_64), 8, layout, plan.Device(memory=int(memory_gib * plan.GIB)))
    assert says in result.advice.verdict and "\n" not in result.advice.verdict, result.advice.verdict
    assert "does NOT fit" in plan.summary_line(result)


def load_cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch_plan", REPO / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_the_plan_and_refuses_bad_input_in_one_line(capsys):
    cli = load_cli()
    preset = [str(REPO / "launch/config/train_shakespeare_char_moe.py"), "--device=cpu", "--dataset=none"]
    cli.run_script(cli.main, [*preset, f"--deepspeed_config={REPO / 'ds_configs/zero1.json'}", "--world_size=2",
                              "--ep_size=2", "--gpu_mem_gb=1", "--tflops=100", "--link_gbps=100"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 ranks, ZeRO-1, bfloat16, ep_size 2") and out[-1].startswith("plan: ")
    assert any(line.startswith("  all-to-all ") for line in out) and any("step time          >= " in l for l in out)
    for argv, error in (([*preset, "--world_size=2"], "error: world_size=2 needs DeepSpeed"),
                        ([*preset, "--gpu_mem_gb=lots"], "error: --gpu_mem_gb: expected a number, got 'lots'"),
                        ([*preset, "--n_layers=3"], "error: unknown config key 'n_layers'")):
        with pytest.raises(SystemExit) as stopped:
            cli.run_script(cli.main, argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith(error) and err.count("\n") == 1, err


def test_startup_lines_summarise_and_warn_when_the_device_is_too_small(tmp_path):
    """What the trainer prints before its first step: the summary, and a warning where the peak exceeds the device."""
    from nanomoe_ds.local_engine import LocalEngine
    model_cfg, train_cfg = from_argv([f"--{k}={v}" for k, v in {**TINY, "out_dir": tmp_path}.items()])
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cpu", torch.float32)
    (line,) = plan.startup_lines(engine, train_cfg)
    assert line.startswith("plan: one device, float32: peak ") and "does NOT fit" not in line
    summary, warning = plan.startup_lines(engine, train_cfg, memory=1000)
    assert "does NOT fit" in summary
    assert warning.startswith("warning: the plan's peak of ") and "exceeds this device's 1.0 KiB" in warning
