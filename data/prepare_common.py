"""Helpers shared by the data/*/prepare.py scripts.

Every failure is one `error: ...` line on stderr and exit status 2: a
traceback would bury the fix (a missing file, no network, a bad option).
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.request


def die(msg):
    # one line on stderr and a non-zero exit: a traceback would bury the fix
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line too, not a usage block."""

    def error(self, message):
        die(message)


def check_out_dir(path):
    """Die before any work if `path` cannot be made a directory (a file sits at it or above it)."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        die(f"--out_dir {path} cannot be made: {here} is a file, not a directory; choose another --out_dir")


def first_line(e):
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# Tiny Shakespeare, the input of data/shakespeare and data/shakespeare_char. Its
# checksum catches a truncated download, or an error page saved as text.
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def download(url, path, sha256=None):
    # fetch into a temp name first so a failed or corrupt download never leaves
    # an input.txt that a later run would silently reuse
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except Exception as e:
        die(f"could not download {url} ({first_line(e)}); pass --input PATH to use a local copy")
    got = hashlib.sha256(data).hexdigest()
    if sha256 is not None and got != sha256:
        die(f"the file downloaded from {url} is not the expected one ({len(data):,} bytes, SHA-256 {got[:16]}..., "
            f"want {sha256[:16]}...); pass --input PATH to use a local copy")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_text(path):
    """The whole of a local UTF-8 text file; dies if it is missing, not a file or empty."""
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


def parse_input_args(argv, description, here, outputs):
    """--input PATH (default: input.txt downloaded next to the script) and --out_dir DIR."""
    p = ArgumentParser(description=description)
    p.add_argument("--input", metavar="PATH",
                   help="local copy of input.txt (default: download it next to this script)")
    p.add_argument("--out_dir", default=here,
                   help=f"where {outputs} go (default: this script's folder)")
    args = p.parse_args(argv)
    check_out_dir(args.out_dir)
    return args


def input_path(arg, here, url, sha256=None):
    """--input if given, else input.txt next to the script, downloaded once from url (and checked)."""
    if arg is not None:
        return arg
    path = os.path.join(here, "input.txt")
    if not os.path.exists(path):
        download(url, path, sha256)
    return path


def tinyshakespeare_path(arg, here):
    """--input if given, else Tiny Shakespeare downloaded next to the script and checksummed.

    $TINYSHAKESPEARE_URL replaces the download address (a mirror, or a file:// URL).
    """
    url = os.environ.get("TINYSHAKESPEARE_URL") or TINYSHAKESPEARE_URL
    return input_path(arg, here, url, TINYSHAKESPEARE_SHA256)


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; tiktoken downloads its BPE file on first use."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        die(f"could not load tiktoken's gpt2 encoding ({first_line(e)}); it downloads its BPE file once, "
            "so run online or pre-fill TIKTOKEN_CACHE_DIR")


# What each split holds, recorded next to train.bin/val.bin so that training checks the data
# from a few bytes instead of reading every token at start-up (nanomoe_ds/data.py reads it).
TOKEN_STATS = "tokens.json"


def split_stats(ids):
    """{"tokens", "max_token", "dtype"} of one split's uint16 ids (max_token -1: no tokens)."""
    return {"tokens": int(len(ids)), "max_token": int(ids.max()) if len(ids) else -1, "dtype": "uint16"}


def forget_token_stats(out_dir):
    """Remove a previous run's tokens.json before new .bin files are written: if this run dies
    half-way, no record is left that describes files that are no longer there."""
    try:
        os.remove(os.path.join(out_dir, TOKEN_STATS))
    except FileNotFoundError:
        pass


def write_token_stats(out_dir, stats):
    """Write {split: split_stats} to out_dir/tokens.json, after the .bin files, atomically."""
    path = os.path.join(out_dir, TOKEN_STATS)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, path)
