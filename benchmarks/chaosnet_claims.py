"""ChaosNet's README claims (seed 002) measured with THANN's own training runs.

    python benchmarks/chaosnet_claims.py            # the full measurement (docs/chaosnet.md has its minutes)
    python benchmarks/chaosnet_claims.py --steps 4 --stage-steps 2 --seeds 1 --datasets mnist \\
        --retention-datasets mnist,fashion_mnist --eval-samples 64 --jobs 1 --out /tmp/claims \\
        --plot /tmp/claims/plot.png                 # a smoke run

For each dataset (MNIST; 20 Newsgroups standing in for AG News), model (ChaosNet stateful,
ChaosNet with the original's parallel ticks, the parameter-matched MLP whose dropout stays on
at evaluation, optionally an MLP with a tenth of ChaosNet's core) and training death rate, and
for each seed, one run trains the model and measures accuracy at every evaluation death rate
(same samples, nested masks). Then sequential runs (20 Newsgroups -> MNIST -> Fashion-MNIST, one
shared core, a head per task) measure accuracy on every earlier task after each stage.

Every number comes from thann.training.trainer.Trainer running thann.recipes.classify.Classify
with configs/classify.yaml and command-line style overrides, exactly what train_classifier.py
runs; ``--jobs`` worker processes each run one world-of-one training after another, with one
thread each. Output: markdown tables on stdout (and in OUT/chaosnet_claims.md), the raw results
(OUT/chaosnet_claims.json), each run's directory (OUT/runs/NAME: metrics.jsonl, config.yaml; no
checkpoints are saved) and the plot (--plot, by default docs/chaosnet_death_rates.png).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import classifier_runs  # noqa: E402  (benchmarks/, the script's own folder)

NAMES = {"mnist": "MNIST", "newsgroups20": "20 Newsgroups", "fashion_mnist": "Fashion-MNIST"}
# The seed's README ("Benchmarks"): 5 ticks, 512 neurons, the same fail_prob in training and evaluation.
SEED_CLAIMS = {
    "mnist": ("MNIST", {0.0: 90.08, 0.5: 91.0, 0.9: 86.0, 0.97: 73.0, 0.99: 53.0, 0.999: 13.0}),
    "newsgroups20": ("AG News, 4 classes", {0.0: 90.37, 0.5: 90.37, 0.9: 90.37, 0.97: 90.37, 0.99: 87.12,
                                            0.999: 86.58}),
}
CHANCE = {"mnist": 10.0, "fashion_mnist": 10.0, "newsgroups20": 5.0}
MODELS = {  # name: (label, overrides)
    "stateful": ("ChaosNet stateful", ["model=chaosnet", "model.mode=stateful"]),
    "parallel_ticks": ("ChaosNet parallel ticks", ["model=chaosnet", "model.mode=parallel_ticks"]),
    "mlp": ("MLP + dropout (matched)", ["model=chaosnet_mlp"]),
    "mlp_tenth": ("MLP + dropout, 1/10 core", ["model=chaosnet_mlp"]),  # width set per dataset
}


# -- the runs ---------------------------------------------------------------------------------------

def _core_and_heads(model_cfg) -> int:
    from thann.models.chaosnet.model import frontend_parameters, num_parameters

    return num_parameters(model_cfg) - frontend_parameters(model_cfg)


def parameter_rows(args) -> tuple[list[dict], dict]:
    """Parameter counts of each model per dataset (from the configs, as the runs build them), and
    the hidden width of the MLP with a tenth of ChaosNet's core and heads."""
    from thann.cli import load_config
    from thann.models.chaosnet import matched_hidden_width, mlp_num_parameters, num_parameters
    from thann.models.chaosnet.model import frontend_parameters, head_parameters
    from thann.recipes.classify.recipe import model_config

    rows, tenth = [], {}
    for dataset in sorted(set(args.datasets) | set(args.retention_datasets), key=list(NAMES).index):
        cfg = model_config(load_config("classify", [f"classify.datasets=[{dataset}]", *args.override]))
        i, c = cfg.input_width, cfg.heads[dataset].num_classes
        front, heads = frontend_parameters(cfg), head_parameters(cfg, cfg.neurons)
        rows.append({"dataset": dataset, "model": "ChaosNet (both modes)", "width": f"N={cfg.neurons}",
                     "frontend": front, "core": num_parameters(cfg) - front - heads, "heads": heads,
                     "total": num_parameters(cfg)})
        matched = matched_hidden_width(cfg)
        tenth[dataset] = max(1, round((_core_and_heads(cfg) / 10 - c) / (i + 1 + c)))
        for name, width in (("MLP matched", matched), ("MLP 1/10 core", tenth[dataset])):
            total = mlp_num_parameters(cfg, width)
            rows.append({"dataset": dataset, "model": name, "width": f"H={width}", "frontend": front,
                         "core": width * (i + 1), "heads": head_parameters(cfg, width), "total": total})
    return rows, tenth


def sweep_runs(args, tenth: dict) -> list[dict]:
    runs = []
    for dataset in args.datasets:
        for model in args.models:
            for rate in args.train_rates:
                for seed in args.seeds:
                    name = f"{model}_{dataset}_train{rate:g}_seed{seed}"
                    overrides = [*MODELS[model][1], f"classify.datasets=[{dataset}]", f"model.train_death_rate={rate}",
                                 f"model.eval_death_rate={rate}", f"train.steps={args.steps}",
                                 f"train.eval_interval={args.steps}",
                                 f"classify.eval_death_rates=[{','.join(str(r) for r in args.eval_rates)}]"]
                    if model == "mlp_tenth":
                        overrides.append(f"model.hidden_width={tenth[dataset]}")
                    runs.append({"kind": "sweep", "name": name, "model": model, "dataset": dataset, "train_rate": rate,
                                 "seed": seed, "steps": args.steps, "overrides": overrides})
    return runs


def retention_runs(args) -> list[dict]:
    runs = []
    datasets = args.retention_datasets
    for model in args.retention_models:
        for seed in args.seeds:
            overrides = [*MODELS[model][1], f"classify.datasets=[{','.join(datasets)}]", "classify.sequential=true",
                         f"train.steps={args.stage_steps * len(datasets)}", f"train.eval_interval={args.stage_steps}",
                         "train.schedule=constant", "classify.eval_death_rates=[]"]
            runs.append({"kind": "retention", "name": f"{model}_sequential_seed{seed}", "model": model, "seed": seed,
                         "steps": args.stage_steps * len(datasets), "overrides": overrides})
    return runs


def _common(args, run: dict) -> list[str]:
    return [f"train.seed={run['seed']}", f"train.global_batch_size={args.batch}",
            f"train.micro_batch_size={args.batch}", f"train.warmup_steps={max(1, min(30, run['steps'] // 20))}",
            f"classify.eval_samples={args.eval_samples}", f"model.text.max_tokens={args.max_tokens}",
            f"checkpoint.dir={os.path.join(args.out, 'runs', run['name'])}", "checkpoint.save=false",
            "logging.wandb.enabled=false", "logging.progress=false", *args.override]


def execute(args, runs: list[dict]) -> None:
    """Runs every training (the most expensive first) and stores its records in the run."""
    for run in runs:
        run["overrides"] = run["overrides"] + _common(args, run)
    order = sorted(runs, key=lambda r: (r["kind"] != "retention", r.get("dataset") != "newsgroups20"))
    classifier_runs.execute(order, args.jobs, args.threads)


# -- tables and plot ---------------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float]:
    values = [100 * v for v in values]
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    mean, std = _stats(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def sweep_results(runs: list[dict]) -> dict:
    """{(dataset, model, train_rate): {eval_rate: [accuracy per seed]}}, from the last evaluation."""
    table = {}
    for run in runs:
        if run["kind"] != "sweep":
            continue
        final = run["valid"][-1]
        prefix = f"accuracy_{run['dataset']}_death_"
        cells = table.setdefault((run["dataset"], run["model"], run["train_rate"]), {})
        for key, value in final.items():
            if key.startswith(prefix):
                cells.setdefault(float(key[len(prefix):]), []).append(value)
    return table


def sweep_tables(args, table: dict) -> str:
    out = []
    for dataset in args.datasets:
        claim_name, claims = SEED_CLAIMS.get(dataset, ("", {}))
        columns = [(m, r) for m in args.models for r in args.train_rates]
        substitute = "" if claim_name.startswith(NAMES[dataset]) else f"; ours: {NAMES[dataset]}, 20 classes"
        out.append(f"### {NAMES[dataset]}: accuracy (%) against the death rate at evaluation, "
                   f"mean ± std over {len(args.seeds)} seed(s), {args.steps} steps of {args.batch}\n")
        header = ["death rate at evaluation", f"seed's claim ({claim_name}{substitute})"]
        header += [f"{MODELS[m][0]}, trained at {r:g}" for m, r in columns]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for rate in args.eval_rates:
            claim = claims.get(rate)
            row = [f"{rate:g}", "—" if claim is None else f"{claim:g}"]
            row += [_cell(table.get((dataset, m, r), {}).get(rate, [])) if table.get((dataset, m, r)) else "—"
                    for m, r in columns]
            out.append("| " + " | ".join(row) + " |")
        out.append(f"\nChance: {CHANCE[dataset]:g}%. The seed trained and evaluated at the same rate; "
                   "here every model is evaluated at every rate.\n")
    return "\n".join(out)


def parameter_table(rows: list[dict]) -> str:
    out = ["### Parameters\n", "| dataset | model | width | front-end | core | heads | total | core + heads |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {NAMES[r['dataset']]} | {r['model']} | {r['width']} | {r['frontend']:,} | {r['core']:,} | "
                   f"{r['heads']:,} | {r['total']:,} | {r['core'] + r['heads']:,} |")
    out.append("\nChaosNet's core: W_in and b (N·(I+1)) and W_rec (N·N); the MLP's: W and b (H·(I+1)).\n")
    return "\n".join(out)


def retention_table(args, runs: list[dict]) -> str:
    tasks = args.retention_datasets  # trained one after another (continual learning)
    out = [f"### Sequential training ({' -> '.join(NAMES[t] for t in tasks)}): accuracy (%) on each task "
           f"seen so far after each stage, death rate 0.5 in training and evaluation, {args.stage_steps} steps per "
           f"stage, mean ± std over {len(args.seeds)} seed(s)\n"]
    header = ["after stage", "model", *(NAMES[t] for t in tasks)]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_model = {m: [r for r in runs if r["kind"] == "retention" and r["model"] == m] for m in args.retention_models}
    forgetting = {}
    for stage, trained in enumerate(tasks):
        step = (stage + 1) * args.stage_steps
        for model, model_runs in by_model.items():
            records = [next(v for v in r["valid"] if v["step"] == step) for r in model_runs]
            cells = []
            for k, task in enumerate(tasks):
                values = [rec[f"accuracy_{task}"] for rec in records] if k <= stage else []
                cells.append(_cell(values) if values else "")
                if k <= stage and values:
                    forgetting.setdefault((model, task), {})[stage] = values
            out.append(f"| {stage + 1}: {NAMES[trained]} | {MODELS[model][0]} | " + " | ".join(cells) + " |")
    out.append("\nForgetting (accuracy right after a task's own stage minus after the last stage, points):\n")
    for model in args.retention_models:
        parts = []
        for k, task in enumerate(tasks[:-1]):
            stages = forgetting.get((model, task), {})
            if k in stages and len(tasks) - 1 in stages:
                drops = [a - b for a, b in zip(stages[k], stages[len(tasks) - 1])]
                parts.append(f"{NAMES[task]} {_cell(drops)}")
        out.append(f"- {MODELS[model][0]}: " + ", ".join(parts))
    return "\n".join(out) + "\n"


def plot(args, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(6.5 * len(args.datasets), 4.6), squeeze=False)
    x_of = {rate: 1 - rate for rate in args.eval_rates}
    for ax, dataset in zip(axes[0], args.datasets):
        for color, model in enumerate(args.models):
            for rate in args.train_rates:
                cells = table.get((dataset, model, rate), {})
                rates = [r for r in args.eval_rates if cells.get(r)]
                if not rates:
                    continue
                stats = [_stats(cells[r]) for r in rates]
                ax.errorbar([x_of[r] for r in rates], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                            capsize=3, linestyle="-" if rate else "--", color=f"C{color}",
                            label=f"{MODELS[model][0]}, trained at {rate:g}")
        claim_name, claims = SEED_CLAIMS.get(dataset, ("", {}))
        if claims:
            ax.plot([1 - r for r in claims], list(claims.values()), "kx:", markersize=9,
                    label=f"seed's claim ({claim_name})")
        ax.axhline(CHANCE[dataset], color="grey", linewidth=1, linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.invert_xaxis()  # more death to the right
        ax.set_xticks([x_of[r] for r in args.eval_rates])
        ax.set_xticklabels([f"{r:g}" for r in args.eval_rates])
        ax.minorticks_off()
        ax.set_xlabel("death rate at evaluation (axis: 1 - rate, log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(NAMES[dataset] + (" (seed: AG News)" if dataset == "newsgroups20" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------------

def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of each death-rate run")
    parser.add_argument("--stage-steps", type=int, default=300, help="steps of each sequential stage")
    parser.add_argument("--batch", type=int, default=128, help="global batch size (one micro-batch)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (train.seed 1..N)")
    parser.add_argument("--datasets", type=_names, default=["mnist", "newsgroups20"])
    parser.add_argument("--models", type=_names, default=["stateful", "parallel_ticks", "mlp", "mlp_tenth"],
                        help=f"of {list(MODELS)}")
    parser.add_argument("--train-rates", type=_floats, default=[0.0, 0.5])
    parser.add_argument("--eval-rates", type=_floats, default=[0.0, 0.5, 0.9, 0.97, 0.99, 0.999])
    parser.add_argument("--retention-datasets", type=_names, default=["newsgroups20", "mnist", "fashion_mnist"],
                        help="sequential stages; empty: no retention runs")
    parser.add_argument("--retention-models", type=_names, default=["stateful", "mlp"])
    parser.add_argument("--eval-samples", type=int, default=2000, help="test samples per task and death rate")
    parser.add_argument("--max-tokens", type=int, default=256, help="20 Newsgroups documents truncated to this")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one training each at a time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", default=os.path.join(ROOT, "checkpoints", "chaosnet_claims"),
                        help="tables, raw results and the run directories go here")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "chaosnet_death_rates.png"))
    parser.add_argument("--override", action="append", default=[], help="a config override for every run")
    parser.add_argument("--tables-from", metavar="JSON",
                        help="no training: print the tables and draw the plot again from OUT/chaosnet_claims.json")
    args = parser.parse_args()
    args.seeds = list(range(1, args.seeds + 1))
    for name in args.models + args.retention_models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {list(MODELS)}")
    os.makedirs(args.out, exist_ok=True)

    if args.tables_from:  # no training: the tables and plot of a finished measurement, again
        with open(args.tables_from) as f:
            saved = json.load(f)
        plot_path, args = args.plot, argparse.Namespace(**saved["args"])
        args.plot = plot_path
        report(args, saved["parameters"], saved["runs"], saved["minutes"], saved.get("command", ""))
        return
    start = time.perf_counter()
    classifier_runs.quiet()
    parameters, tenth = parameter_rows(args)
    runs = sweep_runs(args, tenth) + (retention_runs(args) if args.retention_datasets else [])
    print(f"{len(runs)} training runs, {args.jobs} at a time", file=sys.stderr, flush=True)
    execute(args, runs)
    minutes = (time.perf_counter() - start) / 60
    command = " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "chaosnet_claims.json"), "w") as f:
        json.dump({"args": vars(args), "command": command, "minutes": minutes, "parameters": parameters,
                   "runs": runs}, f, indent=1)
    report(args, parameters, runs, minutes, command)


def report(args, parameters: list[dict], runs: list[dict], minutes: float, command: str) -> None:
    """Prints the markdown tables (also written to OUT/chaosnet_claims.md) and draws the plot."""
    table = sweep_results(runs)
    text = [sweep_tables(args, table), parameter_table(parameters)]
    if args.retention_datasets:
        text.append(retention_table(args, runs))
    text.append(f"{len(runs)} runs in {minutes:.1f} minutes ({args.jobs} worker(s), {args.threads} thread(s) each); "
                f"command: python benchmarks/chaosnet_claims.py {command}".rstrip())
    markdown = "\n".join(text)
    print(markdown)
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    plot(args, table, args.plot)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chaosnet_claims.md"), "w") as f:
        f.write(markdown + "\n")
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
