"""NHS-Net's mechanisms, measured: the whole model, each mechanism removed in turn, and the matched
ResNet, with THANN's own training runs.

    python benchmarks/nhsnet_ablation.py               # docs/results/2026-12-06-nhsnet-ablation.md (6 minutes)
    python benchmarks/nhsnet_ablation.py --steps 4 --seeds 1 --variants all,resnet --eval-samples 64 \\
        --jobs 1 --out /tmp/ablation --plot /tmp/ablation/plot.png      # a smoke run

Every run is thann.training.trainer.Trainer running thann.recipes.classify.Classify with
configs/classify.yaml and command-line style overrides, exactly what train_classifier.py runs;
``--jobs`` worker processes each run one world-of-one training after another, one thread each.
Per variant, over the seeds: test accuracy at the end (a fixed subset of the test split), alive
parameters at the end (those that take part in the output: after growth and pruning), allocated
parameters, forward FLOPs per image through the conv and linear layers (alive weights, and what
the dense kernels compute), training time. Output: a markdown table on stdout (and in
OUT/nhsnet_ablation.md), the raw results (OUT/nhsnet_ablation.json), each run's directory
(OUT/runs/NAME: metrics.jsonl, config.yaml; no checkpoints) and a plot of accuracy against alive
parameters (--plot, by default docs/nhsnet_ablation.png).
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

NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
VARIANTS = {  # name: (label, overrides)
    "all": ("NHS-Net, all mechanisms", ["model=nhsnet"]),
    "no_hebbian": ("without Hebbian", ["model=nhsnet", "model.hebbian.enabled=false"]),
    "no_sparse": ("without sparsity", ["model=nhsnet", "model.sparse.enabled=false"]),
    "no_gate": ("without HH gate", ["model=nhsnet", "model.gate.enabled=false"]),
    "no_se": ("without squeeze-excitation", ["model=nhsnet", "model.se.enabled=false"]),
    "no_growth": ("without growth", ["model=nhsnet", "model.growth.enabled=false"]),
    "no_pruning": ("without pruning", ["model=nhsnet", "model.pruning.enabled=false"]),
    "resnet": ("ResNet (matched)", ["model=resnet"]),
}


def multiply_adds(model, pixels, head: str) -> tuple[int, int]:
    """(dense, alive) multiply-adds of a forward of ``pixels`` through the conv and linear layers
    (per image: pixels holds one); alive counts only weights that exist and are not pruned
    (NHS-Net's masks), dense every weight the kernels multiply. Norms, gates and other
    element-wise work are not counted."""
    import torch

    from thann.models.nhsnet.layers import MaskedConv2d

    masks = {id(layer): layer.keep * exists for layer, exists in model.masked_layers()} \
        if hasattr(model, "masked_layers") else {}
    counts = [0, 0]

    def count(module, inputs, output):
        positions = output.shape[2] * output.shape[3] if output.dim() == 4 else 1
        mask = masks.get(id(module))
        counts[0] += module.weight.numel() * positions
        counts[1] += (module.weight.numel() if mask is None else int(mask.sum())) * positions

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, MaskedConv2d))]
    handles = [layer.register_forward_hook(count) for layer in layers]
    try:
        with torch.no_grad():
            model(pixels, head)
    finally:
        for handle in handles:
            handle.remove()
    return counts[0], counts[1]


def measure(trainer, cfg) -> dict:
    """Parameter counts and forward FLOPs per image of a run's model at its end."""
    model = trainer.slots["model"].module
    model.eval()
    dense, alive = multiply_adds(model, trainer.recipe.eval_sets[0][0][:1], cfg.classify.datasets[0])
    parameters = sum(p.numel() for p in model.parameters())
    alive_parameters = model.alive_parameters() if hasattr(model, "alive_parameters") else parameters
    return {"parameters": parameters, "alive_parameters": alive_parameters, "flops_dense": 2 * dense,
            "flops_alive": 2 * alive}


def runs_of(args) -> list[dict]:
    runs = []
    for variant in args.variants:
        for seed in args.seeds:
            overrides = [*VARIANTS[variant][1], f"classify.datasets=[{args.dataset}]", f"train.steps={args.steps}",
                         f"train.eval_interval={args.steps}", f"train.seed={seed}",
                         f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                         f"train.warmup_steps={max(1, min(20, args.steps // 10))}",
                         f"classify.eval_samples={args.eval_samples}",
                         f"checkpoint.dir={os.path.join(args.out, 'runs', f'{variant}_seed{seed}')}",
                         "checkpoint.save=false", "logging.wandb.enabled=false", "logging.progress=false",
                         *args.override]
            runs.append({"name": f"{variant}_seed{seed}", "variant": variant, "seed": seed, "overrides": overrides})
    return runs


# -- table and plot ---------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary(args, runs: list[dict]) -> dict:
    """{variant: accuracy (%) per seed, and the means of the other figures}."""
    table = {}
    for variant in args.variants:
        mine = [r for r in runs if r["variant"] == variant]
        table[variant] = {
            "accuracy": [100 * r["valid"][-1][f"accuracy_{args.dataset}"] for r in mine],
            **{key: float(np.mean([r[key] for r in mine]))
               for key in ("alive_parameters", "parameters", "flops_alive", "flops_dense", "seconds", "step_ms")},
        }
    return table


def markdown(args, table: dict, minutes: float, command: str) -> str:
    out = [f"### {NAMES[args.dataset]}: test accuracy after {args.steps} steps of {args.batch}, "
           f"mean ± std over {len(args.seeds)} seed(s)\n",
           "| variant | test accuracy (%) | alive parameters | allocated parameters | alive MFLOPs/image | "
           "dense MFLOPs/image | training time (s) | ms/step |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, row in table.items():
        mean, std = _mean_std(row["accuracy"])
        out.append(f"| {VARIANTS[variant][0]} | {mean:.2f} ± {std:.2f} | {row['alive_parameters']:,.0f} | "
                   f"{row['parameters']:,.0f} | {row['flops_alive'] / 1e6:.2f} | {row['flops_dense'] / 1e6:.2f} | "
                   f"{row['seconds']:.0f} | {row['step_ms']:.0f} |")
    out.append("\nAlive parameters and FLOPs at the end of training (means over seeds): weights that exist and are "
               "not pruned, dormant channels left out; dense FLOPs are what the kernels compute (all allocated "
               "channels, masks multiplied in). FLOPs: 2 × the multiply-adds of the conv and linear layers of one "
               "image's forward. Training time: the whole run, evaluations included; ms/step: the median step.\n")
    out.append(f"{sum(len(r['accuracy']) for r in table.values())} runs in {minutes:.1f} minutes ({args.jobs} "
               f"worker(s), {args.threads} thread(s) each); command: python benchmarks/nhsnet_ablation.py "
               f"{command}".rstrip())
    return "\n".join(out)


def plot(args, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (variant, row) in enumerate(table.items()):
        mean, std = _mean_std(row["accuracy"])
        ax.errorbar(row["alive_parameters"], mean, yerr=std, marker="s" if variant == "resnet" else "o", capsize=3,
                    color="black" if variant == "resnet" else f"C{i}", label=VARIANTS[variant][0])
    ax.set_xlabel("alive parameters at the end of training")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"NHS-Net ablation, {NAMES[args.dataset]}, {args.steps} steps of {args.batch}, "
                 f"{len(args.seeds)} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, runs: list[dict], minutes: float, command: str) -> None:
    table = summary(args, runs)
    text = markdown(args, table, minutes, command)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    plot(args, table, args.plot)
    with open(os.path.join(args.out, "nhsnet_ablation.md"), "w") as f:
        f.write(text + "\n")
    print(f"\nplot: {args.plot}")


def _names(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=130, help="training steps of each run")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (one micro-batch)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (train.seed 1..N)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=list(NAMES))
    parser.add_argument("--variants", type=_names, default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--eval-samples", type=int, default=1000, help="test samples (a fixed subset)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one training each at a time)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", default=os.path.join(ROOT, "checkpoints", "nhsnet_ablation"),
                        help="table, raw results and the run directories go here")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "nhsnet_ablation.png"))
    parser.add_argument("--override", action="append", default=[], help="a config override for every run")
    parser.add_argument("--tables-from", metavar="JSON",
                        help="no training: print the table and draw the plot again from OUT/nhsnet_ablation.json")
    args = parser.parse_args()
    args.seeds = list(range(1, args.seeds + 1))
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    if args.tables_from:
        with open(args.tables_from) as f:
            saved = json.load(f)
        plot_path, out = args.plot, args.out
        args = argparse.Namespace(**{**saved["args"], "plot": plot_path, "out": out})
        report(args, saved["runs"], saved["minutes"], saved["command"])
        return
    start = time.perf_counter()
    classifier_runs.quiet()
    runs = runs_of(args)
    print(f"{len(runs)} training runs, {args.jobs} at a time", file=sys.stderr, flush=True)
    classifier_runs.execute(runs, args.jobs, args.threads, measure)
    minutes = (time.perf_counter() - start) / 60
    command = " ".join(sys.argv[1:])
    with open(os.path.join(args.out, "nhsnet_ablation.json"), "w") as f:
        json.dump({"args": vars(args), "command": command, "minutes": minutes, "runs": runs}, f, indent=1)
    report(args, runs, minutes, command)


if __name__ == "__main__":
    main()
