"""Where a run starts: init_from (scratch, resume, auto, a run of ours, GPT-2), the run's lock, and the model.

Rank 0 decides, holding the run's lock, and tells every rank (consensus.rank0_decides):
ranks that each looked for the newest checkpoint could see different ones (a save being
finished, a file system's stale directory cache). What a resume keeps and which
checkpoint it falls back to is resume.py's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import checkpoint, launch_env, resume, run_lock
from .config import ConfigError, GPTConfig, TrainConfig, init_source, is_run_dir, resolve_init_from
from .consensus import first_error, rank0_decides
from .activation_checkpoint import checkpoint_blocks_
from .data import check_tokens_fit, choose_vocab, load_meta, resolve_data_dir
from .model import GPT
from .upcycle import upcycle


@dataclass
class Start:
    """Where rank 0 decided this process starts."""
    rank: int
    asked: str  # the init_from the user gave, for messages
    iteration: int  # the checkpoint rank 0 chose: to resume, or in a source run
    may_fall_back: bool  # past a resumed checkpoint that fails to verify (resume.py)
    given: frozenset  # the keys the preset and the command line set (resume.reconcile)
    set_aside: list = field(default_factory=list)  # checkpoints a resume moved aside, for its record


def decide(t: TrainConfig, given: frozenset) -> Start:
    """Take the run's lock (a writer), pick the start on rank 0, and tell every rank. Resolves t.init_from
    (auto becomes resume or scratch) and, for a resume, t.resume_iter. The caller releases the lock."""
    rank = launch_env.process_rank(os.environ)
    if not t.eval_only:
        checkpoint.check_writable(t.out_dir, rank)  # every rank: each writes its own shard there
    asked = f"init_from={t.init_from}" + (f" (over the checkpoint in {t.out_dir})" if t.init_from == "auto" else "")
    # A resume that names no --resume_iter may fall back past a checkpoint that fails to verify.
    may_fall_back = t.resume_iter == -1 and not t.eval_only  # a reader never moves anything

    def lock_and_choose() -> tuple[str, int, str | None]:
        if t.eval_only:  # a reader: no lock
            return *choose_start(t), None
        lock = run_lock.RunLock.acquire(t.out_dir)  # one writer per out_dir; the kernel frees it however we end
        return *choose_start(t), lock.text
    t.init_from, iteration, lock_text = rank0_decides(lock_and_choose, rank)
    if lock_text is not None:
        check_out_dir_shared(t.out_dir, lock_text, rank)
    if t.init_from == "resume":
        t.resume_iter = iteration
    return Start(rank, asked, iteration, may_fall_back, given)


def choose_start(t: TrainConfig) -> tuple[str, int]:
    """Rank 0, holding the run's lock: finish or clear what a killed save left, then resolve init_from=auto
    and pick the checkpoint to start from: the one to resume, or a source run's newest (its iteration;
    -1 for an older version's ckpt.pt, or a source that is not a run of ours)."""
    if t.init_from in ("resume", "auto") and not t.eval_only:  # a reader holds no lock: a run may be saving
        checkpoint.recover_partial_saves(t.out_dir)
    init_from = resolve_init_from(t.init_from, is_run_dir(t.out_dir), t.out_dir)
    iteration = t.resume_iter
    if init_from == "resume" and iteration == -1:
        found = checkpoint.committed(t.out_dir)
        iteration = found[-1][0] if found else -1  # none: an older version's ckpt.pt, or the refusal on opening
    elif init_source(init_from) == "run":  # every rank must load the same one, even while that run saves
        found = checkpoint.committed(init_from)
        iteration = found[-1][0] if found else -1
    return init_from, iteration


def check_out_dir_shared(out_dir: str, lock_text: str, rank: int):
    """Every rank reads the lock file rank 0 just wrote; any that can't stops every rank in one line, before
    training (not an eval_interval later, at the first save)."""
    problem = first_error(run_lock.shared_out_dir_problem(out_dir, lock_text, rank))
    if problem is not None:
        raise ConfigError(problem)


def open_resumed(m: GPTConfig, t: TrainConfig, start: Start
                 ) -> tuple[GPTConfig, TrainConfig, checkpoint.Checkpoint | None, resume.Resumed | None]:
    """For a resume: the checkpoint's metadata opened on every rank (tensors are read by engine.load), and the
    configs its run continues with (resume.reconcile), its notes printed on rank 0. Otherwise, as given."""
    if t.init_from != "resume":
        return m, t, None, None
    ckpt = resume.open_to_resume(t.out_dir, t.resume_iter, start.may_fall_back, start.rank, start.set_aside)
    resumed = resume.reconcile(ckpt.meta, m, t, start.given, start.asked)
    for line in resumed.notes() if start.rank == 0 else []:
        print(line, flush=True)
    return resumed.model_cfg, resumed.train_cfg, ckpt, resumed


def build_model(m: GPTConfig, t: TrainConfig, source_iter: int = -1) -> GPT:
    """A new model (scratch, resume), or one started from a dense source: with use_moe=True, upcycled.
    `source_iter` picks a run source's checkpoint (rank 0's choice; -1: its newest)."""
    if t.init_from not in ("scratch", "resume"):  # a GPT-2 (name or HF directory) or a dense run's out_dir
        dense = checkpoint.load_source(t.init_from, m.dropout, source_iter)
        if dense.config.use_moe:
            raise ConfigError(f"init_from '{t.init_from}' is an MoE run; init_from=resume continues it "
                              "(with out_dir set to it), and upcycling starts from a dense model")
        if m.block_size > dense.config.block_size:
            raise ConfigError(f"block_size ({m.block_size}) exceeds the context of init_from '{t.init_from}' "
                              f"({dense.config.block_size}); use block_size <= {dense.config.block_size}")
        if not m.use_moe:
            return dense
        return upcycle(dense, m, t.upcycle_router_std, t.upcycle_noise, seed=t.seed)
    meta = load_meta(resolve_data_dir(t.dataset, t.data_dir))
    m.vocab_size, why = choose_vocab(meta, m.vocab_size, GPTConfig.vocab_size)  # nanoGPT: the data's vocab
    if why and launch_env.process_rank(os.environ) == 0:
        print(why, flush=True)
    torch.manual_seed(t.seed)
    return GPT(m)


def prepare_model(m: GPTConfig, t: TrainConfig, begin: Start, data_dir) -> GPT:
    """The model to train, on the CPU: built or loaded (build_model), cropped, its blocks checkpointed."""
    model = build_model(m, t, begin.iteration)
    check_tokens_fit(data_dir, model.config.vocab_size)
    if m.block_size < model.config.block_size:
        model.crop_block_size(m.block_size)
    if t.activation_checkpointing:
        checkpoint_blocks_(model)
    if begin.rank == 0:
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, "
              f"{model.get_num_params(active=True) / 1e6:.2f}M active per token", flush=True)
    return model
