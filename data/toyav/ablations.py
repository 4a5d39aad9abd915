"""
The paper's two MrDPO ablations on the toy, next to the method itself: gDPO with the LoRA proxy (make toy's rounds),
plain DPO (lambda = 0, paper Fig. 3a) and Direct (one LoRA trained on through the rounds, never merged or
re-initialised, Fig. 3b). Each runs with SEEDS (the seed of the sampling, the pair batches and the proxy's
initialisation) from the same SFT model, make toy's out/toy/sft/final; train_mrdpo.py with config/toy_mrdpo.py and
one flag changed. A finished run is not run again (train_mrdpo.py keeps every round), and the seed-2024 gDPO run is
make toy's own out/toy/mrdpo. Prints and writes Total per round, mean +- standard deviation over the seeds
(out/toy/ablations.md and .json).

$ python data/toyav/ablations.py    # make ablations
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join("out", "toy", "ablations")
CONFIG = "config/toy_mrdpo.py"
SEEDS = (2024, 2025, 2026)
VARIANTS = {  # name: (flags, the row's label)
    "gdpo_proxy": ([], "gDPO (lambda = 0.1) + LoRA proxy: the method"),
    "dpo": (["--ce_weight=0.0"], "plain DPO (lambda = 0), Fig. 3a"),
    "direct": (["--proxy=False"], "Direct: one LoRA, no merge / re-init, Fig. 3b"),
}


def run_dir(name, seed):
    return os.path.join("out", "toy", "mrdpo") if (name, seed) == ("gdpo_proxy", 2024) else os.path.join(OUT, f"{name}_s{seed}")


def rounds_of(name, seed):
    """The test rates of a run's rounds, from their done.json; None until every round is done."""
    d, out = run_dir(name, seed), []
    for t in range(1, 100):
        path = os.path.join(d, f"round{t}", "done.json")
        if not os.path.exists(path):
            break
        out.append(json.load(open(path)))
    return out if out and os.path.exists(os.path.join(d, "final", "train_config.json")) else None


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(runs, sft):
    """Markdown: Total % per round (mean +- std over seeds), Miss / Hall after the last round, pairs kept."""
    n = min(len(r) for rs in runs.values() for r in rs)
    lines = ["| variant (3 seeds) | SFT | " + " | ".join(f"round {t}" for t in range(1, n + 1)) + " | last round Miss / Hall | pairs kept a round |",
             "| --- | --- | " + " | ".join("---" for _ in range(n)) + " | --- | --- |"]
    for name, rs in runs.items():
        cells = ["%.1f +- %.1f" % mean_std([100 * r[t]["total"] for r in rs]) for t in range(n)]
        miss, hall = (mean_std([100 * r[n - 1][k] for r in rs]) for k in ("miss", "hall"))
        pairs = " / ".join(str(round(statistics.mean(r[t]["pairs"] for r in rs))) for t in range(n))
        lines.append(f"| {VARIANTS[name][1]} | {100 * sft['total']:.1f} | " + " | ".join(cells)
                     + f" | {miss[0]:.1f} +- {miss[1]:.1f} / {hall[0]:.1f} +- {hall[1]:.1f} | {pairs} |")
    return "\n".join(lines)


def main():
    os.chdir(ROOT)
    os.makedirs(OUT, exist_ok=True)
    for name, (flags, _) in VARIANTS.items():
        for seed in SEEDS:
            if rounds_of(name, seed) is None:
                d = run_dir(name, seed)
                print(f"ablations: {name}, seed {seed} -> {d}", flush=True)
                subprocess.run([sys.executable, "train_mrdpo.py", CONFIG, f"--seed={seed}", f"--out_dir={d}",
                                f"--results={os.path.join(OUT, f'{name}_s{seed}.json')}", *flags], check=True)
    runs = {name: [rounds_of(name, seed) for seed in SEEDS] for name in VARIANTS}
    with open(os.path.join("out", "toy", "results.json")) as f:
        sft = json.load(f)["sft"]
    text = table(runs, sft)
    print(text)
    with open(os.path.join("out", "toy", "ablations.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join("out", "toy", "ablations.json"), "w") as f:
        json.dump({"sft": {k: sft[k] for k in ("miss", "hall", "total")}, "seeds": SEEDS,
                   "runs": {n: {str(s): r for s, r in zip(SEEDS, rs)} for n, rs in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
