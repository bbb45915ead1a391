"""Prepare tiny Shakespeare with the GPT-2 BPE tokenizer.

Adapted from nanoGPT's data/shakespeare/prepare.py (Andrej Karpathy, MIT).
Writes train.bin and val.bin as np.uint16 token ids; the GPT-2 vocab (50257)
fits in uint16, and no meta.pkl is written, so train/sample fall back to GPT-2.

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
from prepare_common import die, download, gpt2_encoding, parse_input_args, tinyshakespeare_path, read_text  # noqa: E402,F401 (download: tests call it)

HERE = os.path.dirname(os.path.abspath(__file__))


def gpt2_encode():
    # encode_ordinary: plain text must never turn into special tokens
    return gpt2_encoding().encode_ordinary


def prepare(text, out_dir, encode=None):
    """Split 90/10 by characters, encode each part, write train.bin/val.bin.

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
    for split, arr in ids.items():
        arr.tofile(os.path.join(out_dir, f"{split}.bin"))
    return ids["train"], ids["val"]


def main(argv=None):
    # --input PATH (default: download input.txt next to this script), --out_dir DIR
    args = parse_input_args(argv, __doc__.splitlines()[0], HERE, "train.bin and val.bin")
    prepare(read_text(tinyshakespeare_path(args.input, HERE)), args.out_dir)


if __name__ == "__main__":
    main()

# train has 301,966 tokens
# val has 36,059 tokens
