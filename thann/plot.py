"""python -m thann.plot RUN_DIR [--out PNG] [--force]: a run's curves from its metrics.jsonl, to PNG.

A PPO run (its records hold ``reward_mean``): the training reward, the held-out reward and the KL
to the reference per response; any other run: the training and validation loss. Values that were
not finite (written as null) are left out. Default output: RUN_DIR/curves.png.
"""

import argparse
import json
import math
import os
import sys

from thann.config import ConfigError
from thann.outputs import atomic_write, check_output

EXIT_USAGE = 2


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))
              and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def panels(records: list[dict]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(title, [(label, split, key)]) of each panel to draw."""
    if any("reward_mean" in r for r in records):
        return [("reward", [("train (sampled prompts)", "train", "reward_mean"),
                            ("held-out prompts", "valid", "reward_mean_heldout")]),
                ("KL to the reference (nats per response)", [("train", "train", "kl")])]
    return [("loss", [("train", "train", "loss"), ("validation", "valid", "loss")])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m thann.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", help="the PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    out = args.out or os.path.join(args.run_dir, "curves.png")
    try:
        if not os.path.isfile(metrics):
            raise ConfigError("run_dir", args.run_dir, "holds no metrics.jsonl")
        check_output(out, force=args.force, inputs={"metrics": metrics}, field="out", force_flag="--force")
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics)
    chosen = panels(records)
    figure, axes = plt.subplots(1, len(chosen), figsize=(6 * len(chosen), 4), squeeze=False)
    for axis, (title, lines) in zip(axes[0], chosen):
        for label, split, key in lines:
            steps, values = series(records, split, key)
            axis.plot(steps, values, marker="o" if split == "valid" else None, markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(os.path.basename(os.path.abspath(args.run_dir)))
    figure.tight_layout()
    with atomic_write(out) as temporary, open(temporary, "wb") as f:
        figure.savefig(f, format="png", dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
