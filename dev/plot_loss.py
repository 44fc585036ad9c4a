"""
Draws the train and validation loss curves of one or more runs from their logs (llm.c's main.log
format, as `train_gpt2.py --log FILE` writes it), so that runs can be compared at a glance.

    python dev/plot_loss.py runs/a.log runs/b.log -o loss.png

Dev only: needs matplotlib (pip install matplotlib).
"""

import argparse
import os
import re
import sys


def parse_log(path):
    # lines "s:STEP trl:LOSS ..." (train) and "s:STEP tel:LOSS" (validation); others are skipped
    train, val = {}, {}
    with open(path) as f:
        for line in f:
            m = re.match(r"s:(\d+) (trl|tel):([-+\d.eEnainf]+)", line)
            if m:
                (train if m.group(2) == "trl" else val)[int(m.group(1))] = float(m.group(3))
    return train, val  # dicts step -> loss (a resumed run's repeated steps keep the latest)


def main():
    parser = argparse.ArgumentParser(description="Plot train and validation losses from main.log files.")
    parser.add_argument("logs", nargs="+", help="log files written with train_gpt2.py --log")
    parser.add_argument("-o", "--output", default="loss.png", help="image to write (default loss.png)")
    parser.add_argument("--title", default="GPT-2 training loss")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")  # no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: dev/plot_loss.py needs matplotlib: pip install matplotlib")

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, path in enumerate(args.logs):
        try:
            train, val = parse_log(path)
        except OSError as e:
            sys.exit(f"error: cannot read {path}: {e.strerror}")
        if not train and not val:
            sys.exit(f"error: {path}: no 's:STEP trl:LOSS' or 's:STEP tel:LOSS' lines")
        color, name = f"C{i}", os.path.basename(path)
        if train:
            ax.plot(list(train), list(train.values()), color=color, alpha=0.35, linewidth=1, label=f"{name} train")
        if val:
            ax.plot(list(val), list(val.values()), color=color, marker="o", linewidth=2, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
