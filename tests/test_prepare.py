"""Tests for the nanoGPT-style data/*/prepare.py scripts.

They run offline: the char-level test reads the tests' Tiny Shakespeare (see
conftest.py), downloads are pointed at file:// URLs, and the BPE scripts get a tiny tiktoken Encoding built here instead of GPT-2
(whose BPE file tiktoken would have to download).
"""
import importlib.util
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {name: REPO / "data" / name / "prepare.py"
           for name in ("shakespeare_char", "shakespeare", "openwebtext")}

# GPT-2's pre-tokenizer regex, so the tiny encoding splits text the same way
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 262

SMALL_TEXT = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict? Caf\u00e9 \u2014 na\u00efve \u2603.
"""


def load_module(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", SCRIPTS[name])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_enc():
    # byte-level BPE: every byte is a token, plus a few merges so multi-byte
    # tokens are exercised too
    ranks = {bytes([i]): i for i in range(256)}
    for tok in (b"th", b"he", b"the", b" t", b" the", b"e "):
        ranks[tok] = len(ranks)
    return tiktoken.Encoding("tiny-test", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def run_script(name, *args):
    return subprocess.run([sys.executable, str(SCRIPTS[name]), *args],
                          capture_output=True, text=True, timeout=60)


def read_bin(path):
    return np.fromfile(path, dtype=np.uint16)


def assert_token_stats(out_dir):
    """tokens.json describes train.bin and val.bin exactly, and no temporary file is left beside it."""
    import json
    stats = json.loads((Path(out_dir) / "tokens.json").read_text())
    for split in ("train", "val"):
        ids = read_bin(Path(out_dir) / f"{split}.bin")
        assert stats[split] == {"tokens": len(ids), "max_token": int(ids.max()), "dtype": "uint16"}
    assert not list(Path(out_dir).glob("*.tmp"))
    return stats


def test_shakespeare_char_exact_counts(tmp_path, shakespeare):
    r = run_script("shakespeare_char", "--input", str(shakespeare), "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "train has 1,003,854 tokens" in r.stdout
    assert "val has 111,540 tokens" in r.stdout

    train, val = read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")
    assert len(train) == 1_003_854 and len(val) == 111_540
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 65
    assert all(meta["stoi"][meta["itos"][i]] == i for i in range(65))

    text = shakespeare.read_text(encoding="utf-8")
    assert "".join(meta["itos"][int(i)] for i in train[:1000]) == text[:1000]
    assert "".join(meta["itos"][int(i)] for i in val[-1000:]) == text[-1000:]
    stats = assert_token_stats(tmp_path)
    assert stats["train"]["tokens"] == 1_003_854 and stats["train"]["max_token"] == 64  # 'z', the last of 65


def test_a_new_prepare_removes_the_old_token_stats_first(tmp_path):
    """A re-run that dies while writing the .bin files leaves no tokens.json describing the old ones."""
    mod = load_module("shakespeare")
    mod.prepare(SMALL_TEXT, str(tmp_path), encode=lambda text: [1, 2, 3])
    assert (tmp_path / "tokens.json").exists()
    (tmp_path / "train.bin").unlink()
    (tmp_path / "train.bin").mkdir()  # writing train.bin now fails, as a full disk would
    with pytest.raises(OSError):
        mod.prepare(SMALL_TEXT, str(tmp_path), encode=lambda text: [4, 5])
    assert not (tmp_path / "tokens.json").exists()


def test_shakespeare_bpe_injected_tokenizer(tmp_path, tiny_enc):
    mod = load_module("shakespeare")
    n = len(SMALL_TEXT)
    train_text, val_text = SMALL_TEXT[: int(n * 0.9)], SMALL_TEXT[int(n * 0.9):]

    mod.prepare(SMALL_TEXT, str(tmp_path), encode=tiny_enc.encode_ordinary)
    train, val = read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")
    assert len(train) == len(tiny_enc.encode_ordinary(train_text))
    assert len(val) == len(tiny_enc.encode_ordinary(val_text))
    assert len(train) < len(train_text.encode("utf-8"))  # the merges were used
    assert tiny_enc.decode(train.tolist()) + tiny_enc.decode(val.tolist()) == SMALL_TEXT
    assert_token_stats(tmp_path)


def test_shakespeare_bpe_cli_wiring(tmp_path, tiny_enc, monkeypatch):
    # main() with --input/--out_dir, the GPT-2 loader swapped for the tiny one
    mod = load_module("shakespeare")
    monkeypatch.setattr(mod, "gpt2_encode", lambda: tiny_enc.encode_ordinary)
    src = tmp_path / "in.txt"
    src.write_text(SMALL_TEXT, encoding="utf-8")
    out = tmp_path / "out"
    mod.main(["--input", str(src), "--out_dir", str(out)])
    both = np.concatenate([read_bin(out / "train.bin"), read_bin(out / "val.bin")])
    assert tiny_enc.decode(both.tolist()) == SMALL_TEXT


def split_docs(ids):
    """uint16 stream -> list of token lists, one per <|endoftext|>-terminated doc."""
    ids = ids.tolist()
    assert ids and ids[-1] == EOT
    docs, cur = [], []
    for t in ids:
        if t == EOT:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


@pytest.mark.parametrize("split_on", ["paragraph", "line"])
def test_openwebtext_local_input(tmp_path, tiny_enc, monkeypatch, split_on):
    mod = load_module("openwebtext")
    monkeypatch.setattr(mod, "gpt2_tokenizer", lambda: (tiny_enc.encode_ordinary, tiny_enc.eot_token))
    src = tmp_path / "docs.txt"
    src.write_text(SMALL_TEXT, encoding="utf-8")
    expected_docs = mod.read_documents(str(src), split_on)
    out = tmp_path / "out"
    mod.main(["--input", str(src), "--split_on", split_on, "--out_dir", str(out),
              "--num_proc", "1", "--test_size", "0.25"])

    docs = {}
    for split in ("train", "val"):
        ids = read_bin(out / f"{split}.bin")
        docs[split] = [tiny_enc.decode(d) for d in split_docs(ids)]
        assert len(ids) == sum(len(tiny_enc.encode_ordinary(d)) + 1 for d in docs[split])
    assert len(docs["val"]) == math.ceil(0.25 * len(expected_docs))
    assert sorted(docs["train"] + docs["val"]) == sorted(expected_docs)
    assert assert_token_stats(out)["train"]["max_token"] == EOT  # every document ends with <|endoftext|>


def test_openwebtext_prepare_function(tmp_path, tiny_enc):
    # the default tiny test_size still leaves one val document
    from datasets import Dataset
    mod = load_module("openwebtext")
    texts = [f"document {i}: the thing the others said." for i in range(10)]
    counts = mod.prepare(Dataset.from_dict({"text": texts}), str(tmp_path),
                         tiny_enc.encode_ordinary, EOT, num_proc=1)
    assert counts["val"] == len(read_bin(tmp_path / "val.bin"))
    assert counts["train"] == len(read_bin(tmp_path / "train.bin"))
    assert len(split_docs(read_bin(tmp_path / "val.bin"))) == 1
    assert counts["train"] + counts["val"] == sum(len(tiny_enc.encode_ordinary(t)) + 1 for t in texts)
    stats = assert_token_stats(tmp_path)
    assert {split: stats[split]["tokens"] for split in counts} == counts


def assert_one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_missing_input_is_one_line_error(tmp_path, name):
    line = assert_one_line_error(run_script(name, "--input", str(tmp_path / "nope.txt"),
                                            "--out_dir", str(tmp_path / "out")))
    assert "not found" in line
    assert not (tmp_path / "out").exists()  # failed before doing any work


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_empty_input_is_one_line_error(tmp_path, name):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = assert_one_line_error(run_script(name, "--input", str(empty), "--out_dir", str(tmp_path / "out")))
    assert "empty" in line
    assert not (tmp_path / "out").exists()


def test_openwebtext_single_document_is_one_line_error(tmp_path):
    src = tmp_path / "one.txt"
    src.write_text("just one paragraph\nover two lines\n\n\n")
    assert_one_line_error(run_script("openwebtext", "--input", str(src), "--out_dir", str(tmp_path / "out")))


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_download_failure_is_one_line_error(tmp_path, name, capsys):
    # a file:// URL fails at once and without network, like an offline fetch
    mod = load_module(name)
    dest = tmp_path / "input.txt"
    with pytest.raises(SystemExit) as exc:
        mod.download((tmp_path / "missing.txt").as_uri(), str(dest))
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--input PATH" in err[0]
    assert list(tmp_path.iterdir()) == []  # no truncated input.txt or .part left behind


def copy_of_repo_without_ci_data(tmp_path) -> Path:
    """What a user's fresh clone has for the test data step: the scripts, no ../shared beside it."""
    repo = tmp_path / "clone" / "main"
    for rel in ("launch/test_data.sh", "data/prepare_common.py", "data/shakespeare_char/prepare.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes((REPO / rel).read_bytes())
    assert not (repo.parent / "shared").exists()
    return repo


def run_test_data(repo, url):
    env = {k: v for k, v in os.environ.items() if k != "SHAKESPEARE_INPUT"}
    env["TINYSHAKESPEARE_URL"] = url
    return subprocess.run(["bash", str(repo / "launch/test_data.sh")], capture_output=True, text=True,
                          env=env, timeout=120)


def test_test_data_downloads_and_checks_without_ci_copy(tmp_path, shakespeare):
    """README's test command on a user's machine: no shared copy, so Tiny Shakespeare is downloaded and checked."""
    repo = copy_of_repo_without_ci_data(tmp_path)
    r = run_test_data(repo, shakespeare.as_uri())  # the "download" reads a local file
    assert r.returncode == 0, r.stderr
    downloaded = repo / "data/shakespeare_char/input.txt"
    assert r.stdout.strip().splitlines()[-1] == str(downloaded.resolve())
    assert downloaded.read_bytes() == shakespeare.read_bytes()
    assert len(read_bin(repo / "data/shakespeare_char/train.bin")) == 1_003_854
    r = run_test_data(repo, (tmp_path / "gone.txt").as_uri())  # a second run reuses the checked copy
    assert r.returncode == 0, r.stderr


def test_test_data_refuses_a_corrupt_download(tmp_path, shakespeare):
    repo = copy_of_repo_without_ci_data(tmp_path)
    truncated = tmp_path / "truncated.txt"
    truncated.write_bytes(shakespeare.read_bytes()[:100_000])
    r = run_test_data(repo, truncated.as_uri())
    assert r.returncode == 2
    line = assert_one_line_error(r)
    assert "is not the expected one (100,000 bytes" in line and "--input PATH" in line
    assert not any((repo / "data/shakespeare_char").glob("input.txt*"))  # nothing a later run would trust
