"""`imitate-orch ablate`: Table 2's variants as pipeline runs sharing one teacher and one distillation."""
import json

import pytest
from click.testing import CliRunner

from imitate_nat.checkpoint import read_model_file
from orchestrator.cli import main
from orchestrator.run.hashing import stage_hashes
from orchestrator.run.layout import run_dir
from orchestrator.run.manifest import Manifest, read_manifest, write_manifest
from orchestrator.run.sharing import shared_stage_dirs
from orchestrator.studies.ablate import LAMBDA1_ZERO, ROWS, VARIANTS, ablation_dir, derived_spec, stage_links

from helpers import MICRO_JOB_SETS, copy_micro_workdir, micro_job_spec


def test_variants_are_the_rows_of_table_2(tmp_path):
    base = micro_job_spec(tmp_path)
    assert len(ROWS) == 8 and ROWS[6] == ("distilled-soft-imitation", True)   # row 7: row 6 + LPD
    assert ROWS[7] == ("distilled-soft-modules", False)    # row 8: the modules without L_IL (not the paper's)
    # "w/o imitation" is the paper's: a NAT without imitation modules.
    assert {(v.targets, v.copy, v.imitation, v.modules) for v in VARIANTS} == {
        ("raw", "uniform", False, False), ("distilled", "uniform", False, False), ("distilled", "soft", False, False),
        ("raw", "soft", True, True), ("distilled", "uniform", True, True), ("distilled", "soft", True, True),
        ("distilled", "soft", False, True)}
    hashes = {}
    for v in VARIANTS:
        spec = derived_spec(base, v.name, student=v.overrides())
        assert run_dir(spec) == ablation_dir(base) / v.name
        s = spec.student
        assert (s.targets, s.copy, s.imitation, s.imitation_modules) == (v.targets, v.copy, v.imitation, v.modules)
        assert spec.student.max_steps == base.student.max_steps      # everything else is the job's
        hashes[v.name] = stage_hashes(spec)
    base_hashes = stage_hashes(base)
    for h in hashes.values():
        assert all(h[s] == base_hashes[s] for s in ("prepare", "tokenizer", "teacher", "distill"))
    assert len({h["student"] for h in hashes.values()}) == len(VARIANTS)
    assert hashes["distilled-soft-imitation"]["student"] == base_hashes["student"]  # tiny's student is imitate-NAT


def test_an_ablation_at_another_lambda2_reuses_the_rows_without_imitation_and_says_its_lambda2(tmp_path):
    from orchestrator.studies.ablate import table2_markdown, table_rows

    base = micro_job_spec(tmp_path)
    other = micro_job_spec(tmp_path, "student.lambda2=0.1")
    for v in VARIANTS:
        same = stage_hashes(derived_spec(base, v.name, student=v.overrides())) == \
            stage_hashes(derived_spec(other, v.name, student=v.overrides()))
        assert same == (not v.imitation), v.name
    result = {"job": "tiny", "valid_sentences": 10, "test_sentences": 10, "beam": 4, "test_at": 30.0, "delta_t": 3,
              "rows": table_rows({}), "lambda2": 0.1, "il_reduction": "mean"}
    assert "Imitation: λ2 = 0.1. " in table2_markdown(result)
    assert "λ2 = 1 (L_IL summed over a batch's tokens)" in table2_markdown({**result, "lambda2": 1.0,
                                                                            "il_reduction": "sum"})
    older = {k: v for k, v in result.items() if k not in ("lambda2", "il_reduction")}
    assert "λ2" not in table2_markdown(older)   # an ablation.json from before says nothing it did not record


def test_stage_links_share_the_job_dirs_unless_they_hold_another_hash(tmp_path):
    base = micro_job_spec(tmp_path)
    soft = derived_spec(base, "distilled-soft-imitation", student={"copy": "soft"})
    uniform = derived_spec(base, "distilled-uniform", student={"copy": "uniform", "imitation": False})
    job = run_dir(base)
    # Nothing run yet: every stage the variant has in common with the job goes to the job's dir.
    assert stage_links(uniform, base) == {s: job / s for s in ("prepare", "tokenizer", "teacher", "distill")}
    assert set(stage_links(soft, base)) == {"prepare", "tokenizer", "teacher", "distill", "student", "evaluate"}
    # The job's teacher dir holds another configuration's teacher: never overwrite it, share elsewhere.
    write_manifest(job / "teacher", Manifest(stage="teacher", input_hash="0" * 64, status="done"))
    write_manifest(job / "prepare", Manifest(stage="prepare", input_hash=stage_hashes(base)["prepare"], status="done"))
    links, shared = stage_links(uniform, base), shared_stage_dirs(base, ablation_dir(base) / "shared")
    assert links["prepare"] == job / "prepare"
    assert links["teacher"] == shared["teacher"] and links["teacher"].is_relative_to(ablation_dir(base))
    assert links["distill"] == shared["distill"]   # downstream of a shared teacher: shared too
    # --lambda1-zero-teacher: another teacher (its own dir), the same data stages.
    no_reg = derived_spec(base, LAMBDA1_ZERO, teacher={"lambda1": 0.0})
    assert no_reg.teacher.lambda1 == 0.0 and run_dir(no_reg) == ablation_dir(base) / "lambda1-0"
    assert stage_links(no_reg, base) == {"prepare": job / "prepare", "tokenizer": job / "tokenizer"}


def ablate_one_variant_in_a_sitting(micro_run, tmp_path):
    """`run` then `ablate --only distilled-soft --seeds 2` on a copy of the micro run: the table
    says which rows are not run yet, and `report` takes the partial table. Two student seeds:
    the job's, and the job's + 1 in a run dir of its own; the row is their mean.
    Returns (run dir, spec, ablation dir, `--set` args)."""
    rd, spec = copy_micro_workdir(micro_run, tmp_path / "runs")
    sets = [a for s in [f"workdir={tmp_path / 'runs'}", *MICRO_JOB_SETS] for a in ("--set", s)]
    out = ablation_dir(spec)
    r = CliRunner().invoke(main, ["ablate", "jobs/tiny.yaml", *sets, "--only", "distilled-soft", "--seeds", "2",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    partial = json.loads((out / "ablation.json").read_text())
    assert list(partial["variants"]) == ["distilled-soft"] and len(partial["missing"]) == 6
    assert [row["valid_bleu"] is None for row in partial["rows"]] == [True, True, False, True, True, True, True, True]
    assert (out / "ablation.md").read_text().count("not run yet | not run yet") == 7
    runs, row3 = partial["variants"]["distilled-soft"]["runs"], partial["rows"][2]
    assert [r_["seed"] for r_ in runs] == [spec.seed, spec.seed + 1]
    assert runs[1]["run_dir"] == str(out / f"distilled-soft-seed{spec.seed + 1}")
    assert row3["seeds"] == 2 and row3["valid_bleu"] == pytest.approx(sum(r_["valid"]["nat"] for r_ in runs) / 2)
    assert row3["valid_std"] is not None and " ± " in (out / "ablation.md").read_text()
    assert read_model_file(out / "distilled-soft" / "student" / "model.pt")["config"]["imitation_modules"] is False
    r = CliRunner().invoke(main, ["report", str(rd), "--max-delta-t", "0", "--no-progress", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "| 3 | distilled-soft |" in (tmp_path / "p" / "report.md").read_text()
    for stage in ("prepare", "tokenizer", "teacher", "distill"):   # the job's, linked
        assert (out / "distilled-soft" / stage).resolve() == (rd / stage).resolve()
    return rd, spec, out, sets


def test_ablate_one_variant_after_run_in_a_sitting_with_two_seeds(micro_run, tmp_path):
    ablate_one_variant_in_a_sitting(micro_run, tmp_path)


@pytest.mark.slow
def test_ablate_after_run_trains_no_second_teacher_and_fills_table_2(micro_run, tmp_path):
    """`run`, one `ablate --only` sitting, then the rest: all variants link to the job's
    teacher and distillation, row 6 reuses the job's student, the 5 other students are trained,
    no teacher. Then `report` on the job's run includes the ablation. (The λ1 = 0 teacher
    option is not trained here, to keep the test short: its spec and links are tested above,
    the report's lookup in test_report.)"""
    from mlflow import MlflowClient

    teacher_started = read_manifest(micro_run[0] / "teacher").started
    rd, spec, out, sets = ablate_one_variant_in_a_sitting(micro_run, tmp_path)
    r = CliRunner().invoke(main, ["ablate", "jobs/tiny.yaml", *sets, "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    result = json.loads((out / "ablation.json").read_text())
    assert [row["row"] for row in result["rows"]] == list(range(1, 9))
    assert all(f"| {i} | " in r.output for i in range(1, 9)) and (out / "ablation.md").is_file()
    # Paired bootstrap between the rows one switch apart; its observed Δ is the rows' test BLEU Δ.
    test_bleu = {row["row"]: row["test_bleu"] for row in result["rows"]}
    assert [(c["from"], c["to"]) for c in result["comparisons"]] == [(2, 3), (3, 8), (8, 6), (3, 6), (2, 5), (6, 7)]
    for c in result["comparisons"]:
        assert c["delta"] == pytest.approx(test_bleu[c["to"]] - test_bleu[c["from"]], abs=1e-6) and 0 <= c["p"] <= 1
    assert "| 3 → 8 | imitation modules, no L_IL |" in r.output
    row6, row7 = result["rows"][5], result["rows"][6]
    assert row7["lpd"] and row7["valid_bleu"] == result["variants"][row6["variant"]]["valid"]["lpd"]

    for v in VARIANTS:
        vd = out / v.name
        for stage in ("prepare", "tokenizer", "teacher", "distill"):
            assert (vd / stage).is_symlink() and (vd / stage).resolve() == (rd / stage).resolve()
        config = read_model_file(vd / "student" / "model.pt")["config"]
        assert (config["copy"], config["imitation_modules"]) == (v.copy, v.modules)
    assert read_manifest(rd / "teacher").started == teacher_started          # the job's teacher, not retrained
    assert (out / "distilled-soft-imitation" / "student").resolve() == (rd / "student").resolve()

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(spec.tracking.experiment).experiment_id
    first, abl = sorted((r for r in client.search_runs([exp], "tags.ablation_of = 'tiny'")
                         if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    variants = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{abl.info.run_id}'")
    assert sorted(v.info.run_name for v in variants) == sorted(v.name for v in VARIANTS)
    variants += client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
    trained = {}
    for v in variants:
        for stage_run in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{v.info.run_id}'"):
            if stage_run.data.params["reused"] == "False":
                trained.setdefault(stage_run.data.tags["stage"], []).append(v.info.run_name)
    assert "teacher" not in trained and "distill" not in trained and "prepare" not in trained
    assert sorted(trained["student"]) == sorted([v.name for v in VARIANTS if v.name != "distilled-soft-imitation"]
                                                + [f"distilled-soft-seed{spec.seed + 1}"])
    assert abl.data.metrics["row7_valid_bleu"] == row7["valid_bleu"]
    trainings = "params.reused = 'False'"
    assert len(client.search_runs([exp], f"tags.stage = 'teacher' and {trainings}")) == 1   # micro_run's, only
    n_trained = len(client.search_runs([exp], trainings))

    # A second ablate trains nothing and gives the same table (valid scores come from the cache).
    r2 = CliRunner().invoke(main, ["ablate", "jobs/tiny.yaml", *sets, "--no-progress"])
    assert r2.exit_code == 0, r2.output
    assert json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]
    assert len(client.search_runs([exp], trainings)) == n_trained

    r3 = CliRunner().invoke(main, ["report", str(rd), "--max-delta-t", "0", "--no-progress", "--out", str(tmp_path / "r")])
    assert r3.exit_code == 0, r3.output + repr(r3.exception)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 7 | distilled-soft-imitation |" in md and "NAT without imitation (ablation row 3)" in md
    assert (tmp_path / "r" / "ablation.png").is_file()


def test_ablate_at_another_lambda2_trains_row_6_in_its_own_dir_and_leaves_the_jobs_student(micro_run, tmp_path):
    """Row 6 first reuses the job's student (its dir a link to the job's); at another λ2 it is
    another student: trained in the variant's own dir, not through that link into the job's."""
    from orchestrator.run.files import sha256_file

    rd, spec = copy_micro_workdir(micro_run, tmp_path / "runs")
    sets = [a for s in [f"workdir={tmp_path / 'runs'}", *MICRO_JOB_SETS] for a in ("--set", s)]
    row6 = ablation_dir(spec) / "distilled-soft-imitation"
    r = CliRunner().invoke(main, ["ablate", "jobs/tiny.yaml", *sets, "--only", "distilled-soft-imitation",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (row6 / "student").is_symlink() and (row6 / "student").resolve() == (rd / "student").resolve()
    job_student = (read_manifest(rd / "student").input_hash, sha256_file(rd / "student" / "model.pt"))
    job_summary = (rd / "evaluate" / "summary.json").read_text()

    r = CliRunner().invoke(main, ["ablate", "jobs/tiny.yaml", *sets, "--set", "student.lambda2=0.1",
                                  "--only", "distilled-soft-imitation", "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert (read_manifest(rd / "student").input_hash, sha256_file(rd / "student" / "model.pt")) == job_student
    assert (rd / "evaluate" / "summary.json").read_text() == job_summary
    for stage in ("student", "evaluate"):
        assert not (row6 / stage).is_symlink()
    assert read_manifest(row6 / "student").input_hash == \
        stage_hashes(micro_job_spec(tmp_path / "runs", "student.lambda2=0.1"))["student"]
    assert "Imitation: λ2 = 0.1. " in (ablation_dir(spec) / "ablation.md").read_text()
