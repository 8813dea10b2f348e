"""`imitate-orch diagnose RUN_DIR`: the imitation diagnostics of a finished run, written to
RUN_DIR/diagnostics/, with other students (here a NAT without imitation modules) beside it."""
import json
import shutil

from click.testing import CliRunner

from imitate_nat import ATDemonstrator, NATLearner
from imitate_nat.checkpoint import load_model, save_model
from orchestrator.cli import main


def test_diagnose_a_run_with_a_module_free_student_beside_it(micro_run, tmp_path):
    rd = tmp_path / "run"
    for stage in ("prepare", "tokenizer", "teacher", "student"):
        shutil.copytree(micro_run[0] / stage, rd / stage, symlinks=True)
    at, _ = load_model(rd / "teacher" / "model.pt")
    assert isinstance(at, ATDemonstrator)
    bare = NATLearner(type(at.cfg)(**{**at.cfg.to_dict(), "imitation_modules": False}))
    bare.init_from_at(at)
    save_model(bare, tmp_path / "bare.pt")

    r = CliRunner().invoke(main, ["diagnose", str(rd), "--student", str(tmp_path / "bare.pt"),
                                  "--bleu-sentences", "8", "--beam", "2"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    result = json.loads((rd / "diagnostics" / "diagnostics.json").read_text())
    L = at.cfg.dec_layers
    assert set(result["students"]) == {"run (this run)", str(tmp_path / "bare.pt")}
    own = result["students"]["run (this run)"]
    assert own["imitation_modules"] and len(own["kl"]) == L and all(k >= -1e-6 for k in own["kl"])
    assert result["students"][str(tmp_path / "bare.pt")] == {"imitation_modules": False}
    d = result["at"]["decoding"]
    assert d["sentences"] == 8 and d["beam"] == 2 and 0 <= d["bleu_u_zeroed"] <= 100
    md = (rd / "diagnostics" / "diagnostics.md").read_text()
    assert "with u = 0 in every layer" in md and "no imitation modules" in md and md in r.output

    # Before the student is trained: the demonstrator alone. Without a teacher: exit 2, saying so.
    shutil.rmtree(rd / "student")
    r = CliRunner().invoke(main, ["diagnose", str(rd), "--bleu-sentences", "2", "--beam", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((rd / "diagnostics" / "diagnostics.json").read_text())["students"] == {}
    assert "no student yet" in r.output
    shutil.rmtree(rd / "teacher")
    r = CliRunner().invoke(main, ["diagnose", str(rd)])
    assert r.exit_code == 2 and "no teacher model" in r.output


def test_ablation_students_are_those_trained_from_this_runs_teacher(tmp_path):
    from orchestrator.studies.diagnose import student_files

    def run(path, teacher: bytes, student: bytes | None = b"s"):
        (path / "teacher").mkdir(parents=True)
        (path / "teacher" / "model.pt").write_bytes(teacher)
        if student is not None:
            (path / "student").mkdir()
            (path / "student" / "model.pt").write_bytes(student + path.name.encode())
        return path

    rd = run(tmp_path / "job", b"T")
    ablation = tmp_path / "job-ablate"
    run(ablation / "distilled-soft", b"T")
    run(ablation / "lambda1-0", b"other teacher")
    run(ablation / "raw-uniform", b"T", student=None)            # not finished
    (ablation / "distilled-soft-imitation").mkdir(parents=True)   # linked to the job's own dirs
    for stage in ("teacher", "student"):
        (ablation / "distilled-soft-imitation" / stage).symlink_to(rd / stage)
    assert list(student_files(rd)) == ["job (this run)"]
    assert student_files(run(tmp_path / "untrained", b"T", student=None)) == {}
    found = student_files(rd, ablation=True)
    assert found == {"job (this run)": rd / "student" / "model.pt",
                     "ablation: distilled-soft": ablation / "distilled-soft" / "student" / "model.pt"}
