"""`imitate-orch eval`: score a parallel test set with a finished run's decoders (AT beam,
NAT, NAT + LPD, or the ones asked for), against one reference or several, with BLEU (the
sacreBLEU tokenizer chosen), chrF and TER; optionally keeping each decoder's translations.

Everything the command is given is checked before a model loads, and refused with
EvalSetupError (the CLI exits 2): the run must be finished with models that belong together
(as `serve` and `translate` check; or a registered model, models:/NAME/VERSION or
models:/NAME@ALIAS), every reference file must have a line per source line,
and the decoders and the tokenizer must be known. The rows are orchestrator.decoding's, as
the evaluate stage's are.
"""
from __future__ import annotations

import json
from pathlib import Path

from .run.layout import DECODERS

LABELS = {"at": "AT beam {beam}", "nat": "NAT", "lpd": "NAT+LPD ΔT={delta_t}"}


class EvalSetupError(Exception):
    """Bad arguments, files or run: the CLI exits 2, nothing was decoded."""


def parse_decoders(text: str) -> tuple[str, ...]:
    """--decoders "lpd,nat" -> ("nat", "lpd"): the names asked for, in Table 1's order."""
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = sorted(names - set(DECODERS))
    if unknown or not names:
        what = f"unknown {', '.join(unknown)}" if unknown else "no decoder named"
        raise EvalSetupError(f"--decoders {text!r}: {what}; choose from {','.join(DECODERS)}")
    return tuple(d for d in DECODERS if d in names)


def read_test_set(src_path: str, ref_paths: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """(sources, one line stream per reference file); a reference file whose line count is not
    the source's is refused naming it."""
    from imitate_nat.data import read_parallel

    try:
        pairs = [read_parallel(src_path, ref) for ref in ref_paths]
    except (OSError, ValueError) as e:   # UnicodeDecodeError is a ValueError
        raise EvalSetupError(str(e)) from None
    src = pairs[0][0]
    if not src:
        raise EvalSetupError(f"{src_path} is empty")
    return src, [ref for _, ref in pairs]


def resolve_run(run_dir: str, tokenize: str | None):
    """(the run's serve.target.ServeTarget, --tokenize else the job's eval.bleu_tokenize). Finding
    the job (its job.yaml stored in MLflow, a registered model's settings, else the defaults)
    checks that the run is finished and that its models belong together, as `serve` does."""
    from imitate_nat.metrics import check_bleu_tokenize

    from .run.layout import RunNotReady
    from .serve.target import ServeSetupError, resolve_target
    from .spec.loading import SpecError

    try:
        target = resolve_target(run_dir)
        return target, check_bleu_tokenize(tokenize or target.spec.eval.bleu_tokenize)
    except (RunNotReady, ServeSetupError, SpecError) as e:
        raise EvalSetupError(str(e)) from None
    except ValueError as e:   # a tokenizer whose optional package is missing
        raise EvalSetupError(f"--tokenize: {e}") from None


def run_eval(run_dir: str, src_path: str, ref_paths: tuple[str, ...], decoder_names: str, tokenize: str | None,
             hyp_dir: str | None, delta_t: int | None, beam: int | None, batch_tokens: int | None,
             cpu_fast: str | None = None) -> dict:
    """The whole command: every check (EvalSetupError), then decode and score with each decoder
    asked for, writing HYP_DIR/<decoder>.txt (atomically, a line per source line) when given.
    `delta_t`, `beam`, `batch_tokens`, `cpu_fast`: None takes the job's eval settings.
    Returns what --json prints: {"run_dir", "sentences", "references", "beam", "delta_t",
    "bleu_tokenize", "device", "cpu_fast" (the CPU path's mode, None if not taken),
    "rows": {decoder: row as decoding.translate_and_score}, "hyp_files"}."""
    names = parse_decoders(decoder_names)
    src, refs = read_test_set(src_path, ref_paths)
    target, tokenize = resolve_run(run_dir, tokenize)
    e = target.spec.eval
    delta_t, beam = e.delta_t if delta_t is None else delta_t, e.beam_size if beam is None else beam
    batch_tokens = e.batch_tokens if batch_tokens is None else batch_tokens
    cpu_fast = e.cpu_fast if cpu_fast is None else cpu_fast
    if hyp_dir:
        try:
            Path(hyp_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EvalSetupError(f"--hyp-dir: {e}") from None
    rows, hyps, where = decode_and_score(target.source, names, src, refs, tokenize, delta_t, beam, batch_tokens,
                                         e.length_penalty, cpu_fast)
    hyp_files = write_hypotheses(Path(hyp_dir), hyps) if hyp_dir else {}
    return {"run_dir": str(run_dir), "sentences": len(src), "references": len(refs), "beam": beam,
            "delta_t": delta_t, "bleu_tokenize": tokenize, **where, "rows": rows, "hyp_files": hyp_files}


def decode_and_score(source, names: tuple[str, ...], src, refs, tokenize: str, delta_t: int, beam: int,
                     batch_tokens: int, length_penalty: float, cpu_fast: str = "off"):
    """(rows, hyps, {"device", "cpu_fast"}) of the decoders `names` of `source`
    (serve.target.ModelSource), on a GPU when there is one, else on the CPU path `cpu_fast`."""
    import torch

    from imitate_nat.checkpoint import CheckpointError

    from .decoding import decoders, for_device, score_all
    from .serve.target import ServeSetupError, load_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tok, at, nat = load_models(source, device)
    except (OSError, CheckpointError, ServeSetupError) as e:
        raise EvalSetupError(str(e)) from None
    at, nat, mode = for_device(at, nat, device, cpu_fast)
    chosen = {name: d for name, d in decoders(at, nat, beam, delta_t, length_penalty).items() if name in names}
    rows, hyps = score_all(chosen, tok, src, refs, batch_tokens, device, at.cfg.max_positions, tokenize)
    return rows, hyps, {"device": device, "cpu_fast": mode}


def write_hypotheses(hyp_dir: Path, hyps: dict[str, list[str]]) -> dict[str, str]:
    """HYP_DIR/<decoder>.txt for each decoder; returns decoder -> path."""
    from .run.files import atomic_write_lines

    return {name: str(atomic_write_lines(hyp_dir / f"{name}.txt", lines)) for name, lines in hyps.items()}


def format_scores(result: dict, as_json: bool = False) -> str:
    """run_eval's result as JSON, or as a table with the sacreBLEU signatures under it."""
    if as_json:
        return json.dumps(result, indent=2)
    rows = result["rows"]
    refs = result["references"]
    path = f" (CPU path: {result['cpu_fast']})" if result.get("cpu_fast") else ""
    lines = [f"{result['sentences']} sentences, {refs} reference{'s' if refs > 1 else ''}, decoded on "
             f"{result.get('device', 'cpu')}{path}",
             f"{'model':<16}{'BLEU':>8}{'chrF':>8}{'TER':>8}"]
    for name, r in rows.items():
        label = LABELS[name].format(beam=result["beam"], delta_t=result["delta_t"])
        lines.append(f"{label:<16}{r['bleu']:>8.2f}{r['chrf']:>8.2f}{r['ter']:>8.2f}")
    first = next(iter(rows.values()))
    lines += [f"BLEU: {first['bleu_signature']}", f"chrF: {first['chrf_signature']}", f"TER:  {first['ter_signature']}"]
    return "\n".join(lines)
