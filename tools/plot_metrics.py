"""Plot training curves from one or more ``metrics.jsonl`` files (written by train.tracking.MetricsLogger).

    python tools/plot_metrics.py outputs/a/metrics.jsonl outputs/b/metrics.jsonl -o curves.png

Draws loss and tokens/s against the step, one line per run, labelled by the run's folder name
(or ``--labels``). Needs matplotlib (``pip install -e '.[tools]'``). The trainer keeps one row
per step; files from older versions, where a resumed run appended repeated steps, are read
with the last record of each step winning, the one the run continued from.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("tokens_per_sec", "tokens / s"))


def read_metrics(path: Path) -> list[dict]:
    """The records of one file, sorted by step, one per step (the last written wins)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def plot(paths: list[Path], labels: list[str], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4), squeeze=False)
    for path, label in zip(paths, labels):
        records = read_metrics(path)
        for ax, (key, _) in zip(axes[0], PANELS):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label)
    for ax, (_, title) in zip(axes[0], PANELS):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="metrics.jsonl files, one per run")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"),
                        help="image to write (.png, .pdf, .svg)")
    parser.add_argument("--labels", nargs="+", help="one label per file (default: the file's folder name)")
    args = parser.parse_args(argv)
    labels = args.labels or [path.resolve().parent.name for path in args.files]
    if len(labels) != len(args.files):
        parser.error(f"{len(labels)} labels for {len(args.files)} files")
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"error: no such metrics file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("matplotlib") is None:
        print("error: plot_metrics needs matplotlib: pip install -e '.[tools]' in the Meshtron folder "
              "(or pip install matplotlib)", file=sys.stderr)
        return 2
    plot(args.files, labels, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
