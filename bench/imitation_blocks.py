"""Table 2 over replicate blocks: ablations run at different times or on different machines,
each with its own teacher, combined into one mean ± std and paired bootstrap p-values.

`imitate-orch ablate --seeds N` replicates the students of one teacher inside one workdir. A
block replicates the whole chain instead (job seed k: teacher, distillation, students), so
blocks can be run one at a time wherever there is a machine, and the teacher's own variance is
part of the spread. `save` keeps what a block's statistics need, small enough to commit (test
hypotheses, gzipped, and the scores); `combine` reads every saved block:

    python bench/imitation_blocks.py save runs/multi30k-ablate --block seed2
    python bench/imitation_blocks.py combine --refs data/multi30k/test2016.de

A row run later on a block's teacher (e.g. `ablate --set student.lambda2=1 --only
distilled-soft-imitation`, the best value of a λ2 grid) is added to the block with
`save ... --block seed2 --only distilled-soft-imitation`; combine gives it its own rows, "6 (λ2 = 1)".

Records go to bench/records/<job>-imitation/<block>/ unless --records says otherwise.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imitate_nat.data import read_lines  # noqa: E402
from imitate_nat.metrics import paired_bootstrap  # noqa: E402
from imitate_nat.atomic import atomic_write_bytes  # noqa: E402
from orchestrator.run.files import atomic_write_json, atomic_write_text  # noqa: E402
from orchestrator.studies.ablate import ROWS  # noqa: E402
from orchestrator.studies.seeds import COMPARISONS, mean_std  # noqa: E402

RECORDS = Path(__file__).resolve().parent / "records"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hyp_name(variant: str, seed: int, decoder: str) -> str:
    return f"{variant}.seed{seed}.test.{decoder}.txt.gz"


def lambda2_tag(value: float) -> str:
    """How a λ2 other than the block's names a variant and its table: "lambda2=1"."""
    return f"lambda2={value:g}"


def tag_text(tag: str) -> str:
    return tag.replace("lambda2=", "λ2 = ")


def variant_key(name: str, imitation: bool, result: dict, block: dict | None) -> str:
    """A variant's key in block.json: its name, with "@lambda2=X" when it trains with L_IL at
    another λ2 than the block's (a λ2 grid's best value run on the block's teacher)."""
    if block is None or not imitation or result["lambda2"] == block.get("lambda2", result["lambda2"]):
        return name
    return f"{name}@{lambda2_tag(result['lambda2'])}"


def save(ablation_dir: Path, block: str, records: Path | None, trained_at: str | None = None,
         only: list[str] | None = None) -> Path:
    """Copy one finished ablation's scores and test hypotheses into records/<job>-imitation/<block>/.
    `only`: add these variants to the block saved before (the same teacher), keeping the rest;
    an imitation variant trained at another λ2 than the block's is kept beside it (variant_key)."""
    result = json.loads((ablation_dir / "ablation.json").read_text())
    if only and not set(only) <= set(result["variants"]):
        raise SystemExit(f"{ablation_dir / 'ablation.json'} has no {sorted(set(only) - set(result['variants']))}")
    out = (records or RECORDS / f"{result['job']}-imitation") / block
    out.mkdir(parents=True, exist_ok=True)
    before = json.loads((out / "block.json").read_text()) if (out / "block.json").exists() else None
    if before and not only and (before.get("added") or before.get("lambda2") != result["lambda2"]):
        # saving anew would drop the rows added to the block, or file this λ2's rows as its own
        raise SystemExit(f"{out} holds a block at λ2 {before.get('lambda2')} with rows added later; this "
                         f"ablation is at λ2 {result['lambda2']}: pass --only VARIANT to add to it")
    saved = before if only else None
    if saved and saved.get("il_reduction", "mean") != result["il_reduction"]:
        raise SystemExit(f"{out} was saved with il_reduction {saved['il_reduction']}; this ablation "
                         f"has {result['il_reduction']}: save it as its own block")
    if saved and saved["test_at"] != result["test_at"]:   # the AT's test BLEU: a teacher's fingerprint
        raise SystemExit(f"{out} was saved from another teacher (AT test BLEU {saved['test_at']:.2f}, "
                         f"this ablation's {result['test_at']:.2f}): save it as its own block")
    variants = dict(saved["variants"]) if saved else {}
    for name, v in result["variants"].items():
        if only and name not in only:
            continue
        key = variant_key(name, v["imitation"], result, saved)
        for run in v["runs"]:
            for decoder in ("nat", "lpd"):
                # the evaluate stage's file as it is; mtime=0: saving again writes identical bytes
                hyps = (Path(run["run_dir"]) / "evaluate" / f"test.{decoder}.txt").read_bytes()
                atomic_write_bytes(out / hyp_name(key, run["seed"], decoder), gzip.compress(hyps, mtime=0))
        variants[key] = [{k: run[k] for k in ("seed", "valid", "test", "test_chrf")} for run in v["runs"]]
    now = {"commit": trained_at or commit(), "cpu": cpu_name(),
           "saved": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if saved:   # the block keeps its own provenance; each addition says where it came from
        meta = {**saved, "variants": variants,
                "added": saved.get("added", []) + [{"variants": sorted(only), "lambda2": result["lambda2"], **now}]}
    else:
        meta = {"block": block, "job": result["job"], "lambda2": result["lambda2"],
                "il_reduction": result["il_reduction"], "delta_t": result["delta_t"], "beam": result["beam"],
                "valid_sentences": result["valid_sentences"], "test_sentences": result["test_sentences"],
                "test_at": result["test_at"], "variants": variants, **now}
    atomic_write_json(out / "block.json", meta)
    if (ablation_dir / "ablation.md").exists():   # an addition's table beside the block's own
        name = f"ablation.{lambda2_tag(result['lambda2'])}.md" if saved else "ablation.md"
        atomic_write_text(out / name, (ablation_dir / "ablation.md").read_text())
    return out


def load_blocks(records: Path) -> list[tuple[Path, dict]]:
    blocks = [(p.parent, json.loads(p.read_text())) for p in sorted(records.glob("*/block.json"))]
    if not blocks:
        raise SystemExit(f"no blocks under {records} (save one first)")
    return blocks


def runs_of(blocks, variant: str, decoder: str) -> list[tuple[str, dict, Path | None]]:
    """(block, scores, hypotheses file) of every run of `variant` in the blocks that ran it; the
    file is None in a block kept with scores only ("hypotheses": false in its block.json)."""
    out = []
    for path, meta in blocks:
        kept = meta.get("hypotheses", True)
        for run in meta["variants"].get(variant, []):
            out.append((meta["block"], run, path / hyp_name(variant, run["seed"], decoder) if kept else None))
    return out


def test_bleu(run: dict, lpd: bool) -> float:
    return run["test"]["lpd" if lpd else "nat"]


def read_gz(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    return (text[:-1] if text.endswith("\n") else text).split("\n") if text else []


def step_line(a: str, b: str, what: str, rows: dict, refs: list[str], refs_path: Path, tokenize: str,
              resamples: int, read=read_gz) -> str:
    """One COMPARISONS step over the runs both rows have (same block and seed): the mean BLEU
    change over all of them, the paired bootstrap over those whose hypotheses were kept
    (`read`: how a hypotheses file is read)."""
    runs = {k: {(block, run["seed"]): (run, path) for block, run, path in rows[k][2]} for k in (a, b)}
    pairs = [key for key in runs[a] if key in runs[b]]
    delta = [test_bleu(runs[b][key][0], rows[b][1]) - test_bleu(runs[a][key][0], rows[a][1]) for key in pairs]
    kept = [key for key in pairs if runs[a][key][1] and runs[b][key][1]]
    p = "–"
    if kept:
        hyps = {k: [read(runs[k][key][1]) for key in kept] for k in (a, b)}
        if any(len(h) != len(refs) for k in hyps for h in hyps[k]):
            raise SystemExit(f"{refs_path} has {len(refs)} lines; the saved hypotheses have another count")
        p = f"{paired_bootstrap(hyps[b], hyps[a], refs, tokenize, resamples)['p']:.3f} ({len(kept)})"
    wins = sum(d > 0 for d in delta)
    return f"| {a} → {b} | {what} | {statistics.fmean(delta):+.2f} | {p} | {wins}/{len(delta)} |"


def row_label(number: int, tag: str) -> str:
    return f"{number} ({tag_text(tag)})" if tag else str(number)


def step_pairs(rows: dict, tags: list[str], block_lambda2: str):
    """COMPARISONS' steps between the rows present, each again with the tagged rows in place of
    their untagged ones, and each tagged row against its untagged one (the λ2 change alone)."""
    for tag in ["", *tags]:
        for a, b, what in COMPARISONS:
            la, lb = (label if (label := row_label(n, tag)) in rows else str(n) for n in (a, b))
            if (not tag or (la, lb) != (str(a), str(b))) and la in rows and lb in rows:
                yield la, lb, what + (f", {tag_text(tag)}" if tag else "")
        for number in range(1, len(ROWS) + 1):
            if tag and str(number) in rows and row_label(number, tag) in rows:
                yield str(number), row_label(number, tag), f"λ2 {block_lambda2} → {tag.split('=', 1)[1]}"


def combine(records: Path, refs_path: Path, tokenize: str, resamples: int) -> str:
    """Markdown: each block's test BLEU per row ("–" where the block did not run it), the mean ±
    std over the runs (every seed of every block one run), and COMPARISONS' steps; rows run at
    another λ2 than their blocks' (save --only) come after, labelled with it."""
    blocks = load_blocks(records)
    refs = read_lines(refs_path)
    tags = sorted({key.partition("@")[2] for _, meta in blocks for key in meta["variants"]} - {""})
    rows = {}
    for tag in ["", *tags]:
        for number, (variant, lpd) in enumerate(ROWS, 1):
            key = f"{variant}@{tag}" if tag else variant
            runs = runs_of(blocks, key, "lpd" if lpd else "nat")
            if runs:
                rows[row_label(number, tag)] = (key, lpd, runs)
    names = [meta["block"] for _, meta in blocks]
    lines = [f"| # | variant | LPD | {' | '.join(names)} | mean ± std |",
             "|---:|---|---|" + "---:|" * (len(names) + 1)]
    for label, (variant, lpd, runs) in rows.items():
        mean, std = mean_std([test_bleu(run, lpd) for _, run, _ in runs])
        per_block = [", ".join(f"{test_bleu(run, lpd):.2f}" for run in meta["variants"].get(variant, [])) or "–"
                     for _, meta in blocks]
        lines.append(f"| {label} | {variant} | {'yes' if lpd else '–'} | {' | '.join(per_block)} | "
                     f"{mean:.2f}{'' if std is None else f' ± {std:.2f}'} |")
    ats = ", ".join(f"{meta['test_at']:.2f}" for _, meta in blocks)
    lines += ["", f"The AT teacher of each block, test BLEU (beam {blocks[0][1]['beam']}): {ats}.", "",
              "| step | adds | test BLEU Δ (mean) | p (paired bootstrap; runs) | runs where it helps |",
              "|---|---|---:|---:|---:|"]
    read = functools.cache(read_gz)   # a row is in several steps: each file read once
    block_lambda2 = "/".join(sorted({f"{meta['lambda2']:g}" for _, meta in blocks if "lambda2" in meta}))
    lines += [step_line(a, b, what, rows, refs, refs_path, tokenize, resamples, read)
              for a, b, what in step_pairs(rows, tags, block_lambda2)]
    return "\n".join(lines) + (f"\n\np: the share of {resamples} sentence resamples (the same draw for every "
                               "run) in which the later row's mean BLEU is not above the earlier's, over the "
                               "runs whose hypotheses were kept (how many in brackets; – none).\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="keep one finished ablation as a block")
    s.add_argument("ablation_dir", type=Path, help="<workdir>/<job>-ablate, holding ablation.json")
    s.add_argument("--block", required=True, help="the block's name, e.g. seed2")
    s.add_argument("--records", type=Path, help="default: bench/records/<job>-imitation")
    s.add_argument("--commit", help="the commit the block was trained at (default: this checkout's HEAD)")
    s.add_argument("--only", action="append", metavar="VARIANT",
                   help="add this variant to the block saved before, keeping the rest (repeatable); at "
                        "another λ2 than the block's it is kept beside the block's own, as VARIANT@lambda2=X")
    c = sub.add_parser("combine", help="the blocks' Table 2 rows and paired bootstrap")
    c.add_argument("--records", type=Path, default=RECORDS / "multi30k-imitation")
    c.add_argument("--refs", type=Path, required=True, help="the test references, one sentence a line")
    c.add_argument("--tokenize", default="13a", help="sacreBLEU's tokenizer (the job's eval.bleu_tokenize)")
    c.add_argument("--resamples", type=int, default=1000)
    a = ap.parse_args(argv)
    if a.cmd == "save":
        print(f"saved to {save(a.ablation_dir, a.block, a.records, a.commit, a.only)}")
    else:
        print(combine(a.records, a.refs, a.tokenize, a.resamples))


if __name__ == "__main__":
    main()
