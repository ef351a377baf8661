"""Loss curves from training metrics (the metrics.jsonl that `deepseek-v2 train` and `sft` write):
one panel per run, training loss and held-out loss against tokens seen, plus the expert load of the
last logged interval of the first run.

    python scripts/plot_training.py runs/demo-pretrain/metrics.jsonl runs/demo-sft/metrics.jsonl \
        --out docs/demo-loss.png [--load-out docs/demo-expert-load.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_shape(metrics_path: str) -> dict:
    """MoE layer numbers and device-group size from the run's train_config.json, when it is there."""
    config = Path(metrics_path).parent / "train_config.json"
    if not config.is_file():
        return {}
    model = json.loads(config.read_text()).get("model", {})
    layers, first = model.get("num_hidden_layers"), model.get("first_k_dense_replace", 0)
    experts, groups = model.get("n_routed_experts"), model.get("n_group") or 1
    shape = {"layer_ids": list(range(first, layers))} if layers else {}
    if experts and groups > 1:
        shape["group_size"] = experts // groups
    return shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files, one per run")
    parser.add_argument("--out", default="loss.png")
    parser.add_argument("--load-out", help="also draw the first run's last expert load here")
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.metrics), figsize=(6 * len(args.metrics), 4), squeeze=False)
    for ax, path in zip(axes[0], args.metrics):
        records = read(path)
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label="train", linewidth=1)
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out")
        if evals:
            last = evals[-1]
            ax.annotate(f"{last['val_loss']:.3f} (ppl {last['val_ppl']:.1f})", (last["tokens"] / 1e6, last["val_loss"]),
                        textcoords="offset points", xytext=(-60, 12))
        ax.set_title(name)
        ax.set_xlabel("tokens (millions)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")

    if args.load_out:
        from deepseek_v2.train.balance import plot_expert_load
        logged = [r for r in read(args.metrics[0]) if r.get("load")]
        if logged:
            shape = read_shape(args.metrics[0])
            plot_expert_load(logged[-1]["load"], args.load_out, f"expert load, step {logged[-1]['step']}", **shape)
            print(f"wrote {args.load_out}")


if __name__ == "__main__":
    main()
