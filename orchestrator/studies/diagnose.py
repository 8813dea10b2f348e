"""`imitate-orch diagnose RUN_DIR`: do the demonstrator's actions carry information, and does
the student imitate them? (imitate_nat/diagnostics.py says what each figure means.)

Teacher-forced on a split of the run (valid by default, every sentence): the demonstrator's
per-layer policy entropy, ‖u‖/‖o‖ and action–token mutual information, and for each student
(the run's own once trained, those given with --student, and with --ablation every finished
variant of the job's ablation that shares this run's teacher) H(π_AT, π_NAT), KL and argmax
agreement. A run whose teacher is trained can be diagnosed before its student is.
Then the demonstrator's BLEU on the first sentences of the split decoded as trained and with
u = 0 in every layer. Writes RUN_DIR/diagnostics/diagnostics.json and diagnostics.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..run.files import atomic_write_json, atomic_write_text, sha256_file
from ..run.layout import MODEL, RunNotReady, model_path, spm_path
from .measures import teacher_forced_batches


def _finished_model(rd: Path, stage: str) -> Path:
    path = model_path(rd, stage)
    if not path.is_file():
        raise RunNotReady(f"{rd}: no {stage} model ({path}); run the job's {stage} stage first")
    return path


def student_files(rd: Path, extra: tuple[str, ...] = (), ablation: bool = False) -> dict[str, Path]:
    """label -> student model file: the run's own (when trained: the demonstrator alone can be
    diagnosed before), then each --student (a run dir or a model file), then (ablation) the
    finished variants of <workdir>/<job>-ablate/ trained from this run's teacher."""
    own = model_path(rd, "student")
    students = {f"{rd.name} (this run)": own} if own.is_file() else {}
    for item in extra:
        p = Path(item).resolve()
        students[p.name if p.is_dir() else str(p)] = _finished_model(p, "student") if p.is_dir() else p
    if ablation:
        # Variants link the job's (or a shared) teacher dir: each distinct file is hashed once.
        digests: dict[Path, str] = {}

        def digest(path: Path) -> str | None:
            if not path.is_file():
                return None
            path = path.resolve()
            if path not in digests:
                digests[path] = sha256_file(path)
            return digests[path]

        teacher = digest(_finished_model(rd, "teacher"))
        seen = {p.resolve() for p in students.values()}
        for variant in sorted((rd.parent / f"{rd.name}-ablate").glob("*/student/" + MODEL)):
            vd = variant.parent.parent
            if digest(vd / "teacher" / MODEL) == teacher and variant.resolve() not in seen:
                students[f"ablation: {vd.name}"] = variant
                seen.add(variant.resolve())
    return students


def zeroed_u_bleu(at, tok, src: list[str], ref: list[str], beam: int, device: str, batch_tokens: int) -> dict:
    """The demonstrator's beam-search BLEU on (src, ref), as trained and with u = 0."""
    from imitate_nat.diagnostics import zeroed_actions
    from imitate_nat.translate import at_beam

    from ..decoding import translate_and_score

    decoder = (at_beam(at, beam_size=beam), beam)
    cap = at.cfg.max_positions
    trained = translate_and_score(decoder, tok, src, ref, batch_tokens, device, cap)[0]["bleu"]
    with zeroed_actions(at):
        zeroed = translate_and_score(decoder, tok, src, ref, batch_tokens, device, cap)[0]["bleu"]
    return {"sentences": len(src), "beam": beam, "bleu": trained, "bleu_u_zeroed": zeroed}


def run_diagnostics(run_dir, split: str = "valid", extra_students: tuple[str, ...] = (), ablation: bool = False,
                    bleu_sentences: int = 500, beam: int = 4, batch_tokens: int = 4096, echo=print) -> dict:
    """Measure, write diagnostics.json/.md under RUN_DIR/diagnostics, return the result."""
    from imitate_nat.checkpoint import load_model
    from imitate_nat.diagnostics import imitation_diagnostics
    from imitate_nat.tokenizer import Tokenizer

    from ..decoding import read_split

    rd = Path(run_dir).resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer(spm_path(rd))
    at, _ = load_model(_finished_model(rd, "teacher"), device)
    files = student_files(rd, extra_students, ablation)
    students = {}
    for label, path in files.items():
        nat, _ = load_model(path, device)
        if nat.cfg.vocab_size != at.cfg.vocab_size or nat.cfg.dec_layers != at.cfg.dec_layers:
            raise ValueError(f"{path}: another vocabulary or depth than {rd}'s teacher; give students of this job")
        students[label] = nat
    src, ref = read_split(rd, split)
    echo(f"diagnose: teacher-forced on {split} ({len(src)} sentences), {len(students)} student(s)")
    result = imitation_diagnostics(at, students, teacher_forced_batches(tok, src, ref, at.cfg.max_positions,
                                                                       device, batch_tokens))
    n = min(bleu_sentences, len(src))
    echo(f"diagnose: the demonstrator's BLEU with and without u on {n} sentences (beam {beam}, twice)")
    result["at"]["decoding"] = zeroed_u_bleu(at, tok, src[:n], ref[:n], beam, device, batch_tokens)
    result.update(run_dir=str(rd), split=split, sentences=len(src),
                  files={"teacher": str(model_path(rd, "teacher")), **{k: str(v) for k, v in files.items()}})
    out = rd / "diagnostics"
    atomic_write_json(out / "diagnostics.json", result)
    atomic_write_text(out / "diagnostics.md", diagnostics_markdown(result))
    return result


def _f(x: float) -> str:
    return f"{x:.3f}"


def diagnostics_markdown(r: dict) -> str:
    at, L = r["at"], len(r["at"]["policy_entropy"])
    d = at["decoding"]
    lines = [f"Teacher-forced on {r['split']} ({r['sentences']} sentences, {r['tokens']} target tokens); "
             f"{r['n_actions']} actions (max entropy {_f(torch.log(torch.tensor(float(r['n_actions']))).item())} "
             f"nats); target token entropy H(y) = {_f(r['target_entropy'])} nats.", "",
             "| layer | H(π_AT) | argmax-action entropy | ‖u‖/‖o‖ | I(a; y) | I(a; y), tokens shuffled |",
             "|---:|---:|---:|---:|---:|---:|"]
    for l in range(L):
        lines.append(f"| {l + 1} | {_f(at['policy_entropy'][l])} | {_f(at['action_entropy'][l])} | "
                     f"{_f(at['u_over_o'][l])} | {_f(at['mi_action_token'][l])} | "
                     f"{_f(at['mi_action_token_shuffled'][l])} |")
    lines += ["", f"The demonstrator (beam {d['beam']}, first {d['sentences']} sentences): BLEU {d['bleu']:.2f} "
              f"as trained, {d['bleu_u_zeroed']:.2f} with u = 0 in every layer "
              f"({d['bleu_u_zeroed'] - d['bleu']:+.2f}).", "",
              "| student | layer | H(π_AT, π_NAT) | KL(π_AT ‖ π_NAT) | argmax agreement |", "|---|---:|---:|---:|---:|"]
    if not r["students"]:
        lines.append("| (no student yet: the run's student stage has not finished; none given with --student) | | | | |")
    for name, s in r["students"].items():
        if not s["imitation_modules"]:
            lines.append(f"| {name} | – | no imitation modules | | |")
            continue
        for l in range(L):
            lines.append(f"| {name} | {l + 1} | {_f(s['cross_entropy'][l])} | {_f(s['kl'][l])} | "
                         f"{s['argmax_agreement'][l]:.1%} |")
    return "\n".join(lines) + "\n"
