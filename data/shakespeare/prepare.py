"""Prepare tiny Shakespeare with the GPT-2 BPE tokenizer.

Adapted from nanoGPT's data/shakespeare/prepare.py (Andrej Karpathy, MIT).
Writes train.bin and val.bin as np.uint16 token ids; the GPT-2 vocab (50257)
fits in uint16, and no meta.pkl is written, so train/sample fall back to GPT-2.
tokens.json records each split's token count and largest id for training's checks.

    python data/shakespeare/prepare.py                 # download input.txt
    python data/shakespeare/prepare.py --input FILE    # use a local copy

`prepare(text, out_dir, encode=...)` takes any str -> list[int] tokenizer, so
tests can run offline (tiktoken fetches the GPT-2 BPE file on first use).
"""
import os
import sys

import numpy as np

# data/ holds prepare_common.py, shared by every data/*/prepare.py; put it on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# download is unused here but tests call it through this module
from prepare_common import (die, download, forget_token_stats, gpt2_encoding, parse_input_args,  # noqa: E402,F401
                            read_text, split_stats, tinyshakespeare_path, write_token_stats)

HERE = os.path.dirname(os.path.abspath(__file__))


def gpt2_encode():
    # encode_ordinary: plain text must never turn into special tokens
    return gpt2_encoding().encode_ordinary


def prepare(text, out_dir, encode=None):
    """Split 90/10 by characters, encode each part, write train.bin/val.bin and tokens.json.

    Returns (train_ids, val_ids) as uint16 arrays.
    """
    n = len(text)
    train_text, val_text = text[: int(n * 0.9)], text[int(n * 0.9):]
    if not train_text or not val_text:
        die(f"input has only {n} characters, too few for a 90/10 train/val split")
    if encode is None:
        encode = gpt2_encode()

    ids = {}
    for split, part in (("train", train_text), ("val", val_text)):
        raw = encode(part)
        # a larger vocab would wrap around silently in uint16
        if raw and max(raw) >= 2**16:
            die(f"token id {max(raw)} does not fit in uint16")
        ids[split] = np.array(raw, dtype=np.uint16)
        print(f"{split} has {len(raw):,} tokens")

    os.makedirs(out_dir, exist_ok=True)
    forget_token_stats(out_dir)
    for split, arr in ids.items():
        arr.tofile(os.path.join(out_dir, f"{split}.bin"))
    write_token_stats(out_dir, {split: split_stats(arr) for split, arr in ids.items()})
    return ids["train"], ids["val"]


def main(argv=None):
    # --input PATH (default: download input.txt next to this script), --out_dir DIR
    args = parse_input_args(argv, __doc__.splitlines()[0], HERE, "train.bin, val.bin and tokens.json")
    prepare(read_text(tinyshakespeare_path(args.input, HERE)), args.out_dir)


if __name__ == "__main__":
    main()

# train has 301,966 tokens
# val has 36,059 tokens
