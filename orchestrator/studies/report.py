"""`imitate-orch report RUN_DIR`: report.md with PNG plots for a finished run, written to
<run>/report/ (or --out) and logged to the job's MLflow run under `report/`.

Sections (the paper's figure or table in brackets):
1. results on test [Table 1]: AT demonstrator, NAT without imitation (from the ablation, when
   there is one), imitate-NAT, imitate-NAT + LPD: BLEU, chrF, batch-1 latency, speedup;
2. the ablation [Table 2], when `imitate-orch ablate` has written <workdir>/<job>-ablate/ablation.json;
3. training curves of teacher and student (`train/loss`, `valid/bleu` from MLflow);
4. BLEU and latency vs ΔT on the valid (or test) set: NAT+LPD at ΔT = 0..max, AT and NAT as references;
5. action usage [Figure 4]: argmax-action histogram of the run's teacher and, with and without
   the regularizer, of a teacher trained with λ1 = 0 (`--compare-teacher`, or the one
   `imitate-orch ablate --lambda1-zero-teacher` trains). When there is none, the report says so.

The job spec comes from the job's MLflow run (its job.yaml) or from --job. Whatever is
missing (no ablation, no curves, no λ1 = 0 teacher) is stated in report.md, never skipped silently.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import torch

from ..decoding import read_split
from ..run.files import atomic_write_text
from ..run.layout import RunNotReady, check_finished, model_path, spm_path
from ..run.manifest import read_manifest
from ..run.tracking import RunHandle, resolve_tracking_uri
from ..spec.schema import JobSpec
from . import plots
from .ablate import LAMBDA1_ZERO, NO_IMITATION, table2_markdown
from .measures import JobRun, delta_t_sweep, find_job_run, teacher_action_usage, training_curves


def ablation_of(rd: Path) -> Path:
    return rd.parent / f"{rd.name}-ablate"


def default_tracking_uri(rd: Path) -> str:
    """The store a run dir's job logged to: its work dir's, and for an ablation variant
    (<workdir>/<job>-ablate/<variant>) the job's work dir's, where `ablate` tracks it."""
    workdir = rd.parent.parent if rd.parent.name.endswith("-ablate") else rd.parent
    return resolve_tracking_uri(None, workdir)


def results_section(rd: Path, spec: JobSpec, ablation: dict | None) -> list[str]:
    summary = json.loads((rd / "evaluate" / "summary.json").read_text())
    rows = summary["rows"]
    e = spec.eval
    table = [(f"AT demonstrator (beam {e.beam_size})", rows["at"])]
    if ablation and NO_IMITATION in ablation["variants"]:
        v = ablation["variants"][NO_IMITATION]
        kept = " (its imitation modules kept: an ablation from before 2026-12)" if ablation.get("format", 1) < 2 else ""
        table.append((f"NAT without imitation (ablation row 3){kept}",
                      {"bleu": v["test"]["nat"], "chrf": v["test_chrf"]["nat"], "latency_ms": v["latency_ms"]["nat"],
                       "speedup": v["speedup"]["nat"]}))  # vs the AT timed beside it, in its own evaluate stage
    nat = spec.student.label()
    table += [(nat, rows["nat"]), (f"{nat} (+LPD, ΔT = {e.delta_t})", rows["lpd"])]
    lines = ["## Results on test (Table 1)", "",
             f"{summary['test_sentences']} test sentences, decoded on {summary['device']}; latency is the median "
             f"of {e.latency_sentences} sentences decoded one at a time, the decoders taking turns on each; speedup "
             f"is relative to the AT.", "",
             "| model | BLEU | chrF | ms/sentence (batch 1) | speedup |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {r['bleu']:.2f} | {r['chrf']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}× |"
              for name, r in table]
    return lines + ["", f"sacreBLEU: `{rows['at']['bleu_signature']}`", ""]


def ablation_section(rd: Path, out: Path, ablation: dict | None) -> list[str]:
    lines = ["## Ablation (Table 2)", ""]
    path = ablation_of(rd) / "ablation.json"
    if ablation is None:
        return lines + [f"No ablation found ({path} does not exist): run `imitate-orch ablate JOB` to add "
                        "Table 2.", ""]
    ours = read_manifest(rd / "teacher").input_hash
    any_variant = next(iter(ablation["variants"].values()))  # all share one teacher
    theirs = read_manifest(Path(any_variant["stages"]["teacher"]))
    if theirs is None or theirs.input_hash != ours:
        lines += [f"**Note:** the ablation in {path} was run with another teacher than this run's "
                  "(the job changed since); rerun `imitate-orch ablate JOB`.", ""]
    rows = [r for r in ablation["rows"] if r["valid_bleu"] is not None]  # `ablate --only`: some not run yet
    plots.bar_plot(out / "ablation.png",
                   {"valid BLEU": [r["valid_bleu"] for r in rows], "test BLEU": [r["test_bleu"] for r in rows]},
                   "Ablation (Table 2)", "", "BLEU",
                   categories=[f"{r['row']}. {r['variant']}{' + LPD' if r['lpd'] else ''}" for r in rows])
    return lines + [table2_markdown(ablation), "![ablation](ablation.png)", ""]


def curves_section(rd: Path, out: Path, uri: str) -> list[str]:
    lines = ["## Training curves", ""]
    curves = training_curves(rd, uri)
    missing = [s for s in ("teacher", "student") if s not in curves]
    if missing:
        lines += [f"No training curves for {' and '.join(missing)} in MLflow ({uri}): no run of that stage "
                  "started while its manifest was being written (trained elsewhere, or tracked in another store?).", ""]
    if not curves:
        return lines
    for key, file, title in (("train/loss", "loss.png", "training loss"), ("valid/bleu", "valid_bleu.png", "valid BLEU")):
        series = {stage: ([p[0] for p in c[key]], [p[1] for p in c[key]]) for stage, c in curves.items() if c[key]}
        plots.line_plot(out / file, series, title.capitalize(), "step", key, markers=key == "valid/bleu")
        lines.append(f"![{title}]({file})")
    runs = ", ".join(f"{stage}: `{c['run_id']}`" for stage, c in curves.items())
    return lines + ["", f"MLflow runs: {runs}. Valid BLEU during training is greedy (AT) or one-pass (NAT).", ""]


def delta_t_section(rd: Path, out: Path, spec: JobSpec, split: str, max_delta_t: int, device: str,
                    progress: bool) -> list[str]:
    s = delta_t_sweep(rd, spec, split, max_delta_t, device, out / "delta_t.json", progress)
    at, nat, label = s["at"], s["nat"], spec.student.label()
    plots.line_plot(out / "bleu_vs_delta_t.png", {f"{label} + LPD": (s["delta_t"], s["bleu"])},
                    f"BLEU vs ΔT ({split})", "ΔT", "BLEU", markers=True,
                    hlines={f"AT beam {spec.eval.beam_size}": at["bleu"], f"{label} (one pass)": nat["bleu"]})
    plots.line_plot(out / "latency_vs_delta_t.png", {f"{label} + LPD": (s["delta_t"], s["latency_ms"])},
                    f"Batch-1 latency vs ΔT ({split}, {s['device']})", "ΔT", "ms / sentence", markers=True,
                    hlines={f"AT beam {spec.eval.beam_size}": at["latency_ms"], f"{label} (one pass)": nat["latency_ms"]})
    lines = [f"## BLEU and latency vs ΔT ({split} set)", "",
             f"{s['sentences']} {split} sentences; LPD decodes lengths T̂−ΔT … T̂+ΔT in one NAT pass and "
             f"rescores them with the AT. ΔT = {spec.eval.delta_t} is the job's setting. Latencies: batch 1, the "
             f"median of {spec.eval.latency_sentences} sentences, every decoder below taking its turn on each.", "",
             "| decoder | BLEU | ms/sentence | speedup vs AT |", "|---|---:|---:|---:|",
             f"| AT beam {spec.eval.beam_size} | {at['bleu']:.2f} | {at['latency_ms']:.1f} | 1.00× |",
             f"| {label} (one pass) | {nat['bleu']:.2f} | {nat['latency_ms']:.1f} | {at['latency_ms'] / nat['latency_ms']:.2f}× |"]
    lines += [f"| + LPD ΔT = {d} | {b:.2f} | {ms:.1f} | {at['latency_ms'] / ms:.2f}× |"
              for d, b, ms in zip(s["delta_t"], s["bleu"], s["latency_ms"])]
    return lines + ["", "![BLEU vs ΔT](bleu_vs_delta_t.png) ![latency vs ΔT](latency_vs_delta_t.png)", ""]


def compare_teacher_files(rd: Path, compare: Path | None) -> tuple[Path, Path] | None:
    """(model.pt, spm.model) of the λ1 = 0 teacher: --compare-teacher (a run dir, or a model
    file read with this run's tokenizer), else the one `ablate --lambda1-zero-teacher` trained."""
    if compare is not None:
        compare = Path(compare)
        if compare.is_dir():
            return model_path(compare, "teacher"), spm_path(compare)
        return compare, spm_path(rd)
    auto = ablation_of(rd) / LAMBDA1_ZERO
    m = read_manifest(auto / "teacher")
    return (model_path(auto, "teacher"), spm_path(auto)) if m and m.status == "done" else None


def action_section(rd: Path, out: Path, spec: JobSpec, split: str, compare: Path | None, device: str) -> list[str]:
    src, ref = read_split(rd, split)
    bt = spec.eval.batch_tokens
    teachers = {f"this run's teacher (λ1 = {spec.teacher.lambda1:g})":
                teacher_action_usage(model_path(rd, "teacher"), spm_path(rd), src, ref, device, bt,
                                     out / "action_usage.json")}
    lines = ["## Action usage (Figure 4)", "",
             f"How often each action is the argmax of π (eq 3) in the teacher, teacher-forced on the {split} set, "
             "over all target positions and decoder layers. The regularizer (eq 7-9, weight λ1) is meant to spread "
             "the usage; exp(entropy) is the number of equally used actions it amounts to.", ""]
    files = compare_teacher_files(rd, compare)
    if files is None:
        lines += [f"**No λ1 = 0 teacher to compare with**: none given (`--compare-teacher`) and none at "
                  f"{ablation_of(rd) / LAMBDA1_ZERO}; run `imitate-orch ablate JOB --lambda1-zero-teacher` to "
                  "train one. Only this run's teacher is shown.", ""]
    else:
        teachers["teacher with λ1 = 0"] = teacher_action_usage(files[0], files[1], src, ref, device, bt,
                                                               out / "action_usage_lambda1_0.json")
        lines += [f"The λ1 = 0 teacher: `{files[0]}`.", ""]
    lines += ["| teacher | actions used | entropy (nats) | exp(entropy) | entropy per layer |", "|---|---:|---:|---:|---|"]
    for name, u in teachers.items():
        per_layer = ", ".join(f"{h:.2f}" for h in u["per_layer_entropy"])
        lines.append(f"| {name} | {u['used']} / {u['n_actions']} | {u['entropy']:.2f} (max {u['max_entropy']:.2f}) | "
                     f"{math.exp(u['entropy']):.1f} | {per_layer} |")
    # Sorted shares of the used actions on a log scale: a balanced usage is a long, flat curve;
    # a collapsed one drops fast and ends early (grouped bars over 512 slots hide each other).
    shares = {}
    for name, u in teachers.items():
        total = max(1, sum(u["counts"]))
        used = sorted((c / total for c in u["counts"] if c), reverse=True)
        shares[name] = (range(1, len(used) + 1), used)
    plots.line_plot(out / "action_usage.png", shares, f"Action usage ({split} set)", "action rank (most used first)",
                    "share of positions", logy=True)
    return lines + ["", "![action usage](action_usage.png)", ""]


def write_report(run_dir, out=None, spec: JobSpec | None = None, tracking_uri: str | None = None,
                 compare_teacher=None, max_delta_t: int | None = None, split: str = "valid", progress: bool = True,
                 echo=print) -> Path:
    """Write report.md and its plots for a finished run dir; returns the path of report.md.
    Raises RunNotReady naming the first unfinished stage, or when no job spec is found."""
    from ..run.hashing import stage_hashes

    rd = Path(run_dir).resolve()
    check_finished(rd)
    uri = tracking_uri or (resolve_tracking_uri(spec.tracking.uri, spec.workdir) if spec else default_tracking_uri(rd))
    job = find_job_run(rd, uri, spec)
    if job is None and spec is None:
        raise RunNotReady(f"cannot find the job spec of {rd} in MLflow ({uri}): no run tagged job={rd.name} has a "
                          "job.yaml matching the run dir's stages. Pass --job JOB.yaml (or --tracking-uri).")
    if job is None:
        job = JobRun(spec, None, stage_hashes(spec)["evaluate"] == read_manifest(rd / "evaluate").input_hash)
    spec, out = job.spec, Path(out or rd / "report")
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ablation_json = ablation_of(rd) / "ablation.json"
    ablation = json.loads(ablation_json.read_text()) if ablation_json.is_file() else None
    max_delta_t = spec.eval.delta_t if max_delta_t is None else max_delta_t

    lines = [f"# Report: {spec.name}", "",
             f"Run dir `{rd}`; written {dt.datetime.now().isoformat(timespec='seconds')}; job spec from "
             + (f"MLflow run `{job.run_id}` ({uri})" if job.run_id else "the job file given") + "."]
    if not job.matches:
        lines += ["", "**Note:** the job spec given does not match the run dir's stages (another configuration "
                  "produced this run): eval settings below are the spec's."]
    lines.append("")
    sections = (("results", lambda: results_section(rd, spec, ablation)),
                ("ablation", lambda: ablation_section(rd, out, ablation)),
                ("training curves", lambda: curves_section(rd, out, uri)),
                (f"ΔT sweep 0..{max_delta_t} on {split}", lambda: delta_t_section(rd, out, spec, split, max_delta_t,
                                                                               device, progress)),
                ("action usage", lambda: action_section(rd, out, spec, split, compare_teacher, device)))
    for name, make in sections:
        echo(f"report: {name}")
        lines += make()
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    if job.run_id:
        from mlflow import MlflowClient

        RunHandle(MlflowClient(tracking_uri=uri), job.run_id).log_artifact(out, "report")
        echo(f"report: logged to MLflow run {job.run_id} under report/ ({uri})")
    else:
        echo("report: not logged to MLflow (no MLflow run of this job was found)")
    return report
