"""The evaluate stage decodes and times in a Ray task (eval.cpus, eval.gpus): the same
translations and scores as decoding in-process (on the CPU inference path eval.cpu_fast asks
for, or in fp32), the node, device and CPU path that produced the figures recorded, and a task
no node can hold refused naming its field.

A prepared micro run (conftest's prepared_run: prepare + tokenizer) with a random-init teacher
and student is enough: these tests check where and how decoding runs, not translation quality.
"""
import json
import socket

import pytest
import torch

ray = pytest.importorskip("ray")

from imitate_nat import ATDemonstrator, NATLearner  # noqa: E402
from imitate_nat.checkpoint import save_model  # noqa: E402
from imitate_nat.cpu import resolve_mode  # noqa: E402
from imitate_nat.tokenizer import Tokenizer  # noqa: E402
from orchestrator.decoding import decoders, for_device, load_run_models, read_split, score_all  # noqa: E402
from orchestrator.run.cluster import cluster_capacity  # noqa: E402
from orchestrator.run.layout import DECODERS, model_path, spm_path  # noqa: E402
from orchestrator.run.runner import StageContext  # noqa: E402
from orchestrator.spec.loading import SpecError, spec_from_dict  # noqa: E402
from orchestrator.stages.evaluate import evaluate  # noqa: E402

EVAL = {"beam_size": 2, "delta_t": 1, "latency_sentences": 3, "bleu_tokenize": "char"}   # not the default 13a


@pytest.fixture(scope="module")
def finished_run(prepared_run, tmp_path_factory):
    """prepared_run's prepare and tokenizer (linked: it is shared and stays unchanged) with a
    random-init teacher and student: a run dir the evaluate stage can read. (run dir, raw spec)."""
    src_run, raw = prepared_run
    rd = tmp_path_factory.mktemp("evaluate") / "t"
    rd.mkdir()
    for stage in ("prepare", "tokenizer"):
        (rd / stage).symlink_to(src_run / stage, target_is_directory=True)
    raw = {**raw, "eval": EVAL}
    cfg = spec_from_dict(raw).model.to_model_config(Tokenizer(spm_path(rd)).vocab_size)
    torch.manual_seed(0)
    save_model(ATDemonstrator(cfg).eval(), model_path(rd, "teacher"))
    save_model(NATLearner(cfg).eval(), model_path(rd, "student"))
    return rd, raw


def _in_process(rd, spec):
    """(rows, hyps) of decoding in this process with the decoding helpers, on 1 thread as the task."""
    tok, at, nat = load_run_models(rd, "cpu")
    at, nat, _ = for_device(at, nat, "cpu", spec.eval.cpu_fast)
    src, ref = read_split(rd, "test")
    e, threads = spec.eval, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score_all(decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty), tok, src, ref,
                         e.batch_tokens, "cpu", at.cfg.max_positions, e.bleu_tokenize)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cpu_fast", ["auto", "off"])
def test_rows_and_translations_equal_in_process_decoding_and_the_node_is_recorded(ray_local, finished_run,
                                                                                   cpu_fast):
    rd, raw = finished_run
    spec = spec_from_dict({**raw, "eval": {**EVAL, "cpu_fast": cpu_fast}})
    res = evaluate(StageContext(spec, rd, "evaluate", progress=False))
    out = rd / "evaluate"
    summary = json.loads((out / "summary.json").read_text())
    rows, hyps = _in_process(rd, spec)
    for name in DECODERS:
        assert (out / f"test.{name}.txt").read_text().split("\n")[:-1] == hyps[name]
        got = summary["rows"][name]
        scores = ("bleu", "chrf", "ter", "bleu_signature", "ter_signature")
        assert {k: got[k] for k in scores} == {k: rows[name][k] for k in scores}
        assert "tok:char" in got["bleu_signature"]                      # eval.bleu_tokenize
        assert got["latency_ms"] > 0 and res.metrics[f"test_bleu_{name}"] == got["bleu"]
        assert res.metrics[f"test_ter_{name}"] == got["ter"]
    assert summary["rows"]["at"]["speedup"] == 1.0 and summary["test_sentences"] == len(hyps["at"])
    # One local node: the task ran on it, on the CPU (eval.gpus 0) with eval.cpus = 1 thread.
    assert summary["node"] == {"id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                               "ip": ray.util.get_node_ip_address()}
    mode = None if cpu_fast == "off" else resolve_mode(cpu_fast)   # int8 or bf16, as this CPU goes
    assert (summary["device"], summary["cpu_fast"], summary["torch_threads"]) == ("cpu", mode, 1)
    md = (out / "summary.md").read_text()
    path = f" (CPU path: {mode}, eval.cpu_fast)" if mode else ""
    assert f"Decoded and timed on cpu{path}, 1 torch thread(s), node {socket.gethostname()}" in md
    assert summary["node"]["id"] in md
    assert "| model | BLEU | chrF | TER |" in md and f"TER: {summary['rows']['at']['ter_signature']}" in md
    assert set(res.outputs) == {"summary.json", "summary.md", *(f"test.{n}.txt" for n in DECODERS)}


@pytest.mark.parametrize("field", ["gpus", "cpus"])
def test_a_task_no_node_can_hold_is_refused_naming_its_field(ray_local, finished_run, field):
    """eval.gpus: 1 on a GPU-less local cluster (in general: one more than any node has)."""
    rd, raw = finished_run
    too_many = cluster_capacity().largest(field[:3].upper()) + 1
    spec = spec_from_dict({**raw, "eval": {**EVAL, field: too_many}})
    with pytest.raises(SpecError) as err:
        evaluate(StageContext(spec, rd, "evaluate", progress=False))
    assert [f for f, _ in err.value.errors] == [f"eval.{field}"]
    assert "no node of the Ray cluster has more than" in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_gpus_decodes_on_cuda(ray_local, finished_run, tmp_path):
    rd, raw = finished_run
    gpu_rd = tmp_path / "t"
    gpu_rd.mkdir()
    for stage in ("prepare", "tokenizer", "teacher", "student"):
        (gpu_rd / stage).symlink_to(rd / stage, target_is_directory=True)
    evaluate(StageContext(spec_from_dict({**raw, "eval": {**EVAL, "gpus": 1}}), gpu_rd, "evaluate", progress=False))
    summary = json.loads((gpu_rd / "evaluate" / "summary.json").read_text())
    assert summary["device"] == f"cuda:0 ({torch.cuda.get_device_name(0)})"
    assert all(summary["rows"][n]["latency_ms"] > 0 for n in DECODERS)


@pytest.mark.parametrize("student, label", [
    ({}, "imitate-NAT"),
    ({"imitation": False}, "NAT with imitation modules, no L_IL"),
    ({"imitation": False, "imitation_modules": False, "copy": "uniform"}, "NAT without imitation (UniformCopy)"),
])
def test_summary_names_the_student_it_evaluated(student, label):
    """An ablation variant's summary does not call its student imitate-NAT."""
    from orchestrator.stages.evaluate import summary_table

    spec = spec_from_dict({"name": "t", "data": {"source": "synthetic"}, "student": student})
    row = {"bleu": 1.0, "chrf": 2.0, "ter": 3.0, "latency_ms": 4.0, "speedup": 1.0, "bleu_signature": "b",
           "ter_signature": "t"}
    where = {"device": "cpu", "torch_threads": 1, "node": {"hostname": "h", "ip": "i", "id": "n"}}
    table = summary_table({"at": row, "nat": row, "lpd": row}, spec, where)
    assert f"| {label} | 1.00 |" in table and f"| {label} + LPD (ΔT = 3) |" in table
