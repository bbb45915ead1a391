"""Sample from a trained model, as nanoGPT's sample.py.

    python launch/sample.py --out_dir=out-shakespeare-char --device=cpu
"""
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and the model are imported in main, after the arguments are checked: a bad one is refused at once.
from nanomoe_ds.config import ArgumentParser, ConfigError  # noqa: E402
from nanomoe_ds.launch_env import run_script  # noqa: E402


def parse(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--init_from", default="resume", help="resume (from out_dir) or a gpt2 variant")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy, the most likely token")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="", help="default: cuda if there is one, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", type=lambda s: s == "True", default=False)
    # nanoGPT users type --key=value; argparse already accepts that form.
    a = p.parse_args(argv)
    if not 0 <= a.temperature < float("inf"):  # generate divides the logits by it (0 is greedy: no division)
        p.error(f"--temperature must be a number >= 0, got {a.temperature}; 1.0 samples the model as trained, "
                "lower is more conservative, 0 is greedy (always the most likely token)")
    if a.top_k < 1:
        p.error(f"--top_k must be at least 1, got {a.top_k}; a large value such as 200 keeps almost every token")
    if not a.start:  # the model needs at least one token to continue from
        p.error("--start is empty; give a prompt, e.g. --start=ROMEO: or --start=FILE:prompt.txt "
                "(the default is a newline, as nanoGPT's)")
    for k in ("num_samples", "max_new_tokens"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be at least 1, got {getattr(a, k)}")
    return a


def load_codec(ckpt):
    """Char-level codec from the dataset's meta.pkl, else GPT-2 BPE."""
    from nanomoe_ds.data import load_meta, resolve_data_dir
    if ckpt is not None and "config" in ckpt:
        cfg = ckpt["config"]
        data_dir = resolve_data_dir(cfg["dataset"], cfg.get("data_dir", ""))
        meta = load_meta(data_dir)
        if meta is not None and "stoi" in meta:
            print(f"loading meta from {data_dir / 'meta.pkl'}...")
            stoi, itos = meta["stoi"], meta["itos"]

            def encode(s):
                missing = sorted({c for c in s if c not in stoi})
                if missing:
                    raise ConfigError(f"--start has characters not in the vocabulary: {missing!r}")
                return [stoi[c] for c in s]
            return encode, lambda ids: "".join(itos[i] for i in ids)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def main(argv):
    a = parse(argv)
    start = a.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--start={a.start}: cannot read it as UTF-8 text "
                              f"({getattr(e, 'strerror', None) or e})") from None
        if not start:  # the model needs at least one token to continue from
            raise ConfigError(f"--start={a.start}: the file is empty; give a prompt to continue from")
    import torch
    from nanomoe_ds.checkpoint_dir import open_checkpoint
    from nanomoe_ds.start import model_from_checkpoint
    from nanomoe_ds.model import GPT
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={a.device} but CUDA is not available here; use --device=cpu")
    ckpt = None
    if a.init_from == "resume":
        ckpt = open_checkpoint(a.out_dir)
        model = model_from_checkpoint(ckpt)  # whole, on the CPU: one process samples it
    else:
        model = GPT.from_pretrained(a.init_from, {"dropout": 0.0})
    model.eval().to(a.device)
    if a.compile:
        model = torch.compile(model)
    encode, decode = load_codec(None if ckpt is None else ckpt.meta)
    x = torch.tensor(encode(start), dtype=torch.long, device=a.device)[None, ...]
    kind = a.device.split(":")[0]
    ctx = nullcontext() if a.dtype == "float32" else torch.autocast(device_type=kind, dtype=getattr(torch, a.dtype))
    with torch.no_grad(), ctx:
        for _ in range(a.num_samples):
            y = model.generate(x, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k)
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
