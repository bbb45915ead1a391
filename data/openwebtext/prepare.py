"""Prepare OpenWebText (or any local text) with the GPT-2 BPE tokenizer.

Adapted from nanoGPT's data/openwebtext/prepare.py (Andrej Karpathy, MIT).
Each document is encoded with encode_ordinary and followed by <|endoftext|>,
then all of them are concatenated into train.bin / val.bin (np.uint16 memmaps).
tokens.json records each split's token count and largest id: training checks
those instead of reading the ~17GB of train.bin at every start.

    python data/openwebtext/prepare.py                        # HF hub, ~54GB cache
    python data/openwebtext/prepare.py --input FILE.txt       # offline, local text

`prepare(dataset, out_dir, encode, eot, ...)` takes any datasets.Dataset with
a 'text' column and any str -> list[int] tokenizer, so tests run offline.
"""
import os
import sys

import numpy as np

# data/ holds prepare_common.py, shared by every data/*/prepare.py; put it on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare_common import (ArgumentParser, check_out_dir, die, first_line, forget_token_stats,  # noqa: E402
                            gpt2_encoding, read_text, write_token_stats)

HERE = os.path.dirname(os.path.abspath(__file__))


def read_documents(path, split_on="paragraph"):
    """Local text -> list of documents, split on blank lines or on every line."""
    text = read_text(path)
    if split_on == "line":
        docs = text.splitlines()
    else:
        docs = "\n".join(line.rstrip() for line in text.splitlines()).split("\n\n")
    docs = [d.strip("\n") for d in docs if d.strip()]
    # train_test_split needs at least one document on each side
    if len(docs) < 2:
        die(f"{path} holds {len(docs)} document(s); need at least 2 for a train/val split "
            f"(documents are split by {split_on})")
    return docs


def load_hub(name, num_proc):
    from datasets import load_dataset
    try:
        # takes 54GB in the huggingface cache dir, about 8M documents (8,013,769)
        return load_dataset(name, num_proc=num_proc)["train"]
    except Exception as e:
        die(f"could not load dataset {name!r} from the Hugging Face hub ({first_line(e)}); "
            "pass --input PATH to use a local text file, or --dataset NAME for a mirror")


def gpt2_tokenizer():
    enc = gpt2_encoding()
    return enc.encode_ordinary, enc.eot_token


def prepare(dataset, out_dir, encode, eot, num_proc=1, test_size=0.0005, seed=2357):
    """Split off a val set, tokenize, and write train.bin / val.bin, then tokens.json.

    dataset: datasets.Dataset with a 'text' column (or a DatasetDict with 'train').
    encode:  str -> list[int]; must ignore special tokens (e.g. encode_ordinary).
    eot:     id appended after every document, so the model learns boundaries.
    Returns {split: number_of_tokens}.
    """
    import datasets
    from tqdm import tqdm

    # Progress bars on a terminal only: log files and CI output stay clean.
    interactive = sys.stderr.isatty()
    if not interactive:
        datasets.disable_progress_bars()
    if hasattr(dataset, "keys"):
        dataset = dataset["train"]
    # owt only has a 'train' split, so carve out a small fixed val set
    split_dataset = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = list(encode(example["text"]))
        ids.append(eot)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(
        process, remove_columns=["text"], desc="tokenizing the splits", num_proc=num_proc)

    os.makedirs(out_dir, exist_ok=True)
    forget_token_stats(out_dir)
    counts, stats = {}, {}
    for split, dset in tokenized.items():
        arr_len = int(np.sum(dset["len"], dtype=np.uint64))
        filename = os.path.join(out_dir, f"{split}.bin")
        # uint16 is enough for GPT-2's 50257 ids (max_token_value == 50256 < 2**16)
        arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
        # write in contiguous shards so the whole split never sits in RAM at once
        total_batches = min(1024, len(dset))
        idx, top = 0, -1
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}", disable=not interactive):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True)
            batch = batch.with_format("numpy")
            arr_batch = np.concatenate(list(batch["ids"]))
            if arr_batch.size:
                top = max(top, int(arr_batch.max()))  # tokens.json's max_token: training checks it against the vocab
                if top >= 2**16:
                    die(f"token id {top} does not fit in uint16")
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        del arr
        counts[split] = arr_len
        stats[split] = {"tokens": arr_len, "max_token": top, "dtype": "uint16"}
        print(f"{split} has {arr_len:,} tokens")
    write_token_stats(out_dir, stats)
    return counts


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", metavar="PATH",
                   help="local UTF-8 text file to use instead of the HF hub dataset")
    p.add_argument("--split_on", choices=["paragraph", "line"], default="paragraph",
                   help="with --input: one document per blank-line-separated paragraph, or per line")
    p.add_argument("--dataset", default="openwebtext",
                   help="HF hub dataset name when --input is not given")
    p.add_argument("--out_dir", default=HERE,
                   help="where train.bin, val.bin and tokens.json go (default: this script's folder)")
    # ~ number of cpu cores // 2; the hub download is network-bound, not CPU-bound
    p.add_argument("--num_proc", type=int, default=8, help="workers for tokenization")
    p.add_argument("--num_proc_load_dataset", type=int, default=None,
                   help="workers for the hub download (default: --num_proc)")
    p.add_argument("--test_size", type=float, default=0.0005, help="fraction of documents held out for val")
    p.add_argument("--seed", type=int, default=2357)
    args = p.parse_args(argv)
    check_out_dir(args.out_dir)
    if not 0 < args.test_size < 1:  # train_test_split would fail after the whole download
        die(f"--test_size must be a fraction between 0 and 1, got {args.test_size}")

    # check the cheap things first, before any download or worker start-up
    if args.input is not None:
        docs = read_documents(args.input, args.split_on)
        from datasets import Dataset
        dataset = Dataset.from_dict({"text": docs})
    else:
        dataset = None
    encode, eot = gpt2_tokenizer()
    if dataset is None:
        dataset = load_hub(args.dataset, args.num_proc_load_dataset or args.num_proc)
    prepare(dataset, args.out_dir, encode, eot, num_proc=args.num_proc,
            test_size=args.test_size, seed=args.seed)


if __name__ == "__main__":
    main()

# train.bin is ~17GB, val.bin ~8.5MB
# train has ~9B tokens (9,035,582,198)
# val has ~4M tokens (4,434,897)
# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
