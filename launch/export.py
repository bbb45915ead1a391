"""Write a run's checkpoint out of its sharded format: one consolidated .pt file, or a directory transformers loads.

    python launch/export.py out-shakespeare-char model.pt                 # newest checkpoint, with AdamW's state
    python launch/export.py out-shakespeare-char model.pt --weights_only  # the model alone (a third of the size)
    python launch/export.py out-shakespeare-char model.pt --iter=2000     # an older committed checkpoint
    python launch/export.py out-shakespeare-char-moe hf-model --format=hf # for transformers (docs/export.md)

--format=pt (the default) writes the single-file format of earlier versions (`ckpt.pt`): `model` (a
state_dict), `model_args`, `config`, `iter_num`, and unless --weights_only the AdamW
moments, topology and rank 0's RNG state, so that a directory holding it as `ckpt.pt`
also resumes. This process holds the whole model: the export is for people who want one file.

--format=hf writes a directory for `AutoModelForCausalLM.from_pretrained` (an MoE with
trust_remote_code=True; a dense run as a stock GPT2LMHeadModel): safetensors shards, config,
tokenizer and a model card (nanomoe_ds/hf_export.py). It streams, holding a chunk at a time.
"""
import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.config import ArgumentParser  # noqa: E402
from nanomoe_ds.launch_env import run_script  # noqa: E402


def export(out_dir: str, path: str, iteration: int = -1, weights_only: bool = False) -> str:
    import torch
    from nanomoe_ds import checkpoint, train_state
    from nanomoe_ds.checkpoint_dir import open_checkpoint
    from nanomoe_ds.start import model_from_checkpoint
    ckpt = open_checkpoint(out_dir, iteration)
    model = model_from_checkpoint(ckpt)
    payload = {"model": model.state_dict(), **{k: ckpt.meta[k] for k in ("model_args", "config", "iter_num")}}
    if not weights_only:
        moments = {n: {kind: ckpt.whole(checkpoint.tensor_key(kind, n)) for kind in train_state.MOMENTS}
                   for n, _ in model.named_parameters() if ckpt.has(checkpoint.tensor_key("exp_avg", n))}
        payload.update({k: ckpt.meta[k] for k in ("best_val_loss", "train_s", "topology") if k in ckpt.meta},
                       optimizer_state={"step": ckpt.meta["optimizer_step"], "moments": moments}, rng=ckpt.rng(0))
        if ckpt.meta.get("loss_scale"):
            payload["scaler"] = {"scale": ckpt.meta["loss_scale"]["scale"]}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return f"wrote {path}: iteration {ckpt.meta['iter_num']} of {ckpt.directory}" + \
        (" (weights only)" if weights_only else "")


def export_hf(out_dir: str, path: str, iteration: int, dtype: str, max_shard_bytes: int) -> str:
    from nanomoe_ds import hf_export
    from nanomoe_ds.checkpoint_dir import open_checkpoint
    ckpt = open_checkpoint(out_dir, iteration)
    return hf_export.export_hf(ckpt, path, Path(out_dir) / "metrics.jsonl", dtype, max_shard_bytes)


def size_in_bytes(text: str) -> int:
    """A size as transformers' max_shard_size spells it: 5GB, 500MB (powers of 10), 2GiB (of 2)."""
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "TIB": 2**40}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", text.strip())
    unit = (match.group(2).upper() or "B") if match else ""
    if unit not in units or float(match.group(1)) * units[unit] < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5GB, 500MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * units[unit])


def main(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("out_dir", help="the run's out_dir")
    p.add_argument("path", help="the file (--format=pt) or the new directory (--format=hf) to write")
    p.add_argument("--format", default="pt", choices=["pt", "hf"], help="pt: one file; hf: for transformers")
    p.add_argument("--iter", type=int, default=-1, help="a committed iteration (default: the newest)")
    p.add_argument("--weights_only", action="store_true", help="--format=pt: leave out the optimizer state")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="--format=hf: the weights' dtype (default float32, as trained)")
    p.add_argument("--max_shard_size", default=None, type=size_in_bytes,
                   help="--format=hf: the largest weights file, e.g. 500MB or 2GiB (default 5GB)")
    a = p.parse_args(argv)
    if a.format == "pt":
        for flag in ("dtype", "max_shard_size"):
            if getattr(a, flag) is not None:
                p.error(f"--{flag} is for --format=hf; the .pt format keeps the checkpoint's fp32 in one file")
        print(export(a.out_dir, a.path, a.iter, a.weights_only))
        return
    if a.weights_only:
        p.error("--weights_only is for --format=pt; --format=hf writes the weights alone")
    print(export_hf(a.out_dir, a.path, a.iter, a.dtype or "float32", a.max_shard_size or 5 * 10**9))


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
