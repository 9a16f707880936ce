"""Contrastive recipes measured on a task they never train on (20 Newsgroups, kNN and a logistic
probe), with retrieval and the embeddings' anisotropy: one row per candidate change.

    python benchmarks/contrastive_transfer.py run ROW [ROW ...] [--seeds 1234 1 2] [--steps 200]
    python benchmarks/contrastive_transfer.py table [--results FILE]
    python benchmarks/contrastive_transfer.py rows

``run`` trains each row from --init (default checkpoints/thann_tiny) with pretrain_contrastive.py
for --steps steps per seed (evaluations at step 0 and at the end; nothing saved), and appends the
final evaluation, the step-0 one (the starting checkpoint, TF-IDF and BM25) and the minutes it
took to --results (JSON lines; default /tmp/contrastive_transfer.jsonl). ``table`` prints the
rows as markdown, mean ± sample standard deviation over seeds. Run it under the shared lock:
``flock /tmp/thann-cpu.lock python benchmarks/contrastive_transfer.py run ...``.
Needs data/sharegpt_pairs and data/sharegpt_text (launch/setup.sh).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each row: the overrides of configs/contrastive.yaml it makes, the question it asks, and how
# its steps compare with the other rows' (a larger batch takes fewer steps over the same pairs).
# Rows start from the recipe issue 27 measured (PAIRS: question/reply pairs, mean pooling), or
# from SimCSE; "first-last" is the default of configs/contrastive.yaml.
NO_DROPOUT = ["model.hidden_dropout=0.0", "model.attention_dropout=0.0"]
PAIRS = ["data=sharegpt_pairs", *NO_DROPOUT, "contrastive.pooling=mean"]
ROWS = {
    "issue-27": ([*PAIRS, "train.lr=1.0e-3", "train.min_lr=1.0e-4", "contrastive.temperature=0.05"],
                 "the recipe issue 27 measured: lr 1e-3, temperature 0.05, ShareGPT pairs", 1.0),
    "lr-1e-4": ([*PAIRS, "train.lr=1.0e-4", "train.min_lr=1.0e-5"], "a 10x lower learning rate", 1.0),
    "lr-3e-5": ([*PAIRS, "train.lr=3.0e-5", "train.min_lr=3.0e-6"], "a 30x lower learning rate", 1.0),
    "temp-0.1": ([*PAIRS, "contrastive.temperature=0.1"], "a softer temperature", 1.0),
    "temp-0.02": ([*PAIRS, "contrastive.temperature=0.02"], "a sharper temperature", 1.0),
    "batch-128": ([*PAIRS, "train.global_batch_size=128", "train.warmup_steps=12"],
                  "4x the in-batch negatives (GradCache), the same pairs", 0.25),
    "last-pooling": (["data=sharegpt_pairs", *NO_DROPOUT, "contrastive.pooling=last"],
                     "the end-of-document state instead of the mean", 1.0),
    "projection": ([*PAIRS, "contrastive.projection_dim=128"], "a new linear projection before the loss", 1.0),
    "spans": (["data=sharegpt_spans", *NO_DROPOUT, "contrastive.pooling=mean"],
              "two spans of one ShareGPT conversation instead of question/reply", 1.0),
    "first-last": (["data=sharegpt_pairs", *NO_DROPOUT, "contrastive.pooling=first_last"],
                   "first-last pooling: the mean token embedding beside the mean final state", 1.0),
    "first-last-dropout": (["data=sharegpt_dropout", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                            "contrastive.pooling=first_last"], "SimCSE with first-last pooling", 1.0),
    # thann_tiny trains without dropout; SimCSE's views differ only through it (0.1 as in SimCSE).
    "dropout": (["data=sharegpt_dropout", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
                 "contrastive.pooling=mean"],
                "SimCSE: one span twice, dropout 0.1 makes the views", 1.0),
}


def _row_overrides(name: str, steps: int) -> list[str]:
    overrides, _, scale = ROWS[name]
    steps = max(1, round(steps * scale))
    return [*overrides, f"train.steps={steps}", f"train.eval_interval={steps}"]


def run(row: str, seed: int, steps: int, init: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="contrastive_transfer_") as scratch:
        command = [sys.executable, "pretrain_contrastive.py", f"init_from={init}", f"checkpoint.dir={scratch}/run",
                   "checkpoint.save=false", "logging.wandb.enabled=false", "logging.progress=false",
                   f"train.seed={seed}", *_row_overrides(row, steps), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        if done.returncode != 0:
            raise SystemExit(f"{row} seed {seed} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1]}")
        with open(os.path.join(scratch, "run", "metrics.jsonl")) as f:
            valid = [r for r in map(json.loads, f) if r.get("split") == "valid"]
    return {"row": row, "seed": seed, "command": " ".join(command[1:]), "minutes": minutes,
            "start": valid[0], "end": valid[-1]}


COLUMNS = (("knn_accuracy", "kNN"), ("probe_accuracy", "probe"), ("recall@10", "recall@10"),
           ("mean_cosine", "mean cos"), ("top_pc_share", "top PC"), ("uniformity", "uniformity"),
           ("alignment", "alignment"))


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict]) -> str:
    rows: dict[str, list[dict]] = {}
    for result in results:
        rows.setdefault(result["row"], []).append(result)
    # Retrieval pools differ between data kinds (pairs, or two spans of a conversation), so each
    # row shows its own pool's start and BM25 recall@10 beside its own.
    header = " | ".join(label for _, label in COLUMNS)
    lines = [f"| row | seeds | {header} | kNN / probe start | recall@10 start / BM25 | minutes | what |",
             "|---" * (len(COLUMNS) + 6) + "|"]
    first = next(iter(rows.values()))
    for prefix, label in (("start_", "starting checkpoint (pooled as the first row)"), ("tfidf_", "TF-IDF / BM25")):
        cells = []
        for key, _ in COLUMNS:
            name = f"bm25_{key}" if prefix == "tfidf_" and key == "recall@10" else f"{prefix}{key}"
            values = [r["start"][name] for r in first if name in r["start"]]
            cells.append(_cell(values) if values else "")
        lines.append(f"| {label} | {len(first)} | " + " | ".join(cells) + " | | | | |")
    for name, results_of_row in rows.items():
        cells = [_cell([r["end"][key] for r in results_of_row]) for key, _ in COLUMNS]
        minutes = statistics.mean(r["minutes"] for r in results_of_row)
        # A row's own start: its pooling (or projection) applied to the starting checkpoint.
        start, pool = (" / ".join(_cell([r["start"][key] for r in results_of_row]) for key in keys)
                       for keys in (("start_knn_accuracy", "start_probe_accuracy"),
                                    ("start_recall@10", "bm25_recall@10")))
        lines.append(f"| {name} | {len(results_of_row)} | " + " | ".join(cells)
                     + f" | {start} | {pool} | {minutes:.1f} | {ROWS[name][1] if name in ROWS else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table", "rows"))
    parser.add_argument("names", nargs="*", help="rows to run (run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--init", default="checkpoints/thann_tiny")
    parser.add_argument("--results", default="/tmp/contrastive_transfer.jsonl")
    parser.add_argument("--set", nargs="*", default=[], help="overrides added to every row (e.g. eval sizes)")
    args = parser.parse_args()
    if args.action == "rows":
        for name, (overrides, why, scale) in ROWS.items():
            print(f"{name:>14}  {why}: {' '.join(overrides)} (steps x{scale})")
        return
    if args.action == "table":
        with open(args.results) as f:
            print(table([json.loads(line) for line in f]))
        return
    unknown = [n for n in args.names if n not in ROWS]
    if unknown or not args.names:
        print(f"name rows to run from: {', '.join(ROWS)}", file=sys.stderr)
        sys.exit(2)
    for name in args.names:
        for seed in args.seeds:
            result = run(name, seed, args.steps, args.init, args.set)
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            end = result["end"]
            print(f"{name} seed {seed}: kNN {end['knn_accuracy']:.3f} (start {end['start_knn_accuracy']:.3f}), "
                  f"probe {end['probe_accuracy']:.3f} (start {end['start_probe_accuracy']:.3f}), "
                  f"mean cos {end['mean_cosine']:.3f}, {result['minutes']:.1f} min", flush=True)


if __name__ == "__main__":
    main()
