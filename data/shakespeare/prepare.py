"""Prepare tiny Shakespeare with the GPT-2 BPE tokenizer.

Adapted from nanoGPT's data/shakespeare/prepare.py (Andrej Karpathy, MIT).
Writes train.bin and val.bin as np.uint16 token ids; the GPT-2 vocab (50257)
fits in uint16, and no meta.pkl is written, so train/sample fall back to GPT-2.

    python data/shakespeare/prepare.py                 # download input.txt
    python data/shakespeare/prepare.py --input FILE    # use a local copy

`prepare(text, out_dir, encode=...)` takes any str -> list[int] tokenizer, so
tests can run offline (tiktoken fetches the GPT-2 BPE file on first use).
"""
import argparse
import os
import sys
import urllib.request

import numpy as np

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def die(msg):
    # one line on stderr and a non-zero exit: a traceback would bury the fix
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def first_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def download(url, path):
    # fetch into a temp name first so a failed download never leaves a
    # truncated input.txt that a later run would silently reuse
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            f.write(r.read())
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        die(f"could not download {url} ({first_line(e)}); pass --input PATH to use a local copy")


def read_text(path):
    if not os.path.exists(path):
        die(f"input file not found: {path}")
    if not os.path.isfile(path):
        die(f"input path is not a file: {path}")
    if os.path.getsize(path) == 0:
        die(f"input file is empty: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"could not read {path} as UTF-8 text ({first_line(e)})")


def gpt2_encode():
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:
        die(f"could not load tiktoken's gpt2 encoding ({first_line(e)}); it downloads its BPE file once, "
            "so run online or pre-fill TIKTOKEN_CACHE_DIR")
    # encode_ordinary: plain text must never turn into special tokens
    return enc.encode_ordinary


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", metavar="PATH",
                   help="local copy of input.txt (default: download it next to this script)")
    p.add_argument("--out_dir", default=HERE,
                   help="where train.bin and val.bin go (default: this script's folder)")
    args = p.parse_args(argv)

    if args.input is None:
        path = os.path.join(HERE, "input.txt")
        if not os.path.exists(path):
            download(DATA_URL, path)
    else:
        path = args.input
    prepare(read_text(path), args.out_dir)


if __name__ == "__main__":
    main()

# train has 301,966 tokens
# val has 36,059 tokens
