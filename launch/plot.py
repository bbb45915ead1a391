"""Plot runs from their out_dir/metrics.jsonl (needs matplotlib: pip install -e .[plot]).

    python launch/plot.py --out_dir=out-a,out-b [--plot_dir=plots]

writes three PNGs into plot_dir (default: the first out_dir):
  loss.png         train and val loss against iterations and against tokens, the runs overlaid;
  expert_load.png  tokens per expert (layer x expert, as a share of the layer's mean) at each run's last logged step;
  load_cv.png      each MoE layer's load coefficient of variation over the iterations.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.config import ConfigError  # noqa: E402
from nanomoe_ds.metrics import read_run  # noqa: E402


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def plot_losses(plt, runs: dict, path: str):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (name, (train, evals)), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
        for ax, x in zip(axes, ("iter", "tokens")):
            ax.plot([r[x] for r in train], [r["ce_loss"] for r in train], color=color, alpha=0.5, lw=1,
                    label=f"{name} train (cross-entropy)")
            ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", color=color, ms=3,
                    label=f"{name} val")
    for ax, x in zip(axes, ("iterations", "tokens")):
        ax.set_xlabel(x)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(plt, runs: dict, path: str):
    runs = {name: next((r for r in reversed(train) if r.get("moe")), None) for name, (train, _) in runs.items()}
    runs = {name: r for name, r in runs.items() if r is not None}
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.5), squeeze=False)
    for ax, (name, record) in zip(axes[0], runs.items()):
        load = [[c / max(sum(layer["tokens_per_expert"]) / len(layer["tokens_per_expert"]), 1e-9)
                 for c in layer["tokens_per_expert"]] for layer in record["moe"]]
        image = ax.imshow(load, cmap="viridis", aspect="auto", vmin=0)
        ax.set_xticks(range(len(load[0])))
        ax.set_yticks(range(len(load)))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer (in order)")
        ax.set_title(f"{name}: load / mean at iter {record['iter']}", fontsize=10)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_load_cv(plt, runs: dict, path: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for (name, (train, _)), style in zip(runs.items(), styles * 9):
        rows = [r for r in train if r.get("moe")]
        for layer in range(len(rows[0]["moe"]) if rows else 0):
            ax.plot([r["iter"] for r in rows], [r["moe"][layer]["load_cv"] for r in rows], style, lw=1,
                    label=f"{name} layer {layer}")
    ax.set_xlabel("iterations")
    ax.set_ylabel("load CV (std / mean of tokens per expert)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="one run's out_dir, or several separated by commas")
    p.add_argument("--plot_dir", default="", help="where the PNGs go (default: the first out_dir)")
    a = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        fail("launch/plot.py needs matplotlib; pip install -e .[plot]")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    dirs = [d for d in a.out_dir.split(",") if d]
    try:
        runs = {os.path.normpath(d): read_run(d) for d in dirs}
    except ConfigError as e:
        fail(str(e))
    plot_dir = a.plot_dir or dirs[0]
    os.makedirs(plot_dir, exist_ok=True)
    written = [os.path.join(plot_dir, "loss.png")]
    plot_losses(plt, runs, written[0])
    if plot_expert_load(plt, runs, os.path.join(plot_dir, "expert_load.png")):
        written.append(os.path.join(plot_dir, "expert_load.png"))
        plot_load_cv(plt, runs, os.path.join(plot_dir, "load_cv.png"))
        written.append(os.path.join(plot_dir, "load_cv.png"))
    print("\n".join(written))


if __name__ == "__main__":
    main(sys.argv[1:])
