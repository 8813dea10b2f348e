"""`imitate-orch ablate JOB`: the paper's ablation (Table 2) on any job.

Each variant is the job with four student switches overridden, run as its own pipeline run
in `<workdir>/<job>-ablate/<variant>/`. The rows (Table 2 of the paper, IWSLT16 dev set):

    row  variant                      targets    copy         imitation   LPD
    1    raw-uniform                  raw        UniformCopy  w/o         -
    2    distilled-uniform            distilled  UniformCopy  w/o         -   (the NAT baseline)
    3    distilled-soft               distilled  SoftCopy     w/o         -   (Table 1's "NAT without imitation")
    4    raw-soft-imitation           raw        SoftCopy     w/          -
    5    distilled-uniform-imitation  distilled  UniformCopy  w/          -
    6    distilled-soft-imitation     distilled  SoftCopy     w/          -   (imitate-NAT)
    7    distilled-soft-imitation     distilled  SoftCopy     w/          ΔT = eval.delta_t
    8    distilled-soft-modules       distilled  SoftCopy     modules, no L_IL  (not in the paper)

"w/o" is the paper's: a normal NAT, without imitation modules. Row 8 keeps the modules
(initialized from the demonstrator) and drops only L_IL: rows 3 → 8 → 6 split imitation's
effect into the modules' and the loss's. (Before 2026-12, rows 1-3 were row 8's kind and
UniformCopy copied the encoder's states; ablation.json files from then say so: "format": 1.)

Read cumulatively: 2 → 3 adds SoftCopy, 3 → 6 imitation, 6 → 7 LPD; 1 vs 2 and 4 vs 6 are raw
vs distilled targets. LPD is decoding only, so row 7 trains nothing: it is row 6's student
decoded with LPD. Every variant's NAT and NAT+LPD scores are kept in ablation.json.

Seeds (`--seeds N`): each variant's student is trained N times, with student.seed = the job's
seed + k (k = 0 is the job's own seed: the variant's usual run dir); the table gives the mean ±
standard deviation, and ablation.json paired bootstrap p-values on test (studies/seeds.py).

Sharing: the variants differ only in the student, so prepare/tokenizer/teacher/distill are one
copy for all. A stage is linked to the job's own run dir (`<workdir>/<job>/<stage>`) when the
variant's stage hash equals the job's and that dir is pending or holds the same hash, so
`imitate-orch run JOB` then `imitate-orch ablate JOB` trains no second teacher (and row 6,
when the job's student is imitate-NAT, reuses the job's student and evaluation too); a job
dir holding another hash (the job changed since) is left alone and the stage is shared
through `<workdir>/<job>-ablate/shared/<stage>/<hash>` instead.

`--lambda1-zero-teacher` also trains a teacher with λ1 = 0 (`<job>-ablate/lambda1-0/`, data
stages shared) for Figure 4's with/without-regularizer comparison in `imitate-orch report`.

Scores: test BLEU from each variant's evaluate stage; valid BLEU (the paper's Table 2 is on
the dev set) by decoding the full valid set here, cached per student model.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..pipeline import nothing_to_run, run_pipeline
from ..run.files import atomic_write_json, atomic_write_text
from ..run.hashing import stage_hashes
from ..run.layout import STAGES, model_path, run_dir
from ..run.manifest import read_manifest
from ..run.sharing import shared_stage_dirs
from ..run.tracking import NestedTracker, make_tracker
from ..spec.loading import spec_from_dict
from ..spec.schema import COPY_NAMES, JobSpec

log = logging.getLogger("imitate_orch")

LAMBDA1_ZERO = "lambda1-0"  # the λ1 = 0 teacher's run, beside the variants


ABLATION_FORMAT = 2   # of ablation.json: 2 since module-free "w/o" rows and the paper's UniformCopy


@dataclass(frozen=True)
class Variant:
    name: str
    targets: str     # distilled | raw
    copy: str        # soft | uniform
    imitation: bool
    modules: bool    # the student has imitation modules

    def overrides(self) -> dict:
        return {"targets": self.targets, "copy": self.copy, "imitation": self.imitation,
                "imitation_modules": self.modules}


VARIANTS = (
    Variant("raw-uniform", "raw", "uniform", False, False),
    Variant("distilled-uniform", "distilled", "uniform", False, False),
    Variant("distilled-soft", "distilled", "soft", False, False),
    Variant("raw-soft-imitation", "raw", "soft", True, True),
    Variant("distilled-uniform-imitation", "distilled", "uniform", True, True),
    Variant("distilled-soft-imitation", "distilled", "soft", True, True),
    Variant("distilled-soft-modules", "distilled", "soft", False, True),
)
# Table 2's rows: (variant, decoded with LPD). Row 7 is row 6 with LPD; row 8 is not the paper's.
ROWS = tuple((v.name, False) for v in VARIANTS[:6]) + (("distilled-soft-imitation", True),
                                                       ("distilled-soft-modules", False))
NO_IMITATION = "distilled-soft"  # Table 1's "NAT without imitation"


def ablation_dir(spec: JobSpec) -> Path:
    return Path(spec.workdir).resolve() / f"{spec.name}-ablate"


def derived_spec(base: JobSpec, name: str, student: dict | None = None, teacher: dict | None = None) -> JobSpec:
    """The base job renamed `name`, working in the ablation dir, with section overrides."""
    raw = base.model_dump(mode="json")
    raw.update(name=name, workdir=str(ablation_dir(base)))
    raw["student"].update(student or {})
    raw["teacher"].update(teacher or {})
    return spec_from_dict(raw, f"{base.name} ablation {name}")


def stage_links(spec: JobSpec, base: JobSpec) -> dict[str, Path]:
    """Where each stage of a derived run lives: the base job's own stage dir while the hashes
    agree and that dir is free or holds the same hash; from the first stage whose job dir
    holds another hash on, a shared dir (data and teacher stages) so the chain stays in one
    place; a stage that differs from the job's, the run's own dir (no link)."""
    mine, theirs = stage_hashes(spec), stage_hashes(base)
    shared = shared_stage_dirs(spec, ablation_dir(base) / "shared")
    links, diverged = {}, False
    for stage in STAGES:
        if mine[stage] != theirs[stage]:
            break  # differs from the job from here on: this run's own dirs
        job_dir = run_dir(base) / stage
        m = read_manifest(job_dir)
        diverged = diverged or (m is not None and m.input_hash != mine[stage])
        if not diverged:
            links[stage] = job_dir
        elif stage in shared:
            links[stage] = shared[stage]
    return links


def describe_links(links: dict[str, Path], base: JobSpec) -> str:
    ours = [s for s, d in links.items() if d == run_dir(base) / s]
    shared = [s for s in links if s not in ours]
    parts = ([f"shares {', '.join(ours)} with the job's run"] if ours else []) + \
            ([f"{', '.join(shared)} from {ablation_dir(base).name}/shared"] if shared else [])
    return "; ".join(parts) or "shares nothing"


def valid_scores(rd: Path, spec: JobSpec, device: str) -> dict:
    """Valid BLEU of the run's NAT and NAT+LPD, cached in <run>/ablation_valid.json under the
    checksums of what it decodes (models, tokenizer, valid set) and the eval settings."""
    from ..decoding import score_run
    from .measures import cached, decoding_key

    key = {**decoding_key(rd, "valid"), "eval": spec.eval.model_dump(mode="json")}

    def compute() -> dict:
        rows = score_run(rd, spec, "valid", ("nat", "lpd"), device)
        return {"sentences": rows["sentences"], "nat": rows["nat"]["bleu"], "lpd": rows["lpd"]["bleu"]}

    return cached(rd / "ablation_valid.json", key, compute)


def variant_result(v: Variant, rd: Path, spec: JobSpec, device: str) -> dict:
    evaluation = json.loads((rd / "evaluate" / "summary.json").read_text())
    summary = evaluation["rows"]
    valid = valid_scores(rd, spec, device)
    return {"targets": v.targets, "copy": v.copy, "imitation": v.imitation, "modules": v.modules,
            "run_dir": str(rd), "seed": spec.training_seed("student"),
            "valid_sentences": valid["sentences"], "test_sentences": evaluation["test_sentences"],
            "valid": {"nat": valid["nat"], "lpd": valid["lpd"]},
            "test": {k: summary[k]["bleu"] for k in ("nat", "lpd")},
            "test_chrf": {k: summary[k]["chrf"] for k in ("nat", "lpd")},
            "test_at": summary["at"]["bleu"],
            "latency_ms": {k: summary[k]["latency_ms"] for k in summary},
            "speedup": {k: summary[k]["speedup"] for k in summary},
            "stages": {s: str((rd / s).resolve()) for s in STAGES}}


def seed_specs(base: JobSpec, v: Variant, seeds: int) -> list[JobSpec]:
    """The variant's runs, one per student seed: the job's seed first (the variant's own run
    dir, as without --seeds), then the job's seed + k in `<variant>-seed<seed>`."""
    specs = [derived_spec(base, v.name, student=v.overrides())]
    for k in range(1, seeds):
        seed = base.seed + k
        specs.append(derived_spec(base, f"{v.name}-seed{seed}", student={**v.overrides(), "seed": seed}))
    return specs


def with_runs(first: dict, runs: list[dict]) -> dict:
    """A variant's entry: its first seed's result (as without seeds) and every seed's scores."""
    keep = ("seed", "run_dir", "valid", "test", "test_chrf")
    return {**first, "runs": [{k: r[k] for k in keep} for r in runs]}


def table_rows(variants: dict) -> list[dict]:
    """Table 2's rows, BLEU the mean over a variant's seeds (std None for one seed); a variant
    not run yet (`ablate --only`) has no scores (None)."""
    from .seeds import mean_std

    rows = []
    for i, (name, lpd) in enumerate(ROWS, 1):
        v, kind = variants.get(name), "lpd" if lpd else "nat"
        switches = next(x for x in VARIANTS if x.name == name)
        row = {"row": i, "variant": name, "targets": switches.targets, "copy": switches.copy,
               "imitation": switches.imitation, "modules": switches.modules, "lpd": lpd, "seeds": 0,
               "valid_bleu": None, "test_bleu": None, "valid_std": None, "test_std": None}
        if v:
            runs = v.get("runs") or [v]
            row["seeds"] = len(runs)
            for split in ("valid", "test"):
                row[f"{split}_bleu"], row[f"{split}_std"] = mean_std([r[split][kind] for r in runs])
        rows.append(row)
    return rows


def _imitation_cell(r: dict) -> str:
    if r["imitation"]:
        return "w/"
    return "modules, no L_IL" if r.get("modules", True) else "w/o"


def _bleu_cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


SUMMED = " (L_IL summed over a batch's tokens)"


def table2_markdown(result: dict) -> str:
    """Table 2's layout; the caption names the decoding settings and set sizes. A table from
    before ABLATION_FORMAT 2 is shown as what it measured: its "w/o" rows kept the modules and
    its UniformCopy copied the encoder's states."""
    from .seeds import comparisons_markdown

    old = result.get("format", 1) < ABLATION_FORMAT
    lines = ["| # | variant | targets | copy | imitation | LPD | seeds | valid BLEU | test BLEU |",
             "|---:|---|---|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lpd = f"ΔT = {result['delta_t']}" if r["lpd"] else "–"
        copy = "uniform_encoder" if old and r["copy"] == "uniform" else r["copy"]
        scores = "not run yet | not run yet" if r["valid_bleu"] is None else \
            f"{_bleu_cell(r['valid_bleu'], r.get('valid_std'))} | {_bleu_cell(r['test_bleu'], r.get('test_std'))}"
        lines.append(f"| {r['row']} | {r['variant']} | {r['targets']} | {COPY_NAMES[copy]} | {_imitation_cell(r)} | "
                     f"{lpd} | {r.get('seeds', 1) or '–'} | {scores} |")
    weight = "" if "lambda2" not in result else \
        f"Imitation: λ2 = {result['lambda2']:g}{SUMMED if result['il_reduction'] == 'sum' else ''}. "
    note = ("\n**A table from before 2026-12**: its rows without imitation kept the imitation modules "
            "(only L_IL was off) and its UniformCopy copied the encoder's states, not the source embeddings.\n"
            if old else "")
    return ("\n".join(lines) + f"\n\nJob `{result['job']}`; BLEU (sacreBLEU) on valid ({result['valid_sentences']} "
            f"sentences) and test ({result['test_sentences']}), the mean ± standard deviation over the student "
            f"seeds; NAT rows are one parallel pass, LPD rescored by the shared AT teacher. {weight}Without imitation, "
            f"\"w/o\" is a NAT without imitation modules (the paper's). The AT teacher itself (beam "
            f"{result['beam']}): test BLEU {result['test_at']:.2f}.\n" + note
            + (f"\nNot run yet: {', '.join(result['missing'])} (`imitate-orch ablate JOB --only VARIANT`).\n"
               if result.get("missing") else "")
            + ("\n" + comparisons_markdown(result["comparisons"]) if result.get("comparisons") else ""))


def write_results(out: Path, base: JobSpec, variants: dict, extra: dict) -> dict:
    """ablation.json and ablation.md from the variants finished so far, rewritten after each."""
    from .seeds import comparisons

    first = next(iter(variants.values()))
    result = {"format": ABLATION_FORMAT, "job": base.name, "job_run_dir": str(run_dir(base)),
              "delta_t": base.eval.delta_t, "beam": base.eval.beam_size, "lambda2": base.student.lambda2,
              "il_reduction": base.student.il_reduction, "valid_sentences": first["valid_sentences"],
              "test_sentences": first["test_sentences"], "test_at": first["test_at"],
              "variants": variants, "missing": [v.name for v in VARIANTS if v.name not in variants], **extra}
    result["rows"] = table_rows(variants)
    result["comparisons"] = comparisons(result["rows"], variants, base.eval.bleu_tokenize)
    atomic_write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.md", table2_markdown(result))
    return result


def run_ablation(base: JobSpec, job_yaml: str, lambda1_zero_teacher: bool = False, progress: bool = True,
                 echo=print, only: tuple[str, ...] = (), seeds: int = 1) -> dict:
    """Run every variant (or those in `only`; the others are reported when already finished),
    each with `seeds` student seeds, score them, write ablation.json/.md after each variant and
    log to MLflow. Ray must be initialized by the caller. Raises pipeline.StageFailed."""
    import torch  # here, not at module level: the CLI imports VARIANTS from this module

    out = ablation_dir(base)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tracker = make_tracker(base)
    variants: dict[str, dict] = {}
    extra: dict = {"seeds": seeds}
    with tracker.parent(f"{base.name}-ablate", base.flat_params(), tags={"ablation_of": base.name}) as parent:
        nested = NestedTracker(tracker, parent.run_id, {"ablation_of": base.name})
        for i, v in enumerate(VARIANTS, 1):
            specs = seed_specs(base, v, seeds)
            if only and v.name not in only:
                done = [s for s in specs if nothing_to_run(s)]   # finished by an earlier ablate: in the table
                if done and done[0] is specs[0]:
                    runs = [variant_result(v, run_dir(s), s, device) for s in done]
                    variants[v.name] = with_runs(runs[0], runs)
                continue
            runs = []
            for k, spec in enumerate(specs):
                links = stage_links(spec, base)
                seed_note = f" seed {spec.student.seed} ({k + 1}/{seeds})" if seeds > 1 else ""
                echo(f"ablate [{i}/{len(VARIANTS)}] {v.name}{seed_note}: targets={v.targets} copy={v.copy} "
                     f"imitation={'on' if v.imitation else 'off'} modules={'yes' if v.modules else 'no'} "
                     f"({describe_links(links, base)})")
                run_pipeline(spec, job_yaml, progress=progress, tracker=nested, linked=links)
                runs.append(variant_result(v, run_dir(spec), spec, device))
                tracker.handle(nested.last_run_id).log_metrics(
                    {f"{split}_bleu_{kind}": runs[-1][split][kind] for split in ("valid", "test")
                     for kind in ("nat", "lpd")})
            variants[v.name] = with_runs(runs[0], runs)
            write_results(out, base, variants, extra)
        if lambda1_zero_teacher:
            spec = derived_spec(base, LAMBDA1_ZERO, teacher={"lambda1": 0.0})
            echo(f"ablate: teacher with λ1 = 0 for the action-usage comparison ({run_dir(spec)})")
            run_pipeline(spec, job_yaml, until="teacher", progress=progress, tracker=nested,
                         linked=stage_links(spec, base))
            extra["lambda1_zero_teacher"] = str(model_path(run_dir(spec), "teacher"))
        result = write_results(out, base, variants, extra)
        parent.log_metrics({f"row{r['row']}_{k}": r[k] for r in result["rows"] for k in ("valid_bleu", "test_bleu")
                            if r[k] is not None})
        parent.log_artifact(str(out / "ablation.json"))
        parent.log_artifact(str(out / "ablation.md"))
    return result
