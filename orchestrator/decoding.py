"""Decoding a finished run's models: the decoders of Table 1, loading a run's models, translating
and scoring a set, and batch-1 latency. Used by the evaluate stage, `eval`, Serve, sweeps and
the studies (ablate, report)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from imitate_nat.checkpoint import load_model
from imitate_nat.cpu import for_cpu, resolve_mode
from imitate_nat.data import read_parallel
from imitate_nat.metrics import bleu, chrf, ter
from imitate_nat.tokenizer import Tokenizer
from imitate_nat.translate import at_beam, nat_lpd, nat_one_pass, translate

from .run.layout import model_path, split_path, spm_path
from .spec.schema import JobSpec

log = logging.getLogger("imitate_orch")


def decoders(at, nat, beam_size: int, delta_t: int, length_penalty: float = 1.0) -> dict:
    """name -> (decoder, cost factor for batching). The rows of Table 1. On a GPU the NAT
    decoders replay CUDA graphs at small batches (imitate_nat/graphs.py: same outputs); the
    AT's beam search stays eager."""
    return {
        "at": (at_beam(at, beam_size=beam_size, length_penalty=length_penalty), beam_size),
        "nat": (nat_one_pass(nat, cuda_graphs=True), 1),
        "lpd": (nat_lpd(nat, at, delta_t=delta_t, length_penalty=length_penalty, cuda_graphs=True),
                2 * delta_t + 1),
    }


def for_device(at, nat, device, cpu_fast: str):
    """(AT, NAT, CPU mode) to decode with on `device`: on a CPU, copies on the CPU inference path
    (imitate_nat/cpu.py) in mode `cpu_fast` (eval.cpu_fast; "auto" resolved for this CPU); on a
    GPU, or with "off", the models themselves and mode None."""
    mode = resolve_mode(cpu_fast)
    if not str(device).startswith("cpu") or mode == "off":
        return at, nat, None
    log.info("decoding on the CPU path: %s (eval.cpu_fast %s)", mode, cpu_fast)
    return for_cpu(at, mode), for_cpu(nat, mode), mode


def latencies_ms(lines, tok, timed: dict, device, n: int, progress: bool = False) -> dict:
    """Median batch-1 milliseconds per sentence of each decoder (name -> decoder) over the first
    n lines, measured side by side: every sentence is decoded by each decoder in turn, the order
    rotating from one sentence to the next. A CPU whose speed drifts while the figures are taken
    (other load, frequency changes) then moves every decoder alike, so the speedups compare.
    One warm-up call each first; on a GPU every line once, so CUDA graphs are recorded."""
    sample = [l for l in lines if l.strip()][:max(1, n)]
    cuda = torch.cuda.is_available() and str(device).startswith("cuda")
    names = list(timed)
    for name in names:
        for line in sample if cuda else sample[:1]:
            translate([line], tok, timed[name], device=device)
    times = {name: [] for name in names}
    for i, line in enumerate(tqdm(sample, desc="batch-1 latency", disable=not progress)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            translate([line], tok, timed[name], device=device)
            if cuda:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def truncated_sources(tok, src, max_src_len: int) -> int:
    """How many of `src` have more tokens than the model takes (max_src_len, one kept for EOS):
    `translate` decodes their first max_src_len - 1 tokens. Logged, since the scores then
    cover less than the test set says (Serve answers such a text with 422 instead)."""
    n = sum(len(ids) >= max_src_len for ids in tok.encode_batch(src))
    if n:
        log.warning("%d of %d sources are over %d tokens: decoded truncated to that", n, len(src), max_src_len - 1)
    return n


def translate_and_score(decoder_and_cost, tok, src, refs, batch_tokens: int, device, max_src_len: int,
                        tokenize: str = "13a"):
    """Translate src with one entry of decoders() and score it against refs (one reference
    stream or several: imitate_nat.metrics): (row, hypotheses). The row holds BLEU (with
    sacreBLEU's tokenizer `tokenize`), chrF, TER, their sacreBLEU signatures, the seconds it
    took and how many sources were truncated (truncated_sources)."""
    decoder, cost = decoder_and_cost
    t0 = time.perf_counter()
    truncated = truncated_sources(tok, src, max_src_len)
    hyps = translate(src, tok, decoder, batch_tokens=batch_tokens, device=device, max_src_len=max_src_len,
                     cost_factor=cost)
    row = {}
    for score in (bleu(hyps, refs, tokenize), chrf(hyps, refs), ter(hyps, refs)):
        key = score.name.lower()
        row.update({key: score.score, f"{key}_signature": score.signature})
    return {**row, "seconds": time.perf_counter() - t0, "truncated_sources": truncated}, hyps


def score_all(decs: dict, tok, src, refs, batch_tokens: int, device, max_src_len: int, tokenize: str = "13a"):
    """Translate src with every decoder of `decs` (from decoders(), or some of them) and score
    against refs, as translate_and_score. Returns (rows, hyps)."""
    rows, hyps = {}, {}
    for name, decoder_and_cost in decs.items():
        rows[name], hyps[name] = translate_and_score(decoder_and_cost, tok, src, refs, batch_tokens, device,
                                                     max_src_len, tokenize)
    return rows, hyps


def load_run_models(run_dir: Path, device: str):
    """(tokenizer, AT, NAT) of a finished run directory."""
    tok = Tokenizer(spm_path(run_dir))
    at, _ = load_model(model_path(run_dir, "teacher"), device)
    nat, _ = load_model(model_path(run_dir, "student"), device)
    return tok, at, nat


def read_split(rd: Path, split: str) -> tuple[list[str], list[str]]:
    """(sources, references) of a prepared split ("valid", "test")."""
    return read_parallel(split_path(rd, split, "src"), split_path(rd, split, "tgt"))


def score_run(rd: Path, spec: JobSpec, split: str, names, device: str) -> dict:
    """{"sentences": n, name: row} for the decoders `names` (of "at", "nat", "lpd", with the
    job's eval settings) of run `rd` on `split`; rows as translate_and_score. The studies'
    scoring: fp32 always (eval.cpu_fast is not applied), so models compare on one footing."""
    tok, at, nat = load_run_models(rd, device)
    src, ref = read_split(rd, split)
    e = spec.eval
    decs = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)
    out = {"sentences": len(src)}
    for name in names:
        out[name] = translate_and_score(decs[name], tok, src, ref, e.batch_tokens, device, at.cfg.max_positions,
                                        e.bleu_tokenize)[0]
    return out
