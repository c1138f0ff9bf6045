"""Run the retraining benchmark: every method on every setting, LDS ± s.e., wall time, gradient evaluations.

    python -m benchmarks.lds.run                               # all settings, all methods
    python -m benchmarks.lds.run --settings digits --methods graddot,if,bif-default
    python -m benchmarks.lds.run --rebuild                     # retrain the ground truth (cached otherwise)

Rows go to ``benchmarks/results/lds.csv`` (metric ``lds``, p50 = mean, p20/p80 = mean ∓ s.e.; and
``seconds`` and ``grad_evals``), the table to stdout and ``benchmarks/lds/results.md``, plots of LDS against
wall time and against gradient evaluations to ``benchmarks/lds/lds_<setting>.png`` (matplotlib optional).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.lds.ground_truth import ground_truth
from benchmarks.lds.methods import Attribution, bif, bif_kinetic, exact_if, graddot, gradsim
from benchmarks.lds.metrics import lds
from benchmarks.lds.settings import SETTINGS, Setting

HERE = Path(__file__).resolve().parent
DAMPINGS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4)
# Hand-chosen kinetic-sampler settings (nbeta, damping): the two ends the studies behind the defaults
# found (large nbeta for a smooth minimum, small nbeta for a non-smooth one).
KINETIC = ((1e6, 3e-3), (1e4, 1e-2))
METHODS = ("graddot", "gradsim", "if", "ekfac", "bif-default", "bif-kinetic")


def _reference_model(setting: Setting, gt) -> torch.nn.Module:
    model = setting.make_model()
    model.load_state_dict(gt["w_star"])
    return model.eval()


def _ekfac(setting: Setting, model: torch.nn.Module) -> list[Attribution]:
    """EK-FAC through kronfluence (optional: ``pip install kronfluence==1.0.1``), its default damping."""
    from benchmarks.lds.kronfluence_ekfac import ekfac_scores

    return ekfac_scores(setting, model)


def run_setting(name: str, methods: list[str], rebuild: bool, log=print) -> list[tuple[Attribution, object]]:
    setting = SETTINGS[name]()
    gt = ground_truth(setting, rebuild=rebuild, log=log)
    model = _reference_model(setting, gt)
    results = []
    for method in methods:
        try:
            if method == "graddot":
                atts = [graddot(setting, model)]
            elif method == "gradsim":
                atts = [gradsim(setting, model)]
            elif method == "if":
                atts = exact_if(setting, model, DAMPINGS)
            elif method == "ekfac":
                atts = _ekfac(setting, model)
            elif method == "bif-default":
                atts = [bif(setting, model, None)]
            elif method == "bif-kinetic":
                atts = [bif_kinetic(setting, model, nbeta=nb, damping=dmp) for nb, dmp in KINETIC]
            else:
                raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        except ImportError as exc:
            log(f"{name}: {method} skipped ({exc})")
            continue
        for att in atts:
            score = lds(att.scores, gt["masks"], gt["retrained"])
            log(f"{name:8s} {att.method:34s} LDS {score}  {att.seconds:8.1f} s  {att.grad_evals:10.3g} grad evals")
            results.append((att, score))
    return results


def _rows(name: str, results) -> list[dict]:
    rows = []
    for att, score in results:
        base = {"provider": att.method, "mode": "lds", "shape": name, "dtype": "float32" if "BIF" in att.method
                else "float64", "n_runs": 1}  # fmt: skip
        rows.append({**base, "metric": "lds", "unit": "spearman", "p50": score.mean, "p20": score.mean - score.stderr,
                     "p80": score.mean + score.stderr})  # fmt: skip
        rows.append({**base, "metric": "seconds", "unit": "s", "p50": att.seconds})
        rows.append({**base, "metric": "grad_evals", "unit": "count", "p50": att.grad_evals})
    return rows


def table(all_results: dict[str, list]) -> str:
    lines = ["| setting | method | LDS ± s.e. | wall time | gradient evaluations |", "| --- | --- | --- | --- | --- |"]
    for name, results in all_results.items():
        for att, score in results:
            lines.append(f"| {name} | {att.method} | {score} | {att.seconds:.1f} s | {att.grad_evals:.3g} |")
    return "\n".join(lines)


def plot(name: str, results, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "seconds", "wall time (s)"), (axes[1], "grad_evals", "gradient evaluations")):
        for att, score in results:
            x = att.seconds if key == "seconds" else att.grad_evals
            ax.errorbar([x], [score.mean], yerr=[score.stderr], fmt="o", capsize=3, label=att.method)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("LDS (mean ± s.e. over queries)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"retraining benchmark: {SETTINGS[name]().description}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true", help="retrain the cached ground truth")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    all_results = {}
    for name in args.settings.split(","):
        all_results[name] = run_setting(name, args.methods.split(","), args.rebuild)
        plot(name, all_results[name], HERE / f"lds_{name}.png")
    text = table(all_results)
    print(text)
    if not args.no_record:
        from benchmarks.utils import write_rows

        (HERE / "results.md").write_text(text + "\n")
        write_rows("lds", [r for name, res in all_results.items() for r in _rows(name, res)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
