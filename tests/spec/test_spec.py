"""The job spec: shipped jobs validate, every error names its field, overrides, hashes."""
from pathlib import Path

import pytest
import yaml

from orchestrator.spec.loading import SpecError, apply_overrides, dump_spec, load_spec, spec_from_dict
from orchestrator.run.hashing import stage_hashes
from orchestrator.spec.schema import JobSpec

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


def write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def fields(exc_info):
    return [f for f, _ in exc_info.value.errors]


def make_corpus(root, prefixes=("train", "valid", "test2016"), langs=("en", "de")):
    root.mkdir(parents=True, exist_ok=True)
    for prefix in prefixes:
        for lang in langs:
            (root / f"{prefix}.{lang}").write_text("")
    return root


# ------------------------------------------------------------------------- shipped jobs --

def test_all_jobs_are_shipped():
    assert {p.name for p in JOBS} >= {"tiny.yaml", "multi30k.yaml", "iwslt16.yaml",
                                      "wmt14.yaml", "wmt16_enro.yaml"}


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_job_validates(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if raw["data"].get("source") == "files":
        # The job's data dir is relative to the project root; validate the schema against a
        # stand-in corpus so the test does not depend on CWD or on the shared data being here.
        d = raw["data"]
        corpus = make_corpus(tmp_path / "corpus",
                             (d["train_prefix"], d["valid_prefix"], d["test_prefix"]),
                             (d["src_lang"], d["tgt_lang"]))
        overrides = [f"data.dir={corpus}"]
    spec = load_spec(path, overrides)
    assert spec.name == path.stem
    assert path.read_text().startswith("#")
    assert f"imitate-orch run jobs/{path.name}" in path.read_text()
    spec.model.to_model_config(spec.tokenizer.vocab_size, copy=spec.student.copy)


def test_multi30k_reads_data_inside_the_project(tmp_path, monkeypatch):
    """jobs/multi30k.yaml's data.dir is data/multi30k under the directory it runs from (README,
    "Getting the data"), never a path outside the project."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "multi30k.yaml").read_text())
    assert raw["data"]["dir"] == "data/multi30k"
    make_corpus(tmp_path / "data" / "multi30k", ("train", "valid", "test2016"), ("en", "de"))
    monkeypatch.chdir(tmp_path)  # data.dir is relative to the CWD
    spec = load_spec(Path(__file__).resolve().parents[2] / "jobs" / "multi30k.yaml")
    assert Path(spec.data.dir) == (tmp_path / "data" / "multi30k").resolve()
    assert spec.data.test_prefix == "test2016"


def test_wmt14_uses_paper_and_scaling_settings():
    spec = load_spec(next(p for p in JOBS if p.name == "wmt14.yaml"))
    assert (spec.data.hf_name, spec.data.hf_config) == ("wmt14", "de-en")
    assert (spec.data.src_lang, spec.data.tgt_lang) == ("en", "de")
    assert spec.teacher.strategy == "deepspeed" and spec.teacher.precision == "bf16"
    assert spec.teacher.zero_stage == 2 and spec.teacher.workers == 4
    assert spec.model.to_model_config(32000).n_actions == 512


# ---------------------------------------------------------------------------- defaults --

def test_minimal_spec_has_paper_defaults(tmp_path):
    spec = load_spec(write(tmp_path, "name: x\n"))
    assert spec.teacher.lambda1 == 0.001 and spec.student.lambda2 == 0.001
    assert spec.eval.delta_t == 3
    assert spec.distill.beam_size == 4 and spec.eval.beam_size == 4
    assert spec.data.source == "synthetic" and spec.model.size == "base"
    assert spec.student.copy == "soft" and spec.student.imitation
    assert spec.tracking.experiment == "x"


def test_to_model_config_presets_and_overrides():
    spec = spec_from_dict({"name": "x"})
    cfg = spec.model.to_model_config(8000)
    assert cfg.n_actions == 512 and cfg.vocab_size == 8000 and cfg.copy == "soft"
    spec = spec_from_dict({"name": "x", "model": {"size": "tiny", "n_actions": 32,
                                                  "d_model": 64, "dropout": 0.2}})
    cfg = spec.model.to_model_config(100, copy="uniform")
    assert (cfg.n_actions, cfg.d_model, cfg.dropout, cfg.copy) == (32, 64, 0.2, "uniform")
    assert cfg.enc_layers == 2  # untouched preset fields stay


# ------------------------------------------------------------------------------ errors --

@pytest.mark.parametrize("text, field", [
    ("name: x\nbogus: 1\n", "bogus"),
    ("name: x\nteacher:\n  lrr: 0.1\n", "teacher.lrr"),
    ("name: x\ndata:\n  synthetic:\n    train_sise: 5\n", "data.synthetic.train_sise"),
])
def test_unknown_keys_are_errors(tmp_path, text, field):
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert fields(e) == [field]
    assert f"{p}: {field}: Extra inputs are not permitted" in str(e.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "teacher": {"lrr": 0.1}})
    assert "did you mean 'lr'" in str(e.value)


@pytest.mark.parametrize("section, key, value", [
    ("teacher", "max_steps", "many"), ("student", "imitation", "maybe"),
    ("eval", "delta_t", [1]), ("model", "size", "huge"), ("teacher", "strategy", "fsdp"),
])
def test_wrong_type_names_the_field(section, key, value):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", section: {key: value}})
    assert fields(e) == [f"{section}.{key}"]


@pytest.mark.parametrize("section, key, value", [
    ("teacher", "max_steps", 0), ("student", "batch_tokens", -1), ("distill", "shards", 0),
    ("tokenizer", "vocab_size", -5), ("eval", "delta_t", 21), ("serve", "port", 70000),
    ("model", "dropout", 1.5), ("teacher", "label_smoothing", 1.0), ("teacher", "lambda1", -1),
    ("data", "max_tokens", 0), ("sweep", "lambda2", [0.1, 0.01]), ("sweep", "n_actions", [0]),
    ("serve", "max_delta_t", 21), ("serve", "max_lpd_tokens", 0), ("serve", "max_queued_requests", 0),
    ("serve", "body_timeout_s", 0), ("serve", "direct_port", 0), ("serve", "direct_port", 8000),
])
def test_out_of_range_values(section, key, value):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", section: {key: value}}, "jobs/x.yaml")
    assert fields(e) == [f"{section}.{key}"]
    assert str(e.value).startswith(f"jobs/x.yaml: {section}.{key}: ")


def test_error_message_format(tmp_path):
    p = write(tmp_path, "name: x\nteacher:\n  max_steps: 0\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(e.value) == f"{p}: teacher.max_steps: Input should be greater than 0"


def test_all_errors_reported_at_once():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "bad name", "teacher": {"lr": 0}, "eval": {"beam_size": 0}})
    assert set(fields(e)) == {"name", "teacher.lr", "eval.beam_size"}


def test_architecture_errors_caught_early():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "model": {"n_heads": 3}})
    assert fields(e) == ["model"] and "divisible" in str(e.value)


def test_fp16_needs_deepspeed_bf16_does_not():
    with pytest.raises(SpecError, match=r"student.precision: fp16 needs strategy: deepspeed"):
        spec_from_dict({"name": "x", "student": {"precision": "fp16"}})
    assert spec_from_dict({"name": "x", "student": {"precision": "fp16", "strategy": "deepspeed"}})
    assert spec_from_dict({"name": "x", "student": {"precision": "bf16"}}).student.strategy == "ddp"  # autocast


def test_name_required(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "seed: 3\n"))
    assert fields(e) == ["name"]


# -------------------------------------------------------------------------- file errors --

def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value) and "cannot read" in str(e.value)


def test_yaml_syntax_error(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: x\nteacher: [1, 2\n"))
    assert "invalid YAML" in str(e.value) and "line" in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "- name: x\n"))
    assert "mapping" in str(e.value)


def test_yaml_tags_are_not_executed(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n"))
    assert "invalid YAML" in str(e.value)


# --------------------------------------------------------------------------- data source --

def test_files_source_requires_dir():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "data": {"source": "files"}})
    assert fields(e) == ["data.dir"]


def test_huggingface_source_requires_name():
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "data": {"source": "huggingface"}})
    assert fields(e) == ["data.hf_name"]


def test_files_dir_not_found(tmp_path):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "data": {"source": "files", "dir": str(tmp_path / "no")}})
    assert fields(e) == ["data.dir"] and "not found" in str(e.value)


def test_missing_files_are_named(tmp_path):
    corpus = make_corpus(tmp_path, ("train", "test"))
    (corpus / "test.de").unlink()
    data = {"source": "files", "dir": str(corpus)}
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "data": data})
    assert fields(e) == ["data.valid_prefix"] and "valid.en" in str(e.value)
    # valid carved from train: valid files may be absent; the missing test file is next.
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "data": {**data, "valid_size": 100}})
    assert fields(e) == ["data.test_prefix"] and "test.de" in str(e.value)
    (corpus / "test.de").write_text("")
    spec = spec_from_dict({"name": "x", "data": {**data, "valid_size": 100}})
    assert spec.data.split_files("train") == (str(corpus / "train.en"), str(corpus / "train.de"))


def test_relative_dir_resolved_against_cwd(tmp_path, monkeypatch):
    make_corpus(tmp_path / "c", ("train", "valid", "test"))
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict({"name": "x", "data": {"source": "files", "dir": "c"}})
    assert spec.data.dir == str(tmp_path / "c")


# ---------------------------------------------------------------------------- overrides --

def test_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "name: x\n")
    spec = load_spec(p, ["teacher.max_steps=3", "student.imitation=false",
                         "sweep.n_actions=[8, 16]", "student.lambda2=0.01",
                         "teacher.lr=1.0e-3", "name=y", "ray.address=auto"])
    assert spec.teacher.max_steps == 3 and isinstance(spec.teacher.max_steps, int)
    assert spec.student.imitation is False
    assert spec.sweep.n_actions == [8, 16]
    assert spec.student.lambda2 == 0.01 and spec.teacher.lr == 1e-3
    assert spec.name == "y" and spec.ray.address == "auto"


def test_apply_overrides_does_not_mutate_and_creates_sections():
    raw = {"name": "x", "teacher": {"lr": 0.1}}
    out = apply_overrides(raw, ["teacher.lr=0.2", "eval.delta_t=1"])
    assert raw == {"name": "x", "teacher": {"lr": 0.1}}
    assert out == {"name": "x", "teacher": {"lr": 0.2}, "eval": {"delta_t": 1}}


@pytest.mark.parametrize("bad", ["teacher.lr", "=3", "teacher..lr=1", ".lr=1", "teacher.=1"])
def test_malformed_override(bad):
    with pytest.raises(SpecError) as e:
        apply_overrides({"name": "x"}, [bad])
    assert bad in str(e.value)


def test_override_through_a_value_is_an_error():
    with pytest.raises(SpecError) as e:
        apply_overrides({"name": "x"}, ["name.first=1"])
    assert "name.first" in str(e.value) and "not a section" in str(e.value)


def test_override_unknown_key_caught_by_schema(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, "name: x\n"), ["teacher.lrr=1"])
    assert fields(e) == ["teacher.lrr"]


# ----------------------------------------------------------------- hashes, params, dumps --

def test_stage_hashes_stable_and_sensitive_from_the_changed_section_on():
    a, b = stage_hashes(spec_from_dict({"name": "x"})), stage_hashes(spec_from_dict({"name": "x"}))
    assert a == b and all(len(h) == 64 for h in a.values())
    c = stage_hashes(spec_from_dict({"name": "x", "teacher": {"lr": 1e-3}}))
    assert [s for s in a if a[s] != c[s]] == ["teacher", "distill", "student", "evaluate"]
    d = stage_hashes(spec_from_dict({"name": "x", "eval": {"beam_size": 2}}))
    assert [s for s in a if a[s] != d[s]] == ["evaluate"]
    assert stage_hashes(spec_from_dict({"name": "x", "serve": {"port": 9000}})) == a  # not read by any stage
    # eval.cpu_fast: at its default (added later) out of the identity; another CPU path reruns evaluate.
    assert stage_hashes(spec_from_dict({"name": "x", "eval": {"cpu_fast": "auto"}})) == a
    for mode in ("off", "int8", "bf16"):
        e = stage_hashes(spec_from_dict({"name": "x", "eval": {"cpu_fast": mode}}))
        assert [s for s in a if a[s] != e[s]] == ["evaluate"]


def test_flat_params_dotted_strings():
    params = spec_from_dict({"name": "x"}).flat_params()
    assert params["teacher.lambda1"] == "0.001"
    assert params["data.synthetic.train_size"] == "20000"
    assert params["name"] == "x"
    assert params["sweep.n_actions"] == "[64, 128, 256, 512]"
    assert all(isinstance(v, str) for v in params.values())
    assert not any(isinstance(v, dict) for v in params.values())


def test_dump_roundtrip(tmp_path):
    spec = spec_from_dict({"name": "x", "student": {"copy": "uniform"}, "model": {"size": "tiny"}})
    text = dump_spec(spec)
    assert "lambda1: 0.001" in text and "copy: uniform" in text
    again = load_spec(write(tmp_path, text, "dumped.yaml"))
    assert again == spec
    assert stage_hashes(again) == stage_hashes(spec)


def test_jobspec_is_plain_pydantic():
    # Stages may rebuild a spec from a manifest's dict without going through YAML.
    spec = JobSpec.model_validate({"name": "x"})
    assert JobSpec.model_validate(spec.model_dump()) == spec


def test_local_hf_dataset_folder_is_pinned_but_hub_names_are_not(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.chdir(tmp_path)
    local = spec_from_dict({"name": "x", "data": {"source": "huggingface", "hf_name": "ds"}})
    assert local.data.hf_name == str(tmp_path / "ds")
    hub = spec_from_dict({"name": "x", "data": {"source": "huggingface", "hf_name": "wmt14", "hf_config": "de-en"}})
    assert hub.data.hf_name == "wmt14"
