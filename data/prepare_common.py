"""Helpers shared by the data/*/prepare.py scripts.

Every failure is one `error: ...` line on stderr and exit status 2: a
traceback would bury the fix (a missing file, no network, a bad option).
"""
import argparse
import os
import sys
import urllib.request


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
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--input", metavar="PATH",
                   help="local copy of input.txt (default: download it next to this script)")
    p.add_argument("--out_dir", default=here,
                   help=f"where {outputs} go (default: this script's folder)")
    return p.parse_args(argv)


def input_path(arg, here, url):
    """--input if given, else input.txt next to the script, downloaded once from url."""
    if arg is not None:
        return arg
    path = os.path.join(here, "input.txt")
    if not os.path.exists(path):
        download(url, path)
    return path


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; tiktoken downloads its BPE file on first use."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        die(f"could not load tiktoken's gpt2 encoding ({first_line(e)}); it downloads its BPE file once, "
            "so run online or pre-fill TIKTOKEN_CACHE_DIR")
