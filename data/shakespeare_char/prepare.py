"""Prepare tiny Shakespeare for character-level language modelling.

Adapted from nanoGPT's data/shakespeare_char/prepare.py (Andrej Karpathy, MIT).
Characters map straight to integer ids (no BPE). Writes train.bin and val.bin
(np.uint16 token ids) plus meta.pkl, which holds the encoder/decoder that
sampling needs to turn ids back into text, and tokens.json (each split's token
count and largest id, which training checks instead of reading the .bin files).

    python data/shakespeare_char/prepare.py                 # download input.txt
    python data/shakespeare_char/prepare.py --input FILE    # use a local copy
"""
import os
import pickle
import sys

import numpy as np

# data/ holds prepare_common.py, shared by every data/*/prepare.py; put it on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# download is unused here but tests call it through this module
from prepare_common import (die, download, forget_token_stats, parse_input_args, read_text,  # noqa: E402,F401
                            split_stats, tinyshakespeare_path, write_token_stats)

HERE = os.path.dirname(os.path.abspath(__file__))


def prepare(text, out_dir):
    """Build the char vocab, split 90/10, write train.bin/val.bin/meta.pkl/tokens.json."""
    print(f"length of dataset in characters: {len(text):,}")
    chars = sorted(set(text))
    vocab_size = len(chars)
    print("all the unique characters:", "".join(chars))
    print(f"vocab size: {vocab_size:,}")
    if vocab_size > 2**16:
        die(f"{vocab_size:,} distinct characters do not fit in uint16 token ids")

    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9):]
    if not train_text or not val_text:
        die(f"input has only {n} characters, too few for a 90/10 train/val split")

    train_ids = np.array([stoi[c] for c in train_text], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in val_text], dtype=np.uint16)
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    os.makedirs(out_dir, exist_ok=True)
    forget_token_stats(out_dir)
    train_ids.tofile(os.path.join(out_dir, "train.bin"))
    val_ids.tofile(os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab_size, "itos": itos, "stoi": stoi}, f)
    write_token_stats(out_dir, {"train": split_stats(train_ids), "val": split_stats(val_ids)})


def main(argv=None):
    # --input PATH (default: download input.txt next to this script), --out_dir DIR
    args = parse_input_args(argv, __doc__.splitlines()[0], HERE, "train.bin, val.bin, meta.pkl and tokens.json")
    prepare(read_text(tinyshakespeare_path(args.input, HERE)), args.out_dir)


if __name__ == "__main__":
    main()

# length of dataset in characters: 1,115,394
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
