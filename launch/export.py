"""Write a run's checkpoint as one consolidated file: whole fp32 tensors by name, nanoGPT style.

    python launch/export.py out-shakespeare-char model.pt                 # newest checkpoint, with AdamW's state
    python launch/export.py out-shakespeare-char model.pt --weights_only  # the model alone (a third of the size)
    python launch/export.py out-shakespeare-char model.pt --iter=2000     # an older committed checkpoint

The file is the single-file format of earlier versions (`ckpt.pt`): `model` (a
state_dict), `model_args`, `config`, `iter_num`, and unless --weights_only the AdamW
moments, topology and rank 0's RNG state, so that a directory holding it as `ckpt.pt`
also resumes. This process holds the whole model: the export is for people who want one file.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.config import ArgumentParser  # noqa: E402
from nanomoe_ds.launch_env import run_script  # noqa: E402


def export(out_dir: str, path: str, iteration: int = -1, weights_only: bool = False) -> str:
    import torch
    from nanomoe_ds import checkpoint, train_state
    ckpt = checkpoint.open_checkpoint(out_dir, iteration)
    model = checkpoint.model_from_checkpoint(ckpt)
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


def main(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("out_dir", help="the run's out_dir")
    p.add_argument("path", help="the file to write")
    p.add_argument("--iter", type=int, default=-1, help="a committed iteration (default: the newest)")
    p.add_argument("--weights_only", action="store_true", help="leave out the optimizer state")
    a = p.parse_args(argv)
    print(export(a.out_dir, a.path, a.iter, a.weights_only))


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
