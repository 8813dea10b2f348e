"""`imitate-orch report RUN_DIR`: report.md + PNGs of a finished run, also logged to MLflow."""
import json

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.run.layout import STAGES
from orchestrator.run.manifest import Manifest, write_manifest

from helpers import MICRO_JOB_SETS, copy_micro_workdir

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(micro_run, tmp_path_factory):
    """A copy of micro_run and `imitate-orch report` run on it once: (run_dir, spec, CLI result)."""
    rd, spec = copy_micro_workdir(micro_run, tmp_path_factory.mktemp("report") / "runs")
    result = CliRunner().invoke(main, ["report", str(rd), "--max-delta-t", "2", "--no-progress"])
    return rd, spec, result


def test_report_has_every_section_and_plot(reported):
    rd, spec, r = reported
    assert r.exit_code == 0, r.output + repr(r.exception)
    out = rd / "report"
    md = (out / "report.md").read_text()
    summary = json.loads((rd / "evaluate" / "summary.json").read_text())["rows"]
    assert f"| imitate-NAT | {summary['nat']['bleu']:.2f} |" in md                      # Table 1 from evaluate
    assert f"| imitate-NAT (+LPD, ΔT = {spec.eval.delta_t}) | {summary['lpd']['bleu']:.2f} |" in md
    assert "No ablation found" in md and "imitate-orch ablate JOB" in md                 # absent, and said so
    assert "No λ1 = 0 teacher to compare with" in md                                    # absent, and said so
    for name in ("loss.png", "valid_bleu.png", "bleu_vs_delta_t.png", "latency_vs_delta_t.png", "action_usage.png"):
        assert (out / name).read_bytes().startswith(PNG) and f"]({name})" in md
    assert "No training curves" not in md


def test_curves_come_from_the_mlflow_runs_that_trained_the_stages(reported):
    from orchestrator.studies.measures import training_curves

    rd, spec, _ = reported
    curves = training_curves(rd, f"sqlite:///{rd.parent / 'mlflow.db'}")
    steps = spec.teacher.max_steps
    assert [p[0] for p in curves["teacher"]["train/loss"]] == list(range(spec.teacher.log_every, steps + 1,
                                                                         spec.teacher.log_every))
    assert [p[0] for p in curves["student"]["valid/bleu"]] == list(range(spec.student.eval_every, steps + 1,
                                                                         spec.student.eval_every))
    assert curves["teacher"]["run_id"] != curves["student"]["run_id"]


def test_delta_t_sweep_and_action_usage_measure_the_run(reported):
    from imitate_nat.checkpoint import read_model_file
    from imitate_nat.tokenizer import Tokenizer
    from orchestrator.decoding import read_split

    rd, spec, _ = reported
    sweep = json.loads((rd / "report" / "delta_t.json").read_text())["value"]
    assert sweep["delta_t"] == [0, 1, 2] and len(sweep["latency_ms"]) == 3
    assert sweep["bleu"][0] == pytest.approx(sweep["nat"]["bleu"])   # LPD with ΔT = 0 is plain NAT decoding
    usage = json.loads((rd / "report" / "action_usage.json").read_text())["value"]
    src, ref = read_split(rd, "valid")
    tok = Tokenizer(rd / "tokenizer" / "spm.model")
    positions = sum(len(t) + 1 for s, t in zip(tok.encode_batch(src), tok.encode_batch(ref)) if s and t)  # + EOS step
    layers = read_model_file(rd / "teacher" / "model.pt")["config"]["dec_layers"]
    assert usage["positions"] == positions and sum(usage["counts"]) == positions * layers
    assert len(usage["per_layer_entropy"]) == layers
    assert usage["n_actions"] == spec.model.n_actions == len(usage["counts"])
    assert 0 < usage["entropy"] <= usage["max_entropy"] + 1e-9


def test_rerun_reuses_the_decoding_and_compares_a_given_teacher(reported):
    from mlflow import MlflowClient

    rd, _, _ = reported
    cached = (rd / "report" / "delta_t.json").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["report", str(rd), "--max-delta-t", "2", "--no-progress", "--compare-teacher",
                                  str(rd / "teacher" / "model.pt")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (rd / "report" / "delta_t.json").stat().st_mtime_ns == cached
    md = (rd / "report" / "report.md").read_text()
    assert "| teacher with λ1 = 0 |" in md and "No λ1 = 0 teacher" not in md
    same = [json.loads((rd / "report" / f).read_text())["value"] for f in ("action_usage.json", "action_usage_lambda1_0.json")]
    assert same[0] == same[1]     # the same teacher given as the comparison: the same histogram
    client = MlflowClient(f"sqlite:///{rd.parent / 'mlflow.db'}")
    (job_run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.job = 'tiny'")
    assert {a.path for a in client.list_artifacts(job_run.info.run_id, "report")} >= {"report/report.md",
                                                                                     "report/action_usage.png"}


def test_compare_teacher_defaults_to_the_ablations_lambda1_zero_teacher(reported, tmp_path):
    """Only the lookup is tested here (test_ablate trains a real λ1 = 0 teacher): the layout
    `ablate --lambda1-zero-teacher` leaves, with this run's own teacher and tokenizer in it."""
    import shutil

    from orchestrator.studies.report import compare_teacher_files

    rd, _, _ = reported
    assert compare_teacher_files(rd, None) is None
    given = tmp_path / "other.pt"
    assert compare_teacher_files(rd, given) == (given, rd / "tokenizer" / "spm.model")
    auto = rd.parent / "tiny-ablate" / "lambda1-0"
    try:
        for stage in ("tokenizer", "teacher"):
            shutil.copytree(rd / stage, auto / stage)
        assert compare_teacher_files(rd, None) == (auto / "teacher" / "model.pt", auto / "tokenizer" / "spm.model")
        assert compare_teacher_files(rd, auto) == compare_teacher_files(rd, None)   # a run dir given
    finally:
        shutil.rmtree(rd.parent / "tiny-ablate")


def test_report_without_an_mlflow_run_needs_the_job(reported, tmp_path):
    rd, _, _ = reported
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    r = CliRunner().invoke(main, ["report", str(rd), "--tracking-uri", empty, "--no-progress"])
    assert r.exit_code == 2 and "cannot find the job spec" in r.output and "--job" in r.output
    sets = [a for s in [f"workdir={rd.parent}", *MICRO_JOB_SETS] for a in ("--set", s)]
    r = CliRunner().invoke(main, ["report", str(rd), "--job", "jobs/tiny.yaml", *sets, "--tracking-uri", empty,
                                  "--max-delta-t", "2", "--out", str(rd / "report"), "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    md = (rd / "report" / "report.md").read_text()
    assert "No training curves for teacher and student" in md and "not logged to MLflow" in r.output


@pytest.mark.parametrize("status", ["missing", "failed"])
def test_report_on_an_unfinished_run_names_the_stage(tmp_path, status):
    rd = tmp_path / "job"
    for stage in STAGES[:3]:
        write_manifest(rd / stage, Manifest(stage=stage, input_hash="h", status="done"))
    if status == "failed":
        write_manifest(rd / "distill", Manifest(stage="distill", input_hash="h", status="failed", error="OOM"))
    r = CliRunner().invoke(main, ["report", str(rd)])
    assert r.exit_code == 2
    assert ("stage 'distill' is pending" if status == "missing" else "stage 'distill' is failed (OOM)") in r.output
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "run directory not found" in r.output


def test_usage_entropy_is_that_of_imitation_action_usage_entropy(micro_run):
    import torch

    from imitate_nat.checkpoint import load_model
    from imitate_nat.data import make_batch
    from imitate_nat.imitation import action_usage_entropy
    from imitate_nat.tokenizer import Tokenizer
    from orchestrator.decoding import read_split
    from orchestrator.studies.measures import action_usage

    rd, _ = micro_run
    at, _ = load_model(rd / "teacher" / "model.pt")
    tok = Tokenizer(rd / "tokenizer" / "spm.model")
    src, ref = read_split(rd, "valid")
    src, ref = src[:8], ref[:8]
    usage = action_usage(at, tok, src, ref, "cpu", batch_tokens=10 ** 6)   # one batch
    b = make_batch(tok.encode_batch(src), tok.encode_batch(ref))
    with torch.no_grad():
        _, log_pis = at(b.src, b.tgt_in)
    assert usage["entropy"] == pytest.approx(action_usage_entropy(log_pis, b.tgt_out.ne(at.cfg.pad_id)), rel=1e-6)


def test_latencies_are_measured_side_by_side_on_a_drifting_machine():
    """Two decoders doing the same work on a machine that slows down while it is timed (here:
    every call sleeps 0.5 ms longer than the one before) get the same median: each sentence is
    decoded by both in turn. Timed one after the other, the second would look 2x slower."""
    import time

    from orchestrator.decoding import latencies_ms

    class Tok:
        def encode_batch(self, lines):
            return [[5] * len(l.split()) for l in lines]

        def decode(self, ids):
            return "x"

    calls = []

    def slowing(src):
        calls.append(1)
        time.sleep(0.005 + 0.0005 * len(calls))
        return [[5]] * src.size(0)

    lat = latencies_ms([f"sentence {i}" for i in range(20)], Tok(), {"a": slowing, "b": slowing}, "cpu", 20)
    assert len(calls) == 2 + 40                                   # one warm-up each, then 20 sentences each
    assert set(lat) == {"a", "b"} and 0.8 < lat["a"] / lat["b"] < 1.25


def test_delta_t_sweep_cache_key_covers_the_split_and_the_tokenizer(tmp_path, monkeypatch):
    """A cached ΔT sweep is reused only for the same test set and tokenizer, not just the same
    models: a deterministic training on unchanged train data gives the same model bytes after
    the test set or the tokenizer changed."""
    from orchestrator.spec.loading import spec_from_dict
    from orchestrator.studies import measures

    def record(stage, **digests):
        outputs = {name.replace("_", "."): {"path": name, "sha256": sha} for name, sha in digests.items()}
        write_manifest(tmp_path / stage, Manifest(stage=stage, input_hash="h", status="done", outputs=outputs))

    keys = []
    monkeypatch.setattr(measures, "cached", lambda path, key, compute: keys.append(key))
    spec = spec_from_dict({"name": "k", "workdir": str(tmp_path)})

    def key():
        measures.delta_t_sweep(tmp_path, spec, "test", 2, "cpu", tmp_path / "delta_t.json", progress=False)
        return keys[-1]

    record("teacher", model_pt="m1")
    record("student", model_pt="m2")
    record("tokenizer", spm_model="k1")
    record("prepare", test_src="s1", test_tgt="t1")
    first = key()
    assert key() == first
    for stage, digests in (("prepare", {"test_src": "s2", "test_tgt": "t1"}),
                           ("prepare", {"test_src": "s1", "test_tgt": "t2"}), ("tokenizer", {"spm_model": "k2"})):
        record(stage, **digests)
        assert key() != first, (stage, digests)
        record("prepare", test_src="s1", test_tgt="t1")
        record("tokenizer", spm_model="k1")
    assert key() == first
