"""Checkpoints: resume at another topology with the optimizer state, compatibility refusals, corrupt files.

Every resharding case trains straight to iteration 6 at the topology it saves at, and
continues from its checkpoint at iteration 3 at another topology: the continuation must
take the straight run's steps 3-6 (losses and gradient norms to 1e-5 relative, fp32).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_args
from dist_utils import ds_json, run_ranks, start_ranks, train_rows, wait_for_iter

from nanomoe_ds import checkpoint, checkpoint_dir
from nanomoe_ds.config import ConfigError, from_argv
from nanomoe_ds.trainer import train

OVER = dict(eval_interval=3, grad_clip=0.5, num_experts=4, num_experts_per_tok=2, bias_update_rate=0.01)
TOPOLOGIES = {  # name: (ranks, ep_size, DeepSpeed JSON or None for the single-device trainer); fp32 unless named
    "local": (1, 1, None), "w2ep2-zero2": (2, 2, "zero2"), "w2ep1-zero2": (2, 1, "zero2"),
    "w2ep2-zero1": (2, 2, "zero1"), "w2ep2-zero0": (2, 2, "zero0"), "w2ep2-zero0-bf16": (2, 2, "zero0"),
    # Dense models (DeepSpeed's ZeRO-3 takes no native MoE). "w2-zero3" partitions every parameter
    # (persistence threshold 0); "-persistent" keeps the shipped threshold, under which every parameter
    # of this tiny model stays whole on each rank between steps as well.
    "local-dense": (1, 1, None), "w2-zero2-dense": (2, 1, "zero2"), "w2-zero3-dense": (2, 1, "zero3"),
    "w2-zero3-dense-persistent": (2, 1, "zero3"), "w2-zero3-dense-bf16": (2, 1, "zero3"),
    "w2-zero3-dense-offload": (2, 1, "zero3"),  # fp32 masters and moments in CPU memory (offload_optimizer)
}
PARTITION_EVERYTHING = {"stage3_param_persistence_threshold": 0}


def run_at(forkserver, topology: str, char_data, out_dir, tmp_path, **over):
    """Train at `topology`: one device in this process, DeepSpeed ranks forked from the session's fork server."""
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    if "dense" in topology:  # an odd width: ZeRO-3 pads most tensors to split them in two
        over = {"use_moe": False, "n_embd": 33, "n_head": 3, **over}
    args = tiny_args(char_data, out_dir, **{**OVER, **over})
    if json_name is None:
        model_cfg, train_cfg = from_argv(args)
        # One thread, as in the rank subprocesses (OMP_NUM_THREADS=1): a bit-for-bit comparison
        # needs the same reduction splits, and those follow the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(model_cfg, train_cfg)
        finally:
            torch.set_num_threads(threads)
        return
    zero = PARTITION_EVERYTHING if json_name == "zero3" and not topology.endswith("persistent") else None
    if topology.endswith("offload"):
        zero = {**zero, "offload_optimizer": {"device": "cpu"}}
    ds = ds_json(tmp_path, json_name, bf16=topology.endswith("bf16"), zero=zero)
    for r in forkserver.run_ranks(ranks, ["--deepspeed_config", ds, *args, f"--ep_size={ep_size}"]):
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def saved(forkserver, char_data, tmp_path_factory):
    """Per source topology, one straight run to iteration 6: its checkpoint at iteration 3, in an out_dir as a
    run stopped there leaves it, and its steps 3-6, which every continuation from that checkpoint must take.
    (The data order is a function of the iteration (data.Batches), and the LR schedule of lr_decay_iters,
    not max_iters: the run to 6 saves at 3 what a run to 3 saves.)"""
    cache = {}

    def get(topology):
        if topology not in cache:
            base = tmp_path_factory.mktemp(topology)
            run_at(forkserver, topology, char_data, base / "run", base, max_iters=6)
            cache[topology] = as_stopped_at(base / "run", 3, base / "at3"), train_rows(base / "run")[-4:]
        return cache[topology]
    return get


def as_stopped_at(out_dir, iteration: int, copy):
    """A copy of out_dir as a run with max_iters=`iteration` would have left it: no checkpoint after
    iter_<iteration>, and metrics.jsonl up to that iteration's step."""
    later = [p.name for p in out_dir.glob("iter_*") if int(p.name.split("_")[1]) > iteration]
    shutil.copytree(out_dir, copy, ignore=lambda directory, names: later if directory == str(out_dir) else [])
    lines = open(out_dir / "metrics.jsonl").readlines()
    records = [json.loads(line) for line in lines]
    last = next(i for i, r in enumerate(records) if r.get("iter") == iteration and "loss" in r)  # its train record
    (copy / "metrics.jsonl").write_text("".join(lines[:last + 1]))
    return copy


@pytest.mark.parametrize("source, target", [
    ("w2ep2-zero2", "local"),  # DeepSpeed EP=2 -> one device
    ("w2ep2-zero2", "w2ep1-zero2"),  # EP 2 -> 1 on the same ranks
    ("w2ep1-zero2", "w2ep2-zero2"),  # EP 1 -> 2
    ("local", "w2ep2-zero2"),  # one device -> DeepSpeed EP=2
    ("w2ep2-zero1", "w2ep2-zero2"),  # ZeRO-1 -> ZeRO-2
    ("w2ep2-zero2", "w2ep2-zero1"),  # ZeRO-2 -> ZeRO-1
    ("w2ep2-zero0", "local"),  # ZeRO-0, the optimizer's own parameters
    ("w2ep2-zero0-bf16", "local"),  # ZeRO-0 bf16 (the shipped zero0.json): fp32 copies; bf16 vs fp32 tolerance
    ("w2-zero3-dense", "local-dense"),  # ZeRO-3 partitions -> one device
    ("local-dense", "w2-zero3-dense"),  # one device -> ZeRO-3 partitions
    ("w2-zero2-dense", "w2-zero3-dense-persistent"),  # ZeRO-2 -> ZeRO-3 with whole persistent parameters
    ("w2-zero3-dense-bf16", "local-dense"),  # the shipped zero3.json: bf16 partitions, fp32 masters
    ("local-dense", "w2-zero3-dense-offload"),  # into partitions the optimizer keeps in CPU memory
])
def test_resume_at_another_topology_takes_the_same_steps(saved, forkserver, char_data, tmp_path, source, target):
    at3, continued = saved(source)
    shutil.copytree(at3, tmp_path / "run")
    run_at(forkserver, target, char_data, tmp_path / "run", tmp_path, max_iters=6, init_from="resume")
    resharded = train_rows(tmp_path / "run")[-4:]
    assert [r["iter"] for r in resharded] == [r["iter"] for r in continued] == [3, 4, 5, 6]
    rel = 2e-2 if source.endswith("bf16") else 1e-5
    for a, b in zip(resharded, continued):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel * 5)


@pytest.mark.parametrize("topology", ["local", "w2ep2-zero2"])
def test_a_resumed_run_does_not_rewrite_the_checkpoint_it_loaded(saved, forkserver, char_data, tmp_path, topology):
    """Resumed at an eval-aligned iteration with always_save_checkpoint (nanoGPT's default), a run evaluates
    but saves only after it has trained: a kill then cannot truncate the checkpoint it came from."""
    at3, _ = saved(topology)
    out = tmp_path / "run"
    shutil.copytree(at3, out)
    before = digest(out)
    before_rows = len(open(out / "metrics.jsonl").readlines())
    run_at(forkserver, topology, char_data, out, tmp_path, max_iters=3, init_from="resume")  # eval at 3, train 3, stop
    resumed = [json.loads(line) for line in open(out / "metrics.jsonl").readlines()[before_rows:]]
    assert [(r["iter"], r.get("event"), "val_loss" in r) for r in resumed] == [(3, "resume", False), (3, None, True),
                                                                               (3, None, False)]
    assert digest(out) == before  # every file of iter_3/, byte for byte


def test_each_rank_writes_its_share_once(saved):
    """Two ranks, ZeRO-2, ep_size 2: two shards of about equal size that hold every element once."""
    at3, _ = saved("w2ep2-zero2")
    ck = checkpoint_dir.open_checkpoint(str(at3))
    assert ck.meta["topology"] == {"engine": "deepspeed", "world_size": 2, "ep_size": 2, "zero_stage": 2,
                                   "dtype": "float32"}
    assert ck.shape("model/transformer.h.0.mlp.experts.w_in")[0] == 4  # the whole tensor's shape: every expert
    assert ck.whole("exp_avg_sq/transformer.h.0.mlp.experts.w_in").abs().sum() > 0
    assert ck.meta["optimizer_step"] == 3
    elements = sum(int(torch.tensor(shape).prod()) for shape in ck.meta["tensors"].values())
    shards = sorted(at3.glob("iter_3/shard_*.bin"))
    assert [p.name for p in shards] == ["shard_00000.bin", "shard_00001.bin"]
    sizes = [p.stat().st_size for p in shards]
    assert sum(sizes) == 4 * elements  # the state, once: no second copy of it
    assert abs(sizes[0] - sizes[1]) < 0.1 * sum(sizes)  # split evenly (rank 0 also has the router biases)
    assert not list(at3.glob("iter_3/*.pt")) or all(p.name.startswith("rng_") for p in at3.glob("iter_3/*.pt"))


def test_zero3_ranks_write_their_partitions_without_the_padding(saved):
    """ZeRO-3 pads each parameter to a multiple of the ranks; the shards hold every element once, no padding."""
    at3, _ = saved("w2-zero3-dense")
    ck = checkpoint_dir.open_checkpoint(str(at3))
    assert ck.meta["topology"]["zero_stage"] == 3
    shapes = ck.meta["tensors"]
    assert shapes["model/transformer.wte.weight"] == [65, 33]  # the whole shape, not a partition's
    assert sum(int(torch.tensor(shape).prod()) % 2 for shape in shapes.values()) > 10  # tensors with padding
    elements = sum(int(torch.tensor(shape).prod()) for shape in shapes.values())
    sizes = [p.stat().st_size for p in sorted(at3.glob("iter_3/shard_*.bin"))]
    assert len(sizes) == 2 and sum(sizes) == 4 * elements
    assert abs(sizes[0] - sizes[1]) < 0.1 * sum(sizes)
    assert ck.whole("exp_avg_sq/transformer.h.0.mlp.c_fc.weight").abs().sum() > 0


@pytest.mark.parametrize("source", ["local", "w2ep2-zero2"])
def test_export_writes_one_file_that_resumes_as_an_older_versions_checkpoint(saved, forkserver, char_data, tmp_path,
                                                                             source):
    """launch/export.py writes whole tensors by name; as a run's ckpt.pt (the single-file format before
    sharding) it resumes, and takes the same next steps as the sharded checkpoint it came from."""
    at3, continued = saved(source)
    (tmp_path / "run").mkdir()
    shutil.copy(at3 / "metrics.jsonl", tmp_path / "run")
    r = forkserver.run(["launch/export.py", str(at3), str(tmp_path / "run" / "ckpt.pt")], timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"wrote {tmp_path / 'run' / 'ckpt.pt'}: iteration 3"), r.stderr
    exported = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert exported["model"]["transformer.h.0.mlp.experts.w_in"].shape[0] == 4  # whole: every expert
    run_at(forkserver, source, char_data, tmp_path / "run", tmp_path, max_iters=6, init_from="resume")
    resumed = train_rows(tmp_path / "run")[-4:]
    for a, b in zip(resumed, continued):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert checkpoint_dir.open_checkpoint(str(tmp_path / "run")).name == "iter_6"  # saved in the sharded format


# ------------------------------------------------------------ compatibility and corruption, in-process
def test_a_corrupt_checkpoint_is_refused_in_one_line_and_the_previous_one_offered(char_data, tmp_path, forkserver):
    """Low bits flipped in one record (the value barely changes: only the checksum can tell) and a shard
    truncated after its weights (only its size can tell): sample.py and a resume pinned to it refuse in one line
    naming the file; --resume_iter takes the previous one. (An unpinned resume falls back: test_resume.py.)"""
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=6, eval_interval=3))
    train(model_cfg, train_cfg)
    shard = tmp_path / "iter_6" / "shard_00000.bin"
    data = bytearray(shard.read_bytes())
    records = checkpoint_dir.open_checkpoint(str(tmp_path)).meta["records"]
    _, _, numel, _, position, _ = max((r for r in records if r[0].startswith("model/")), key=lambda r: r[2])
    data[position + 4 * (numel // 2)] ^= 0x01  # the lowest mantissa bit of one weight (sample.py reads weights)
    shard.write_bytes(bytes(data))
    (tmp_path / "iter_9.partial").mkdir()  # left by a killed save: removed on resume
    expected = (f"error: {shard} is corrupt (checksum mismatch at byte ")
    offer = "the previous checkpoint iter_3 is still there: resume from it with --init_from=resume --resume_iter=3\n"
    for script in (["launch/sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=2"],
                   ["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume", resume_iter=6,
                                                  max_iters=6)]):
        r = forkserver.run(script, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith(expected) and r.stderr.endswith(offer), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "iter_9.partial").exists()
    # Truncated after the last weight: every record sample.py reads still verifies, only the size can tell.
    weights_end = max(r[4] + 4 * r[2] for r in records if r[0].startswith("model/"))
    assert weights_end < len(data)
    shard.write_bytes(bytes(data[:weights_end]))
    r = forkserver.run(["launch/sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=2"], timeout=120)
    truncated = f"error: {shard} is truncated ({weights_end:,} bytes; the checkpoint wrote {len(data):,}); "
    assert r.returncode == 2 and r.stderr == truncated + offer, r.stderr
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume", resume_iter=3,
                                                     max_iters=4)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 3: train loss" in r.stdout


def test_a_save_killed_after_its_commit_but_before_its_rename_is_finished_on_resume(char_data, tmp_path):
    """The metadata written into iter_N.partial is the commit point: a kill before the rename leaves a complete
    staging directory, which the next resume installs; one without metadata (killed earlier) is dropped."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=6, eval_interval=3)))
    (tmp_path / "iter_6").rename(tmp_path / "iter_6.partial")  # as if killed just before the rename
    (tmp_path / "iter_9.partial").mkdir()  # killed while writing shards: no metadata
    (tmp_path / "iter_2.discard").mkdir()  # killed while deleting a pruned checkpoint
    res = train(*from_argv(tiny_args(char_data, tmp_path, max_iters=7, eval_interval=3, init_from="resume")))
    assert len(res["train_losses"]) == 2  # iterations 6 and 7: it resumed from iter_6
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_3", "iter_6"]


def test_complete_partial_saves_are_finished_in_iteration_order(char_data, tmp_path):
    """iter_9.partial and iter_12.partial both complete: 9 is installed first, then 12. In string order 12
    went first, and installing 9 then discarded 12 as a checkpoint newer than itself: iteration 12 was lost."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=12, eval_interval=3, keep_last=4)))
    for it in (9, 12):
        (tmp_path / f"iter_{it}").rename(tmp_path / f"iter_{it}.partial")
    checkpoint_dir.recover_partial_saves(str(tmp_path))
    assert [it for it, _ in checkpoint_dir.committed(str(tmp_path))][-2:] == [9, 12]
    assert not list(tmp_path.glob("*.partial"))


def test_eval_only_is_a_reader_and_changes_nothing_in_out_dir(char_data, tmp_path, forkserver):
    """--eval_only=True holds no lock, so it must not recover (a running run may be saving that .partial)
    nor write into the run's metrics.jsonl: it evaluates and prints, and out_dir is as it was."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=6, eval_interval=3)))
    shutil.copytree(tmp_path / "iter_6", tmp_path / "iter_9.partial")  # as if the run were saving iter_9 now
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume", eval_only=True)],
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 6: train loss" in r.stdout
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_metadata_of_the_wrong_shape_is_corrupt_not_a_traceback(char_data, tmp_path):
    """metadata.json that parses, with a valid checksum, but holds a string where the index has a list."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=3, eval_interval=3)))
    path = tmp_path / "iter_3" / "metadata.json"
    meta = json.loads(path.read_bytes())
    meta.pop("crc32")
    meta["files"] = "shard_00000.bin"
    path.write_bytes(checkpoint.metadata_bytes(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"metadata.json is inconsistent \(AttributeError: .*; "
                                                         r"no earlier checkpoint is left in this out_dir"):
        checkpoint_dir.open_checkpoint(str(tmp_path))


def test_a_tampered_index_is_refused_in_one_line(char_data, tmp_path):
    """metadata.json carries its own checksum: an index edit that every record's CRC would survive (a shifted
    offset) is refused, not loaded as uninitialised memory."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=3, eval_interval=3)))
    path = tmp_path / "iter_3" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["records"][0][1] += 8
    path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{path} is unreadable or fails its checksum; "):
        checkpoint_dir.open_checkpoint(str(tmp_path))
    del meta["crc32"]  # the same edit with a valid checksum (a bug, not a flipped bit): the index check stops it
    path.write_bytes(checkpoint.metadata_bytes(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"is inconsistent \(.*: elements 0-8 are missing\)"):
        checkpoint_dir.open_checkpoint(str(tmp_path))


def test_resume_iter_names_a_committed_checkpoint(char_data, tmp_path):
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=3, eval_interval=3))
    train(model_cfg, train_cfg)
    with pytest.raises(ConfigError, match=r"^.* has no committed checkpoint iter_5 \(committed iterations: 3\)$"):
        train(*from_argv(tiny_args(char_data, tmp_path, init_from="resume", resume_iter=5)))
    with pytest.raises(ConfigError, match="^resume_iter=3 picks a checkpoint to resume once; it needs --init_from=resume$"):
        from_argv(tiny_args(char_data, tmp_path, resume_iter=3))


def test_cli_resume_with_another_shape_is_refused(char_data, tmp_path, forkserver):
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=3))
    train(model_cfg, train_cfg)
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume"), "--n_layer=4"],
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("error: init_from=resume: n_layer=4 (checkpoint: 2) contradict the checkpoint's run; "
                        "drop them to resume, or start a new run in another out_dir\n")


def test_auto_refuses_another_model_over_an_existing_run_and_leaves_it_untouched(char_data, tmp_path, forkserver):
    """The same out_dir asked for another shape under init_from=auto: one line, nothing written."""
    first = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, max_iters=3, init_from="auto")],
                           timeout=120)
    assert first.returncode == 0 and "resumed" not in first.stdout, first.stderr[-2000:]
    before = digest(tmp_path)
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, max_iters=6, init_from="auto"),
                        "--n_layer=4"], timeout=120)
    assert r.returncode == 2
    assert r.stderr == (f"error: init_from=auto (over the checkpoint in {tmp_path}): n_layer=4 (checkpoint: 2) "
                        "contradict the checkpoint's run; drop them to resume, or start a new run in another "
                        "out_dir\n")
    assert digest(tmp_path) == before


# ------------------------------------------------------------ faults, with real processes
def digest(out_dir) -> dict:
    """What a resume would read: every checkpoint's files, by content hash."""
    import hashlib
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name not in ("metrics.jsonl", ".run.lock")]
    return {str(p.relative_to(out_dir)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("topology", ["local", "w2ep2-zero2"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(saved, forkserver, char_data, tmp_path, topology):
    shutil.copytree(saved(topology)[0], tmp_path / "run")  # a run stopped at iteration 3
    before = digest(tmp_path / "run")
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    args = [*tiny_args(char_data, tmp_path / "run", **{**OVER, "max_iters": 30, "init_from": "resume",
                                                        "learning_rate": 1e9, "min_lr": 0.0,
                                                        "always_save_checkpoint": False})]
    if json_name:
        args = ["--deepspeed_config", ds_json(tmp_path, json_name), *args, f"--ep_size={ep_size}"]
    res = forkserver.run_ranks(ranks, args)
    assert [r.returncode for r in res] == [3] * ranks, res[0].stderr[-2000:]
    line = res[0].stderr.strip().splitlines()[-1]
    prefix = "error: rank 0: " if ranks > 1 else "error: "  # a multi-rank job's lines name their rank
    assert line.startswith(prefix + "non-finite loss (nan) at iteration 4: training stopped and nothing of it was saved")
    assert digest(tmp_path / "run") == before  # every iter_N file untouched


@pytest.mark.parametrize("topology, signal_rank, copies", [("local", 0, 1), ("w2ep2-zero2", 1, 2)])
def test_sigterm_saves_and_resume_continues_exactly(forkserver, char_data, tmp_path, topology, signal_rank, copies):
    """SIGTERM to one rank mid-run: every rank finishes the step and saves; the resumed run
    takes the uninterrupted run's steps (bit for bit on one device, 1e-6 under DeepSpeed).
    Two copies back to back are what `kill -TERM -- -<pgid>` of the deepspeed launcher's group
    delivers (one directly, one forwarded): still one request, and the save happens."""
    import signal
    last = 40  # room for the signal to land mid-run: a one-device step takes ~20 ms, the poll 100 ms
    run_at(forkserver, topology, char_data, tmp_path / "full", tmp_path, max_iters=last, eval_interval=100)
    full = {r["iter"]: r["loss"] for r in train_rows(tmp_path / "full")}
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    args = tiny_args(char_data, tmp_path / "part", **{**OVER, "max_iters": last, "eval_interval": 100})
    if json_name:
        args = ["--deepspeed_config", ds_json(tmp_path, json_name), *args, f"--ep_size={ep_size}"]
    procs = start_ranks(ranks, args)
    try:
        wait_for_iter(tmp_path / "part", 4, procs)
        for _ in range(copies):
            procs[signal_rank].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * ranks, outs[0][1][-2000:]
    stop_line = next(line for line in outs[0][0].splitlines() if line.startswith("stopped by"))
    stopped_at = int(stop_line.split("before iteration ")[1].split(";")[0])
    assert 4 < stopped_at < last
    resume = [*args, "--init_from=resume"]
    for r in forkserver.run_ranks(ranks, resume):
        assert r.returncode == 0, r.stderr[-2000:]
    resumed = {r["iter"]: r["loss"] for r in train_rows(tmp_path / "part")[-(last + 1 - stopped_at):]}
    assert sorted(resumed) == list(range(stopped_at, last + 1))
    for it, loss in resumed.items():
        if json_name:
            assert loss == pytest.approx(full[it], rel=1e-6)
        else:
            assert loss == full[it]  # bit for bit


@pytest.mark.parametrize("victim, delay", [(0, 0.0), (0, 0.15), (1, 0.05), (1, 0.3)])
def test_kill_during_saves_then_resume_from_newest_complete(forkserver, char_data, tmp_path, victim, delay):
    """A save every iteration, so a kill -9 at these moments usually lands inside one. Whatever
    it hits, resume works, from the newest checkpoint whose files all exist."""
    import time
    args = ["--deepspeed_config", ds_json(tmp_path, "zero2"),
            *tiny_args(char_data, tmp_path / "run", **{**OVER, "max_iters": 1000, "eval_interval": 1}), "--ep_size=2"]
    procs = start_ranks(2, args)
    try:
        wait_for_iter(tmp_path / "run", 3, procs)
        time.sleep(delay)
        procs[victim].kill()
        procs[1 - victim].wait(timeout=60)  # the survivor's collectives fail: it ends too
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    committed = checkpoint_dir.open_checkpoint(str(tmp_path / "run")).meta["iter_num"]
    resume = [a if not a.startswith("--max_iters") else f"--max_iters={committed + 1}" for a in args]
    res = forkserver.run_ranks(2, [*resume, "--init_from=resume"])
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-3000:]
    assert f"resuming iteration {committed} from {tmp_path / 'run' / f'iter_{committed}'} (same topology)" \
        in res[0].stdout
    dirs = sorted(p.name for p in (tmp_path / "run").glob("iter_*"))
    assert len(dirs) <= OVER.get("keep_last", 2) and not any(d.endswith(".partial") for d in dirs), dirs


# ------------------------------------------------------------ full and read-only disks, on a real tmpfs
def in_mount_namespace(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Run a bash script in a mount namespace of its own (root here), so that it can mount a small tmpfs."""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-euc", script], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(char_data, tmp_path):
    """The tiny model's checkpoint is ~1 MiB: a 1.6 MiB tmpfs holds the one at iteration 3, not the one at 6."""
    mnt, res = tmp_path / "mnt", tmp_path / "res"
    mnt.mkdir()
    res.mkdir()
    train = f"{sys.executable} launch/train.py " + " ".join(tiny_args(char_data, mnt / "run", max_iters=6))
    in_mount_namespace(f"""
        mount -t tmpfs -o size=1600k tmpfs {mnt}
        {train} > {res}/out1 2> {res}/err1 && echo 0 > {res}/rc1 || echo $? > {res}/rc1
        ls -a {mnt}/run > {res}/ls1
        mount -o remount,size=8m {mnt}
        {train} --init_from=resume --max_iters=7 > {res}/out2 2> {res}/err2 && echo 0 > {res}/rc2 || echo $? > {res}/rc2
        mount -o remount,ro {mnt}
        {train} --out_dir={mnt}/new > {res}/out3 2> {res}/err3 && echo 0 > {res}/rc3 || echo $? > {res}/rc3
    """, tmp_path)
    read = {name: (res / name).read_text() for name in ("rc1", "err1", "ls1", "rc2", "err2", "out2", "rc3", "err3")}
    assert read["rc1"].strip() == "2", read["err1"][-2000:]
    assert read["err1"].startswith(f"error: cannot save the checkpoint of iteration 6: {mnt / 'run' / 'iter_6.partial'}"
                                   f"/shard_00000.bin: no space left on device (this rank's share needs "), read["err1"]
    assert read["err1"].endswith("; the last committed checkpoint, iter_3, is intact; free space or choose another "
                                 "--out_dir, then continue with --init_from=resume\n")
    assert read["err1"].count("\n") == 1
    assert read["ls1"].split() == [".", "..", ".run.lock", "iter_3", "metrics.jsonl"]  # no temporary file left
    assert read["rc2"].strip() == "0", read["err2"][-2000:]
    assert "step 3: train loss" in read["out2"] and "step 6: train loss" in read["out2"]
    assert read["rc3"].strip() == "2"
    assert read["err3"] == (f"error: out_dir '{mnt / 'new'}' is not writable (read-only file system): checkpoints and "
                            "metrics go there; choose another --out_dir\n")


def test_a_save_that_fails_for_another_reason_than_the_disk_says_so(tmp_path, capsys):
    """Only a disk error gets the disk's advice; anything else is a bug, with its traceback kept."""
    def pieces():
        raise KeyError("exp_avg")
        yield
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint_dir.save(str(tmp_path), {"iter_num": 3}, pieces(), rank=0, keep_last=1)
    assert str(e.value) == ("cannot save the checkpoint of iteration 3: rank 0: KeyError: 'exp_avg'; no checkpoint "
                            "was committed; this is a bug, not the disk (its traceback is above): please report it, then "
                            "continue with --init_from=resume")
    assert "Traceback" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no staging directory left


def test_a_staging_directory_missing_on_a_rank_says_the_out_dir_is_not_shared(tmp_path):
    """ENOENT while a rank writes its share: rank 0 made the staging directory, this rank cannot see it. The
    start-up check catches an out_dir local to one node; this is what a save says if it changes mid-run."""
    class StagingGone(checkpoint_dir.SingleProcess):  # rank 0's directory, out of this rank's sight
        def broadcast(self, obj):
            shutil.rmtree(checkpoint_dir.staging_dir(str(tmp_path), 3), ignore_errors=True)
            return obj
    pieces = [("model/w", 0, torch.ones(4))]
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint_dir.save(str(tmp_path), {"iter_num": 3}, pieces, rank=0, keep_last=1, collectives=StagingGone())
    assert str(e.value) == (f"cannot save the checkpoint of iteration 3: {tmp_path}/iter_3.partial/shard_00000.bin: "
                            "No such file or directory (this rank's share needs 0.0 MiB); no checkpoint was committed; "
                            "it is not there on this node: a multi-node run needs an out_dir that every node shares, "
                            "then continue with --init_from=resume")


# ------------------------------------------------------------ memory: a rank holds its share, never the whole
def test_no_rank_holds_more_than_its_share_during_a_save_or_a_resharded_load(tmp_path, forkserver):
    """Real ranks (bench/bench_ckpt.py's): a 19M-parameter MoE saved at 2 ranks (ZeRO-2, ep_size 2) and
    loaded at 4. Each rank's resident memory may grow by at most 1.25x its share of the state (12 bytes per
    parameter / world) plus 24 MiB; gathering whole tensors, as the format before this one did, adds the whole
    state (226 MiB) to every rank and fails this."""
    r = forkserver.run(["bench/bench_ckpt.py", "--worlds", "2", "--load_worlds", "4", "--json",
                        str(tmp_path / "runs.json"), "--timeout", "400", "--n_layer=2", "--n_embd=384", "--n_head=4",
                        "--vocab_size=512"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [(op, len(ranks)) for op, ranks in runs] == [("save", 2), ("load 2->4", 4)]
    for op, ranks in runs:
        for rank in ranks:
            share = rank["share_bytes"] / 2**20
            assert rank["added_peak_mib"] <= 1.25 * share + 24, (op, rank["rank"], rank["added_peak_mib"], share)
    assert runs[0][1][0]["state_bytes"] > 200 * 2**20  # large enough that the whole state would not fit the bound
    assert runs[0][1][0]["bytes_written"] <= 1.01 * runs[0][1][0]["state_bytes"] + 2**20  # the state, written once


# ------------------------------------------------------------ fp16: the loss scale travels with the checkpoint
def set_saved_loss_scale(out_dir, scale: float):
    """Stand in for a run whose scaler lowered the scale after overflows: rewrite the newest checkpoint's."""
    path = checkpoint_dir.open_checkpoint(str(out_dir)).directory / checkpoint.METADATA
    meta = json.loads(path.read_text())
    del meta["crc32"]
    meta["loss_scale"]["scale"] = scale
    if "torch" in meta["loss_scale"]:
        meta["loss_scale"]["torch"]["scale"] = scale
    path.write_bytes(checkpoint.metadata_bytes(meta))


def test_the_fp16_loss_scale_survives_a_resume(char_data, tmp_path, monkeypatch):
    """torch computes fp16 on any CPU, so forcing the capability makes this hold everywhere (as test_precision)."""
    from nanomoe_ds import precision
    monkeypatch.setattr(precision, "supports", lambda kind: precision.Support(bfloat16=True, float16=True))
    train(*from_argv(tiny_args(char_data, tmp_path, dtype="float16", max_iters=3)))
    set_saved_loss_scale(tmp_path, 1024.0)
    train(*from_argv(tiny_args(char_data, tmp_path, dtype="float16", max_iters=6, init_from="resume")))
    assert checkpoint_dir.open_checkpoint(str(tmp_path)).meta["loss_scale"]["scale"] == 1024.0  # not back to 2**16


@pytest.mark.skipif(not __import__("nanomoe_ds.precision").precision.supports("cpu").float16,
                    reason="DeepSpeed refuses fp16 on a CPU without native fp16 (AVX512-FP16/AMX), e.g. an AMD EPYC")
def test_the_fp16_loss_scale_survives_a_resharded_deepspeed_resume(char_data, tmp_path):
    """DeepSpeed fp16 at 2 ranks, ZeRO-2, ep_size 2, resumed at ep_size 1: DeepSpeed's scaler continues at the saved
    scale (before the sharded format it restarted at 2**16)."""
    ds = str(tmp_path / "fp16.json")
    cfg = json.loads(open(ds_json(tmp_path, "zero2")).read())
    cfg.pop("bf16", None)
    cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    open(ds, "w").write(json.dumps(cfg))
    args = ["--deepspeed_config", ds, *tiny_args(char_data, tmp_path / "run", **{**OVER, "max_iters": 3})]
    for r in run_ranks(2, [*args, "--ep_size=2"]):
        assert r.returncode == 0, r.stderr[-2000:]
    set_saved_loss_scale(tmp_path / "run", 1024.0)
    resume = [a if not a.startswith("--max_iters") else "--max_iters=6" for a in args]
    res = run_ranks(2, [*resume, "--init_from=resume", "--ep_size=1"])
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-2000:]
    assert "resharded from deepspeed world 2, ep_size 2" in res[0].stdout
    assert checkpoint_dir.open_checkpoint(str(tmp_path / "run")).meta["loss_scale"]["scale"] == 1024.0


def test_a_stale_directory_at_a_saved_iteration_is_moved_aside_and_nothing_committed_is_lost(char_data, tmp_path):
    """iter_17/ without metadata (a crash's, an older format's, a copy by hand) where a resumed run saves:
    the save succeeds, the stale directory is kept aside with its contents, and the rewind discards only the
    abandoned timeline's newer checkpoint (iter_20), after iter_17 is in place."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=20, eval_interval=5, keep_last=4)))
    assert [it for it, _ in checkpoint_dir.committed(str(tmp_path))] == [5, 10, 15, 20]
    (tmp_path / "iter_17").mkdir()
    (tmp_path / "iter_17" / "notes.txt").write_text("mine")
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=17, eval_interval=17, keep_last=4,
                               init_from="resume", resume_iter=15)))
    assert [it for it, _ in checkpoint_dir.committed(str(tmp_path))] == [5, 10, 15, 17]
    assert (tmp_path / "iter_17.stale" / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob("*.discard")) and not list(tmp_path.glob("*.partial"))


def test_a_complete_partial_beside_a_stale_directory_of_its_iteration_is_installed(char_data, tmp_path):
    """A complete iter_6.partial next to a stale iter_6/ without metadata: recovery installs the partial
    and keeps the stale directory aside (it raised a traceback)."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=6, eval_interval=3)))
    (tmp_path / "iter_6").rename(tmp_path / "iter_6.partial")
    (tmp_path / "iter_6").mkdir()
    checkpoint_dir.recover_partial_saves(str(tmp_path))
    assert [it for it, _ in checkpoint_dir.committed(str(tmp_path))] == [3, 6]
    assert (tmp_path / "iter_6.stale").is_dir()


def test_eval_only_evaluates_a_checkpoint_off_the_eval_interval(char_data, tmp_path, forkserver):
    """A stop's checkpoint (or one saved under another eval_interval) is not a multiple of eval_interval: an
    eval-only run evaluated nothing there and exited 0."""
    train(*from_argv(tiny_args(char_data, tmp_path, max_iters=6, eval_interval=3)))
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume", eval_only=True,
                                                     eval_interval=4)], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 6: train loss" in r.stdout, r.stdout
