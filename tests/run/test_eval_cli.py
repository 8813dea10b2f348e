"""`imitate-orch eval` through the CLI on a finished micro run: on the run's own test set it
scores as the evaluate stage did, only the decoders asked for run, --hyp-dir holds their
translations (what orchestrator.decoding gives in-process), several --ref are scored as several
references, --tokenize changes BLEU, TER is sacreBLEU's, and bad input exits 2 naming the
problem before any model loads."""
from __future__ import annotations

import json

import pytest
import sacrebleu
from click.testing import CliRunner

from imitate_nat.cpu import resolve_mode
from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator import decoding
from orchestrator.cli import main


def eval_cli(*args):
    return CliRunner().invoke(main, ["eval", *map(str, args)])


def eval_json(*args) -> dict:
    res = eval_cli(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def test_set(micro_run):
    """(run dir, test.src, test.tgt) of the micro run."""
    rd, _ = micro_run
    return rd, rd / "prepare" / "test.src", rd / "prepare" / "test.tgt"


def in_process(rd, name: str, lines: list[str]) -> list[str]:
    """What decoder `name` of orchestrator.decoding gives, with eval's defaults (beam 4, ΔT 3) and
    the micro job's CPU path (eval.cpu_fast bf16)."""
    tok, at, nat = decoding.load_run_models(rd, "cpu")
    at, nat, _ = decoding.for_device(at, nat, "cpu", "bf16")
    decoder, cost = decoding.decoders(at, nat, 4, 3)[name]
    return translate(lines, tok, decoder, batch_tokens=4096, max_src_len=at.cfg.max_positions, cost_factor=cost)


def test_eval_on_the_run_s_own_test_set_reproduces_the_evaluate_stage_s_scores(test_set):
    rd, src, ref = test_set
    scores = eval_json(rd, "--src", src, "--ref", ref)["rows"]
    summary = json.loads((rd / "evaluate" / "summary.json").read_text())["rows"]
    assert set(scores) == set(summary) == {"at", "nat", "lpd"}
    for name in summary:
        assert scores[name]["bleu"] == pytest.approx(summary[name]["bleu"]), name
        assert scores[name]["chrf"] == pytest.approx(summary[name]["chrf"]), name


@pytest.mark.parametrize("asked, rows", [("nat", ["nat"]), ("lpd, nat", ["nat", "lpd"])])
def test_only_the_decoders_asked_for_run_and_their_hypotheses_are_written(test_set, tmp_path, asked, rows):
    rd, src, ref = test_set
    hyp_dir = tmp_path / "hyps"
    out = eval_json(rd, "--src", src, "--ref", ref, "--decoders", asked, "--hyp-dir", hyp_dir)
    assert list(out["rows"]) == rows and sorted(out["hyp_files"]) == sorted(rows)
    assert sorted(p.name for p in hyp_dir.iterdir()) == sorted(f"{r}.txt" for r in rows)
    sources = read_lines(src)
    for name in rows:
        text = (hyp_dir / f"{name}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == len(sources)    # one line per source line
        assert text.split("\n")[:-1] == in_process(rd, name, sources)
        assert {"bleu", "chrf", "ter", "bleu_signature", "chrf_signature", "ter_signature"} <= set(out["rows"][name])


@pytest.mark.parametrize("flag", [None, "off", "int8", "auto"])
def test_cpu_fast_decodes_with_the_cpu_path_asked_for_and_says_which(test_set, tmp_path, flag):
    """No flag: the job's eval.cpu_fast (the micro job's: bf16); auto: bf16 or int8, as this CPU
    goes; off: the fp32 models."""
    rd, src, ref = test_set
    args = () if flag is None else ("--cpu-fast", flag)
    out = eval_json(rd, "--src", src, "--ref", ref, "--decoders", "lpd", "--hyp-dir", tmp_path, *args)
    mode = resolve_mode(flag or "bf16")
    assert (out["device"], out["cpu_fast"]) == ("cpu", None if mode == "off" else mode)
    tok, at, nat = decoding.load_run_models(rd, "cpu")
    at, nat, _ = decoding.for_device(at, nat, "cpu", mode)
    decoder, cost = decoding.decoders(at, nat, 4, 3)["lpd"]
    sources = read_lines(src)
    expected = translate(sources, tok, decoder, batch_tokens=4096, max_src_len=at.cfg.max_positions, cost_factor=cost)
    assert read_lines(tmp_path / "lpd.txt") == expected
    table = eval_cli(rd, "--src", src, "--ref", ref, "--decoders", "nat", *args).output
    assert f"decoded on cpu{f' (CPU path: {mode})' if mode != 'off' else ''}" in table


def test_second_reference_tokenizer_and_ter_are_sacrebleus(test_set, tmp_path):
    rd, src, ref = test_set
    one = eval_json(rd, "--src", src, "--ref", ref, "--decoders", "nat", "--hyp-dir", tmp_path)
    hyps, refs = read_lines(tmp_path / "nat.txt"), read_lines(ref)
    row = one["rows"]["nat"]
    assert (one["references"], one["bleu_tokenize"]) == (1, "13a")    # the job's eval.bleu_tokenize
    assert row["ter"] == pytest.approx(sacrebleu.corpus_ter(hyps, [refs]).score)
    assert row["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert row["ter_signature"].startswith("nrefs:1")

    # A second reference equal to the hypotheses: every n-gram matches one of the two.
    two = eval_json(rd, "--src", src, "--ref", ref, "--ref", tmp_path / "nat.txt", "--decoders", "nat")["rows"]["nat"]
    assert two["bleu"] == pytest.approx(100.0) and row["bleu"] < 99
    assert two["ter"] == pytest.approx(0.0) and row["ter"] > 1
    assert two["bleu_signature"].startswith("nrefs:2") and two["chrf_signature"].startswith("nrefs:2")

    chars = eval_json(rd, "--src", src, "--ref", ref, "--decoders", "nat", "--tokenize", "char")
    assert chars["bleu_tokenize"] == "char" and "tok:char" in chars["rows"]["nat"]["bleu_signature"]
    assert chars["rows"]["nat"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="char").score)
    assert chars["rows"]["nat"]["bleu"] != pytest.approx(row["bleu"])


def test_the_table_has_ter_and_the_signatures(test_set):
    rd, src, ref = test_set
    res = eval_cli(rd, "--src", src, "--ref", ref, "--decoders", "at,lpd", "--beam", "1", "--delta-t", "0")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].split() == ["model", "BLEU", "chrF", "TER"]
    assert [line.split()[0] for line in lines[2:4]] == ["AT", "NAT+LPD"] and "ΔT=0" in lines[3]
    assert [line.split(":")[0] for line in lines[4:]] == ["BLEU", "chrF", "TER"]


BAD = [  # (case, arguments after RUN_DIR ({src}, {ref}, {short}, {empty}, {file}: paths), message)
    ("short reference", ["--ref", "{short}"], "short.tgt has 1"),
    ("short second reference", ["--ref", "{ref}", "--ref", "{short}"], "short.tgt has 1"),
    ("hyp dir is a file", ["--ref", "{ref}", "--hyp-dir", "{file}"], "is a file"),
    ("unknown decoder", ["--ref", "{ref}", "--decoders", "nat,xyz"], "--decoders 'nat,xyz': unknown xyz"),
    ("unknown tokenizer", ["--ref", "{ref}", "--tokenize", "bogus"],
     "--tokenize: 'bogus' is not a sacreBLEU BLEU tokenizer"),
    ("missing reference", ["--ref", "{file}.missing"], "does not exist"),
    ("unknown CPU path", ["--ref", "{ref}", "--cpu-fast", "fast"], "'--cpu-fast'"),
]


@pytest.mark.parametrize("case, args, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_naming_it_before_models_load(test_set, tmp_path, monkeypatch, case, args, message):
    rd, src, ref = test_set
    short, a_file = tmp_path / "short.tgt", tmp_path / "a-file"
    short.write_text("one line\n")
    a_file.write_text("")
    monkeypatch.setattr(decoding, "load_run_models", lambda *a: pytest.fail("a model was loaded"))
    paths = {"src": src, "ref": ref, "short": short, "file": a_file}
    res = eval_cli(rd, "--src", src, *(a.format(**paths) for a in args))
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_an_empty_source_file_and_an_unfinished_run_exit_2(test_set, tmp_path):
    rd, src, ref = test_set
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = eval_cli(rd, "--src", empty, "--ref", empty)
    assert res.exit_code == 2 and f"{empty} is empty" in res.output
    res = eval_cli(tmp_path, "--src", src, "--ref", ref)
    assert res.exit_code == 2 and "is not finished" in res.output
