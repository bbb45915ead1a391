"""Prepare tiny Shakespeare for character-level language modelling.

Adapted from nanoGPT's data/shakespeare_char/prepare.py (Andrej Karpathy, MIT).
Characters map straight to integer ids (no BPE). Writes train.bin and val.bin
(np.uint16 token ids) plus meta.pkl, which holds the encoder/decoder that
sampling needs to turn ids back into text.

    python data/shakespeare_char/prepare.py                 # download input.txt
    python data/shakespeare_char/prepare.py --input FILE    # use a local copy
"""
import argparse
import os
import pickle
import sys
import urllib.request

import numpy as np

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def die(msg):
    # one line on stderr and a non-zero exit: a traceback would bury the fix
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        die(f"could not download {url} ({reason}); pass --input PATH to use a local copy")


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
        die(f"could not read {path} as UTF-8 text ({e})")


def prepare(text, out_dir):
    """Build the char vocab, split 90/10, write train.bin/val.bin/meta.pkl."""
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
    train_ids.tofile(os.path.join(out_dir, "train.bin"))
    val_ids.tofile(os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab_size, "itos": itos, "stoi": stoi}, f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", metavar="PATH",
                   help="local copy of input.txt (default: download it next to this script)")
    p.add_argument("--out_dir", default=HERE,
                   help="where train.bin, val.bin and meta.pkl go (default: this script's folder)")
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

# length of dataset in characters: 1,115,394
# vocab size: 65
# train has 1,003,854 tokens
# val has 111,540 tokens
