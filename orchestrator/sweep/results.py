"""A sweep's results: one row per trial, the best trial, results.md/json, plots and best.yaml."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ray import tune

from ..run.files import atomic_write_text
from ..run.layout import STAGES, run_dir
from ..run.manifest import read_manifest
from ..spec.loading import dump_spec, spec_from_dict
from ..spec.schema import JobSpec
from .trial import SAMPLED, trial_spec, trial_workdir

FINAL_METRICS = ("valid_bleu_lpd", "valid_bleu_nat")


RESULT_KEYS = ("valid_bleu", "valid_bleu_lpd", "best_delta_t", "latency_ms_lpd", "valid_bleu_nat", "latency_ms_nat",
               "valid_bleu_at", "latency_ms_at")


def sweep_dir(spec: JobSpec) -> Path:
    return Path(spec.workdir).resolve() / f"{spec.name}-sweep"


def root_error(e: BaseException) -> str:
    """The original exception behind Tune's and Ray's wrappers, as one line."""
    while getattr(e, "cause", None) is not None:  # RayTaskError / TuneError chains
        e = e.cause
    text = f"{type(e).__name__}: {e}"
    return text.splitlines()[0][:300]


def collect_rows(experiment_path: str, spec: JobSpec) -> list[dict]:
    """One row per trial: its sampled settings, status and scores. Status: done, stopped (by
    ASHA), failed, or unfinished (the sweep was interrupted; a rerun resumes it)."""
    rows = []
    for t in tune.ExperimentAnalysis(experiment_path).trials:
        metrics = t.last_result or {}
        if t.status == "ERROR":
            status = "failed"
        elif t.status != "TERMINATED":
            status = "unfinished"
        else:
            status = "done" if all(k in metrics for k in FINAL_METRICS) else "stopped"
        row = {"trial_id": t.trial_id, **{k: t.config[k] for k in SAMPLED}, "status": status,
               "rounds": metrics.get("training_iteration", 0),
               "run_dir": str(run_dir(trial_spec(spec.model_dump(mode="json"), t.config,
                                                 trial_workdir(sweep_dir(spec), t.trial_id))))}
        row.update({k: metrics[k] for k in RESULT_KEYS if k in metrics})
        row.update({k: v for k, v in metrics.items() if k.startswith(("valid_bleu_lpd_dt", "latency_ms_lpd_dt"))})
        if status == "failed":
            error = t.get_pickled_error() or t.get_error()
            row["error"] = root_error(error) if error is not None else "unknown error"
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def best_trial(rows: list[dict], metric: str, mode: str) -> dict | None:
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r[metric])


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def results_table(rows: list[dict], spec: JobSpec, best: dict | None) -> str:
    lines = [f"## Sweep `{spec.name}`: {len(rows)} trials, ranked by {spec.sweep.metric} ({spec.sweep.mode})", "",
             "| trial | λ1 | actions | λ2 | status | student valid BLEU | NAT valid BLEU | NAT+LPD valid BLEU | ΔT | "
             "ms/sentence (LPD, batch 1) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " **best**" if best and r["trial_id"] == best["trial_id"] else ""
        lines.append(f"| {r['trial_id']}{mark} | {r['lambda1']:.2e} | {r['n_actions']} | {r['lambda2']:.2e} | "
                     f"{r['status']} | {_num(r.get('valid_bleu'), '.2f')} | {_num(r.get('valid_bleu_nat'), '.2f')} | "
                     f"{_num(r.get('valid_bleu_lpd'), '.2f')} | {_num(r.get('best_delta_t'), 'd')} | "
                     f"{_num(r.get('latency_ms_lpd'), '.1f')} |")
    failed = [r for r in rows if r["status"] == "failed"]
    lines += [""] + [f"- trial {r['trial_id']} failed: {r.get('error', '?')}" for r in failed]
    if best:
        lines += ["", "Best configuration:", "",
                  "| teacher.lambda1 | model.n_actions | student.lambda2 | eval.delta_t | NAT+LPD valid BLEU | "
                  "NAT valid BLEU | AT valid BLEU | ms/sentence (LPD) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {best['lambda1']:.3g} | {best['n_actions']} | {best['lambda2']:.3g} | {best['best_delta_t']} | "
                  f"{best['valid_bleu_lpd']:.2f} | {best['valid_bleu_nat']:.2f} | {best['valid_bleu_at']:.2f} | "
                  f"{best['latency_ms_lpd']:.1f} |"]
    return "\n".join(lines) + "\n"


def best_spec(spec: JobSpec, best: dict) -> JobSpec:
    """The job with the best trial's settings and ΔT, named <job>-best (its own run dir)."""
    raw = trial_spec(spec.model_dump(mode="json"), best, spec.workdir).model_dump(mode="json")
    raw["name"] = f"{spec.name}-best"
    raw["eval"]["delta_t"] = best["best_delta_t"]
    return spec_from_dict(raw, "best.yaml")


def write_best_job(spec: JobSpec, best: dict, sd: Path, finished: bool = True) -> Path:
    b = best_spec(spec, best)
    so_far = "" if finished else " so far (the sweep was interrupted: rerun it to finish)"
    head = (f"# Best configuration{so_far} of the sweep of '{spec.name}' (trial {best['trial_id']}): "
            f"{spec.sweep.metric} = {best[spec.sweep.metric]:.2f} on the valid set.\n"
            f"# Run it: imitate-orch run {sd / 'best.yaml'}\n")
    return atomic_write_text(sd / "best.yaml", head + dump_spec(b))


def seed_best_run(spec: JobSpec, best: dict) -> None:
    """Give <workdir>/<job>-best/ the best trial's finished stages (prepare … student), as
    hard-linked copies (a plain copy across file systems): `imitate-orch run best.yaml` then
    reuses them by their hashes and only evaluates. Copies, not symlinks: a later edit of
    best.yaml reruns stages in its own dir without touching the sweep's shared ones."""
    target_rd = run_dir(best_spec(spec, best))
    source_rd = Path(best["run_dir"])
    for stage in STAGES[:STAGES.index("student") + 1]:
        src, dst = (source_rd / stage).resolve(), target_rd / stage
        m, have = read_manifest(src), read_manifest(dst)
        if m is None or m.status != "done" or (have is not None and have.input_hash == m.input_hash):
            continue
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_plots(rows: list[dict], spec: JobSpec, out: Path) -> list[Path]:
    """valid BLEU and latency vs ΔT (a line per finished trial); BLEU vs λ2 and vs action count."""
    from ..studies.plots import line_plot, scatter_plot

    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return []
    dts = list(spec.sweep.delta_t)

    def label(r):
        return f"{r['trial_id']}: λ1={r['lambda1']:.1e} n={r['n_actions']} λ2={r['lambda2']:.1e}"

    bleu = {label(r): (dts, [r[f"valid_bleu_lpd_dt{d}"] for d in dts]) for r in done}
    latency = {label(r): (dts, [r[f"latency_ms_lpd_dt{d}"] for d in dts]) for r in done}
    metric = spec.sweep.metric
    by_actions: dict[str, tuple[list, list]] = {}
    for r in done:
        xs, ys = by_actions.setdefault(f"{r['n_actions']} actions", ([], []))
        xs.append(r["lambda2"])
        ys.append(r[metric])
    return [
        line_plot(out / "valid_bleu_vs_delta_t.png", bleu, "NAT+LPD valid BLEU by ΔT", "ΔT", "valid BLEU", markers=True),
        line_plot(out / "latency_vs_delta_t.png", latency, "NAT+LPD batch-1 latency by ΔT", "ΔT", "ms / sentence",
                  markers=True),
        scatter_plot(out / "valid_bleu_vs_lambda2.png", by_actions, f"{metric} by λ2", "λ2 (imitation weight)",
                     metric, logx=True),
        scatter_plot(out / "valid_bleu_vs_n_actions.png", {"trials": ([r["n_actions"] for r in done],
                                                                      [r[metric] for r in done])},
                     f"{metric} by action count", "actions", metric, logx=True),
    ]
