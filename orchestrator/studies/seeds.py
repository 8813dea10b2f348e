"""Table 2 over several student seeds: mean ± standard deviation per row, and paired bootstrap
p-values on test between the rows that isolate one switch (imitate_nat.metrics.paired_bootstrap,
every seed of a row one run of that system)."""
from __future__ import annotations

import statistics
from pathlib import Path

from imitate_nat.data import read_lines
from imitate_nat.metrics import paired_bootstrap

from ..run.layout import split_path

# (row from, row to, what the step adds): Table 2's rows as numbered in ablate.ROWS.
COMPARISONS = (
    (2, 3, "SoftCopy"),
    (3, 8, "imitation modules, no L_IL"),
    (8, 6, "L_IL, given the modules"),
    (3, 6, "imitation (modules and L_IL)"),
    (2, 5, "imitation, UniformCopy"),
    (6, 7, "LPD"),
)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def hypotheses(run_dir: str, decoder: str) -> list[str]:
    """One seed's test hypotheses of `decoder` ("nat" or "lpd"), from its evaluate stage."""
    return read_lines(Path(run_dir) / "evaluate" / f"test.{decoder}.txt")


def comparisons(rows: list[dict], variants: dict, tokenize: str, resamples: int = 1000) -> list[dict]:
    """Paired bootstrap of each COMPARISONS step whose two rows both have runs: test BLEU of
    the later row against the earlier one (one-sided p: small means the step helps)."""
    by_number = {r["row"]: r for r in rows}
    out = []
    for a, b, what in COMPARISONS:
        ra, rb = by_number.get(a), by_number.get(b)
        if not (ra and rb and ra["variant"] in variants and rb["variant"] in variants):
            continue
        runs = {}
        for key, r in (("from", ra), ("to", rb)):
            decoder = "lpd" if r["lpd"] else "nat"
            runs[key] = [hypotheses(run["run_dir"], decoder) for run in variants[r["variant"]]["runs"]]
        first_run = variants[ra["variant"]]["runs"][0]["run_dir"]
        refs = read_lines(split_path(Path(first_run), "test", "tgt"))
        test = paired_bootstrap(runs["to"], runs["from"], refs, tokenize, resamples)
        out.append({"from": a, "to": b, "what": what, "delta": test["delta"], "p": test["p"],
                    "seeds": [len(runs["from"]), len(runs["to"])], "resamples": resamples})
    return out


def comparisons_markdown(items: list[dict]) -> str:
    if not items:
        return ""
    lines = ["| step | adds | test BLEU Δ | p (paired bootstrap) |", "|---|---|---:|---:|"]
    for c in items:
        lines.append(f"| {c['from']} → {c['to']} | {c['what']} | {c['delta']:+.2f} | {c['p']:.3f} |")
    seeds = sorted({n for c in items for n in c["seeds"]})
    return ("\n".join(lines) + f"\n\nBLEU Δ: mean over each row's seeds ({'/'.join(map(str, seeds))}); p: the "
            f"share of {items[0]['resamples']} sentence resamples (the same for every seed) in which the later "
            "row's mean is not above the earlier's.\n")
