"""`imitate-orch translate` offline (--run): one output line per input line, the evaluate
stage's decoders, streaming line by line through a pipe, bad input refused before models
load; the remote mode's answer when no server listens; `--version`."""
from __future__ import annotations

import importlib.metadata
import logging
import select
import subprocess
import sys

import pytest
from click.testing import CliRunner

from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator.cli import main
from orchestrator.decoding import decoders, for_device, load_run_models

from helpers import ROOT, free_port

CLI = [sys.executable, "-m", "orchestrator.cli"]


def offline(run_dir, spec, name: str, lines: list[str]) -> list[str]:
    """What the evaluate stage's decoder `name` makes of `lines`, with the job's eval settings."""
    tok, at, nat = load_run_models(run_dir, "cpu")
    e = spec.eval
    at, nat, _ = for_device(at, nat, "cpu", e.cpu_fast)
    decoder, cost = decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)[name]
    return translate(lines, tok, decoder, batch_tokens=e.batch_tokens, max_src_len=at.cfg.max_positions,
                     cost_factor=cost)


@pytest.fixture(scope="module")
def sources(micro_run):
    """Test sources with empty lines among them and one longer than the model's positions."""
    run_dir, _ = micro_run
    test = read_lines(run_dir / "prepare" / "test.src")[:5]
    positions = load_run_models(run_dir, "cpu")[1].cfg.max_positions
    too_long = " ".join([test[0]] * positions)
    return ["", test[0], test[1], "", too_long, *test[2:], ""]


def test_file_to_file_one_line_per_line_as_the_evaluate_stage(micro_run, sources, tmp_path, caplog):
    run_dir, spec = micro_run
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text("\n".join(sources) + "\n")
    with caplog.at_level(logging.WARNING, logger="imitate_orch"):
        res = CliRunner().invoke(main, ["translate", "--run", str(run_dir), "--input", str(src), "--output", str(out),
                                        "--decoder", "nat", "--buffer-size", "3"])
    assert res.exit_code == 0, res.output
    got = out.read_text().split("\n")
    assert got[-1] == "" and len(got) - 1 == len(sources)       # every line ends; one per input line
    # Batched as the command batches (--buffer-size lines at a time): see tests/helpers.py, bf16.
    chunks = [sources[k: k + 3] for k in range(0, len(sources), 3)]
    assert got[:-1] == [t for chunk in chunks for t in offline(run_dir, spec, "nat", chunk)]
    assert [g for g, s in zip(got, sources) if not s] == ["", "", ""]
    assert any("1 of 3 sources are over" in r.getMessage() for r in caplog.records)  # the long line's batch


def test_streams_line_by_line_through_a_pipe(micro_run, sources, tmp_path):
    """--buffer-size 1: line 1's translation comes back before line 2 is written (no EOF)."""
    run_dir, spec = micro_run
    lines = [sources[1], sources[2]]
    want = [offline(run_dir, spec, "lpd", [line])[0] for line in lines]
    log_file = (tmp_path / "stderr.txt").open("w")   # a file: a full stderr pipe would block the CLI
    proc = subprocess.Popen([*CLI, "translate", "--run", str(run_dir), "--buffer-size", "1"], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
    try:
        proc.stdin.write(lines[0] + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no translation of line 1 within 120 s while line 2 is unwritten"
        assert proc.stdout.readline() == want[0] + "\n"
        proc.stdin.write(lines[1] + "\n")
        proc.stdin.close()
        assert proc.stdout.read() == want[1] + "\n"
        assert proc.wait(timeout=60) == 0, (tmp_path / "stderr.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()


def stderr_of(cmd, terminal: bool) -> str:
    """The command's stderr, written to a pseudo-terminal or to a pipe."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    if not terminal:
        return subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=300).stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # a new pty is 0 columns wide
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while chunk := os.read(master, 65536):
            out += chunk
    except OSError:   # EIO: the child closed the terminal
        pass
    finally:
        os.close(master)
        proc.wait(timeout=300)
    return out.decode(errors="replace")


def test_the_progress_bar_is_drawn_on_a_terminal_never_into_a_log(micro_run, sources, tmp_path):
    """A file translated with stderr on a terminal draws a bar; with stderr a pipe or a log
    file, where every redraw would be another line, it does not; --no-progress draws none."""
    run_dir, _ = micro_run
    src = tmp_path / "in.txt"
    src.write_text("\n".join(sources) + "\n")
    cmd = [*CLI, "translate", "--run", str(run_dir), "--input", str(src), "--output", str(tmp_path / "out.txt"),
           "--decoder", "nat"]
    assert "translate: 100%" in stderr_of(cmd, terminal=True)
    assert "translate:" not in stderr_of(cmd, terminal=False)
    assert "translate:" not in stderr_of([*cmd, "--no-progress"], terminal=True)


def test_bad_input_exits_2_before_models_load(micro_run, tmp_path, monkeypatch):
    import orchestrator.decoding

    def no_loading(*_):
        raise AssertionError("models loaded despite bad input")

    monkeypatch.setattr(orchestrator.decoding, "load_run_models", no_loading)
    run_dir, _ = micro_run
    rd = str(run_dir)
    (tmp_path / "unfinished" / "prepare").mkdir(parents=True)
    cases = {
        ("--run", str(tmp_path / "nope")): "does not exist",
        ("--run", str(tmp_path / "unfinished")): "is not finished",
        ("--run", rd, "--decoder", "beam"): "'--decoder'",
        ("--run", rd, "--delta-t", "21"): "'--delta-t'",
        ("--run", rd, "--buffer-size", "0"): "'--buffer-size'",
        ("--run", rd, "--url", "http://127.0.0.1:1"): "one of --run RUN_DIR",
        (): "one of --run RUN_DIR",
        ("--run", rd, "--decoder", "nat", "--delta-t", "2"): "--delta-t is a setting of --decoder lpd",
        ("--url", "http://127.0.0.1:1", "--decoder", "at"): "needs --run",
        ("--url", "http://127.0.0.1:1", "--cpu-fast", "int8"): "--cpu-fast needs --run",
        ("--run", rd, "--cpu-fast", "fast"): "'--cpu-fast'",
        ("--run", rd, "--input", str(tmp_path / "missing.txt")): "does not exist",
        ("--run", rd, "--output", str(tmp_path / "no" / "dir" / "out.txt")): "No such file or directory",
    }
    for args, message in cases.items():
        res = CliRunner().invoke(main, ["translate", *args, "a happy bird"] if "--input" not in args
                                 else ["translate", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert "\nTraceback" not in res.output


def test_no_server_at_url_says_so_without_a_traceback():
    url = f"http://127.0.0.1:{free_port()}"
    res = subprocess.run([*CLI, "translate", "--url", url, "--retries", "1", "a happy bird"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode not in (0, None) and res.stdout == ""
    assert f"no server at {url} — start one with `imitate-orch serve RUN_DIR`" in res.stderr
    assert "Traceback" not in res.stderr and "Max retries exceeded" not in res.stderr


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output == f"imitate-orch {importlib.metadata.version('imitate-orch')}\n"
