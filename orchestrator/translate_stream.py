"""`imitate-orch translate`: lines in, translations out, streamed in batches.

Up to `buffer_size` lines are read, translated as one batch, written and flushed, so a program
that feeds lines one at a time (or a person at a terminal, where the buffer is 1 unless told
otherwise) gets each answer before it sends the next line; from a file or a pipe bigger
batches keep the decoder busy. One output line per input line, always: an empty line gives
an empty line.

A batch is translated either here, with a finished run's models (`offline_translator`: the
decoders of the evaluate stage and `imitate_nat.translate.translate`, with the job's eval
settings, so the output is what `eval` and the evaluate stage decode), or by a running
`imitate-orch serve` (`remote_translator`, LPD only).
"""
from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

BatchTranslator = Callable[[list[str]], list[str]]
PIPE_BUFFER_SIZE = 128   # lines per batch from a file or a pipe: enough to batch by length
log = logging.getLogger("imitate_orch")


class TranslateSetupError(Exception):
    """Bad arguments, or a run that cannot be used: the CLI exits 2, nothing was translated."""


def check_mode(run: str | None, url: str | None, decoder: str | None, delta_t: int | None,
               cpu_fast: str | None = None) -> str:
    """The decoder to use, once the flags make sense together (else TranslateSetupError)."""
    if (run is None) == (url is None):
        raise TranslateSetupError("give one of --run RUN_DIR (translate here) or --url URL (a running server)")
    if url is not None and decoder not in (None, "lpd"):
        raise TranslateSetupError(f"--decoder {decoder} needs --run: a server decodes with lpd only")
    if url is not None and cpu_fast is not None:
        raise TranslateSetupError("--cpu-fast needs --run: a server decodes as its own eval.cpu_fast says")
    decoder = decoder or "lpd"
    if delta_t is not None and decoder != "lpd":
        raise TranslateSetupError(f"--delta-t is a setting of --decoder lpd, not {decoder}")
    return decoder


def plan_offline(run: str, decoder: str, delta_t: int | None,
                 cpu_fast: str | None = None) -> Callable[[], BatchTranslator]:
    """Check that `run` (a run directory or a models:/ URI) is finished and its models belong
    together, and read its job's eval settings, as `serve` does (nothing is loaded yet); returns
    what loads the translator. `delta_t`, `cpu_fast`: None takes the job's."""
    from .run.layout import RunNotReady
    from .serve.target import ServeSetupError, resolve_target
    from .spec.loading import SpecError

    try:
        target = resolve_target(run)
    except (RunNotReady, ServeSetupError, SpecError) as e:
        raise TranslateSetupError(str(e)) from None
    settings = target.spec.eval
    if cpu_fast is not None:
        settings = settings.model_copy(update={"cpu_fast": cpu_fast})
    return partial(offline_translator, target.source, decoder,
                   settings.delta_t if delta_t is None else delta_t, settings)


def offline_translator(source, decoder: str, delta_t: int, settings) -> BatchTranslator:
    """Load the models of `source` (serve.target.ModelSource) and return its `decoder` (of
    run.layout.DECODERS) as a batch translator; `settings`: the job's EvalSpec (beam size,
    length penalty, batch tokens, the CPU path)."""
    import torch

    from imitate_nat.checkpoint import CheckpointError
    from imitate_nat.translate import translate

    from .decoding import decoders, for_device, truncated_sources
    from .serve.target import ServeSetupError, load_models

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tok, at, nat = load_models(source, device)
    except (OSError, CheckpointError, ServeSetupError) as e:
        raise TranslateSetupError(str(e)) from None
    at, nat, mode = for_device(at, nat, device, settings.cpu_fast)
    decode, cost = decoders(at, nat, settings.beam_size, delta_t, settings.length_penalty)[decoder]
    max_src_len = at.cfg.max_positions
    log.info("translating with %s of %s on %s%s%s", decoder, source.location(), device,
             f" ({mode})" if mode else "", f" (ΔT {delta_t})" if decoder == "lpd" else "")

    def translate_batch(lines: list[str]) -> list[str]:
        truncated_sources(tok, lines, max_src_len)  # warns: longer sources are cut to fit
        return translate(lines, tok, decode, batch_tokens=settings.batch_tokens, device=device,
                         max_src_len=max_src_len, cost_factor=cost)

    return translate_batch


def remote_translator(url: str, delta_t: int | None, retries: int, timeout_s: float) -> BatchTranslator:
    """A running server's LPD as a batch translator (ServeRequestError when it fails)."""
    from .serve.client import translate_lines

    return partial(translate_lines, url, delta_t=delta_t, retries=retries, timeout_s=timeout_s)


@contextmanager
def open_source(path: str) -> Iterator[TextIO]:
    """The input file, or stdin for "-", as UTF-8 where only "\\n" ends a line: a stray "\\r"
    inside a line would otherwise split it, and output line i must answer line i as `wc -l`
    counts them. Undecodable bytes are replaced rather than stopping a long file midway."""
    if path != "-":
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
            yield f
        return
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n")
    try:
        yield stdin
    finally:
        stdin.detach()   # sys.stdin stays open


@contextmanager
def open_output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        yield f


def count_lines(path: str) -> int:
    """Lines of a file as open_source reads them (for the progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """Up to `size` lines at a time; a batch is yielded as soon as it is full, so with size 1
    each line is handed on before the next is read."""
    it = iter(lines)
    while batch := list(islice(it, size)):
        yield batch


def translate_stream(lines: Iterable[str], translate_batch: BatchTranslator, out: TextIO, buffer_size: int,
                     progress_total: int | None = None) -> int:
    """Translate `lines` (without line ends) batch by batch, each written and flushed before
    the next is read; a progress bar when `progress_total` is given. Returns the line count."""
    done = 0
    with tqdm(total=progress_total, disable=progress_total is None, unit="line", desc="translate") as bar:
        for batch in batches(lines, buffer_size):
            out.writelines(f"{t}\n" for t in translate_batch(batch))
            out.flush()
            done += len(batch)
            bar.update(len(batch))
    return done


def run_translate(texts: tuple[str, ...], run: str | None, url: str | None, input_path: str, output_path: str,
                  decoder: str | None, delta_t: int | None, buffer_size: int | None, progress: bool,
                  retries: int, timeout_s: float, cpu_fast: str | None = None) -> int:
    """The whole command: every check (TranslateSetupError) before models are loaded, then
    stream. Returns the number of lines translated. `cpu_fast` (--run only): None takes the job's."""
    decoder = check_mode(run, url, decoder, delta_t, cpu_fast)
    if texts and input_path != "-":
        raise TranslateSetupError("give TEXTS or --input, not both")
    if "-" not in (input_path, output_path) and Path(input_path).resolve() == Path(output_path).resolve():
        raise TranslateSetupError(f"--output {output_path} is the input: writing it would erase what is to be read")
    load = (plan_offline(run, decoder, delta_t, cpu_fast) if run
            else partial(remote_translator, url, delta_t, retries, timeout_s))
    with ExitStack() as stack:
        try:
            source = None if texts else stack.enter_context(open_source(input_path))
            out = stack.enter_context(open_output(output_path))
        except OSError as e:
            raise TranslateSetupError(str(e)) from None
        translate_batch = load()
        if source is None:
            lines: Iterable[str] = texts
        else:
            lines = (line.removesuffix("\n").removesuffix("\r") for line in source)
        interactive = source is not None and source.isatty()
        size = buffer_size or (1 if interactive else PIPE_BUFFER_SIZE)
        from_file = source is not None and input_path != "-"   # stdin's length is unknown: no bar
        total = count_lines(input_path) if progress and from_file else None
        return translate_stream(lines, translate_batch, out, size, total)
