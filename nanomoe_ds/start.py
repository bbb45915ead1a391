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

from . import checkpoint, checkpoint_dir, launch_env, resume, run_lock
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


def decide(train_cfg: TrainConfig, given: frozenset) -> Start:
    """Take the run's lock (a writer), pick the start on rank 0, and tell every rank. Resolves train_cfg.init_from
    (auto becomes resume or scratch) and, for a resume, train_cfg.resume_iter. The caller releases the lock."""
    rank = launch_env.process_rank(os.environ)
    if not train_cfg.eval_only:
        checkpoint_dir.check_writable(train_cfg.out_dir, rank)  # every rank: each writes its own shard there
    asked = f"init_from={train_cfg.init_from}"
    if train_cfg.init_from == "auto":
        asked += f" (over the checkpoint in {train_cfg.out_dir})"
    # A resume that names no --resume_iter may fall back past a checkpoint that fails to verify.
    may_fall_back = train_cfg.resume_iter == -1 and not train_cfg.eval_only  # a reader never moves anything

    def lock_and_choose() -> tuple[str, int, str | None]:
        if train_cfg.eval_only:  # a reader: no lock
            return *choose_start(train_cfg), None
        lock = run_lock.RunLock.acquire(train_cfg.out_dir)  # one writer per out_dir; the kernel frees it however we end
        return *choose_start(train_cfg), lock.text
    train_cfg.init_from, iteration, lock_text = rank0_decides(lock_and_choose, rank)
    if lock_text is not None:
        check_out_dir_shared(train_cfg.out_dir, lock_text, rank)
    if train_cfg.init_from == "resume":
        train_cfg.resume_iter = iteration
    return Start(rank, asked, iteration, may_fall_back, given)


def choose_start(train_cfg: TrainConfig) -> tuple[str, int]:
    """Rank 0, holding the run's lock: finish or clear what a killed save left, then resolve init_from=auto
    and pick the checkpoint to start from: the one to resume, or a source run's newest (its iteration;
    -1 for an older version's ckpt.pt, or a source that is not a run of ours)."""
    # A reader holds no lock: a run may be saving.
    if train_cfg.init_from in ("resume", "auto") and not train_cfg.eval_only:
        checkpoint_dir.recover_partial_saves(train_cfg.out_dir)
    init_from = resolve_init_from(train_cfg.init_from, is_run_dir(train_cfg.out_dir), train_cfg.out_dir)
    iteration = train_cfg.resume_iter
    if init_from == "resume" and iteration == -1:
        found = checkpoint_dir.committed(train_cfg.out_dir)
        iteration = found[-1][0] if found else -1  # none: an older version's ckpt.pt, or the refusal on opening
    elif init_source(init_from) == "run":  # every rank must load the same one, even while that run saves
        found = checkpoint_dir.committed(init_from)
        iteration = found[-1][0] if found else -1
    return init_from, iteration


def check_out_dir_shared(out_dir: str, lock_text: str, rank: int):
    """Every rank reads the lock file rank 0 just wrote; any that can't stops every rank in one line, before
    training (not an eval_interval later, at the first save)."""
    problem = first_error(run_lock.shared_out_dir_problem(out_dir, lock_text, rank))
    if problem is not None:
        raise ConfigError(problem)


def open_resumed(model_cfg: GPTConfig, train_cfg: TrainConfig, start: Start
                 ) -> tuple[GPTConfig, TrainConfig, checkpoint.Checkpoint | None, resume.Resumed | None]:
    """For a resume: the checkpoint's metadata opened on every rank (tensors are read by engine.load), and the
    configs its run continues with (resume.reconcile), its notes printed on rank 0. Otherwise, as given."""
    if train_cfg.init_from != "resume":
        return model_cfg, train_cfg, None, None
    ckpt = resume.open_to_resume(train_cfg.out_dir, train_cfg.resume_iter, start.may_fall_back, start.rank,
                                 start.set_aside)
    resumed = resume.reconcile(ckpt.meta, model_cfg, train_cfg, start.given, start.asked)
    for line in resumed.notes() if start.rank == 0 else []:
        print(line, flush=True)
    return resumed.model_cfg, resumed.train_cfg, ckpt, resumed


def build_model(model_cfg: GPTConfig, train_cfg: TrainConfig, source_iter: int = -1) -> GPT:
    """A new model (scratch, resume), or one started from a source: a dense one (upcycled with use_moe=True), or
    an exported MoE, which continues as it is. `source_iter` picks a run source's checkpoint (rank 0's choice;
    -1: its newest)."""
    if train_cfg.init_from not in ("scratch", "resume"):  # a GPT-2, a dense run's out_dir, an exported MoE
        source = load_source(train_cfg.init_from, model_cfg, source_iter)
        exported = init_source(train_cfg.init_from) == "export"
        if source.config.use_moe and not exported:
            raise ConfigError(f"init_from '{train_cfg.init_from}' is an MoE run; init_from=resume continues it "
                              "(with out_dir set to it), and upcycling starts from a dense model")
        if model_cfg.block_size > source.config.block_size:
            raise ConfigError(f"block_size ({model_cfg.block_size}) exceeds the context of init_from "
                              f"'{train_cfg.init_from}' "
                              f"({source.config.block_size}); use block_size <= {source.config.block_size}")
        if exported or not model_cfg.use_moe:  # an exported MoE continues as it is (a new run: a new optimizer)
            return source
        return upcycle(source, model_cfg, train_cfg.upcycle_router_std, train_cfg.upcycle_noise, seed=train_cfg.seed)
    meta = load_meta(resolve_data_dir(train_cfg.dataset, train_cfg.data_dir))
    # nanoGPT: the data's vocab
    model_cfg.vocab_size, why = choose_vocab(meta, model_cfg.vocab_size, GPTConfig.vocab_size)
    if why and launch_env.process_rank(os.environ) == 0:
        print(why, flush=True)
    torch.manual_seed(train_cfg.seed)
    return GPT(model_cfg)


def prepare_model(model_cfg: GPTConfig, train_cfg: TrainConfig, begin: Start, data_dir) -> GPT:
    """The model to train, on the CPU: built or loaded (build_model), cropped, its blocks checkpointed."""
    model = build_model(model_cfg, train_cfg, begin.iteration)
    check_tokens_fit(data_dir, model.config.vocab_size)
    if model_cfg.block_size < model.config.block_size:
        model.crop_block_size(model_cfg.block_size)
    if train_cfg.activation_checkpointing:
        checkpoint_blocks_(model)
    if begin.rank == 0:
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, "
              f"{model.get_num_params(active=True) / 1e6:.2f}M active per token", flush=True)
    return model


# ---------------------------------------------------------------- whole models (sampling, export, init_from)
def model_from_checkpoint(ckpt: checkpoint.Checkpoint, dropout: float | None = None) -> GPT:
    """The model a checkpoint holds, whole on the CPU; checkpoints older than the `activation` key get exact GELU."""
    args = ckpt.meta["model_args"] if dropout is None else {**ckpt.meta["model_args"], "dropout": dropout}
    model = GPT(GPTConfig(**args))
    model.load_state_dict(ckpt.model_state(model))
    return model


def load_source(init_from: str, model_cfg: GPTConfig, iteration: int = -1) -> GPT:
    """The model an init_from source names (config.init_source): GPT-2 through transformers, an MoE exported for
    transformers, or a run of ours (its checkpoint `iteration`, -1 for the newest). The source decides the
    model's shape; `model_cfg` (the run's) its dropout and, for an export, the training-only keys."""
    kind = init_source(init_from)
    if kind == "export":
        from .hf_export import load_export  # imports transformers
        return load_export(init_from, model_cfg)
    if kind == "hf":
        return GPT.from_pretrained(init_from, {"dropout": model_cfg.dropout})
    return model_from_checkpoint(checkpoint_dir.open_checkpoint(init_from, iteration), dropout=model_cfg.dropout)
