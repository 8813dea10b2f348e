"""The typed job spec: one YAML file per job, validated before anything runs.

Every section is a pydantic model with `extra="forbid"`, so a typo is an error naming its
field (`teacher.lrr: Extra inputs are not permitted (did you mean 'lr'?)`) instead of a
silently ignored setting. Every section has defaults, so a minimal job is `name: x`, and the
defaults are the paper's (λ1 = λ2 = 0.001, 512 actions, beam 4, ΔT = 3).

A spec is data only: it is read with `yaml.safe_load` and never imports or runs code
(reading, overrides and error reporting are in loading.py). The `data` section is in
data.py, what every section shares (unknown keys refused, FieldError) in base.py.
Relative `data.dir` paths are resolved against the current working directory when the spec
is validated and stored absolute, so Ray workers (whose CWD differs) read the same files.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, field_validator, model_validator

from imitate_nat.config import CPU_MODES, ModelConfig, preset
from imitate_nat.metrics import check_bleu_tokenize

from .base import FieldError, _Section
from .data import DataSpec


# ----------------------------------------------------------------------- tokenizer, model --

class TokenizerSpec(_Section):
    vocab_size: int = Field(8000, gt=0)              # joint source+target SentencePiece vocab
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = Field(1.0, gt=0.0, le=1.0)
    max_sentences: int = Field(2_000_000, gt=0)      # sentences sampled to train the tokenizer


class ModelSpec(_Section):
    """A named size (imitate_nat.config.PRESETS) plus optional per-field overrides."""

    size: Literal["base", "iwslt_small", "small", "tiny"] = "base"
    d_model: Optional[int] = Field(None, gt=0)
    n_heads: Optional[int] = Field(None, gt=0)
    d_ffn: Optional[int] = Field(None, gt=0)
    enc_layers: Optional[int] = Field(None, gt=0)
    dec_layers: Optional[int] = Field(None, gt=0)
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)
    n_actions: Optional[int] = Field(None, gt=0)     # None: the preset's (paper: 512)
    action_alpha: Optional[float] = Field(None, ge=0.0, lt=1.0)
    max_positions: Optional[int] = Field(None, gt=0)
    max_length_offset: Optional[int] = Field(None, gt=0)

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"size"}).items() if v is not None}

    def to_model_config(self, vocab_size: int, copy: str = "soft", imitation_modules: bool = True) -> ModelConfig:
        """The ModelConfig for both the AT teacher and the NAT student (`copy` and
        `imitation_modules` are the student's)."""
        return preset(self.size, vocab_size=vocab_size, copy=copy, imitation_modules=imitation_modules,
                      **self.overrides())

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSpec":
        # Catch architecture errors (d_model not divisible by n_heads, ...) before any stage runs.
        self.to_model_config(vocab_size=1)
        return self


# ------------------------------------------------------------------------------ training --

class TrainSpec(_Section):
    max_steps: int = Field(100000, gt=0)
    batch_tokens: int = Field(4096, gt=0)            # per worker and micro-batch (fairseq's --max-tokens)
    update_freq: int = Field(1, gt=0)                # micro-batches per update (gradient accumulation)
    lr: float = Field(5e-4, gt=0.0)
    warmup_steps: int = Field(4000, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip_norm: float = Field(1.0, ge=0.0)            # 0: no clipping
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    eval_every: int = Field(1000, gt=0)
    log_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(1000, gt=0)
    patience: Optional[int] = Field(None, gt=0)      # evals without improvement before stopping
    # This stage's seed (initialization, dropout, batch order); None: the job's `seed`. Seeds of
    # a student share everything upstream (the job's seed would retrain the teacher too).
    seed: Optional[int] = Field(None, ge=0)
    # Valid sentences (the first N) whose BLEU picks the best checkpoint during training; None:
    # the whole valid set (slower evals; what a comparison between models should pick on).
    valid_sentences: Optional[int] = Field(500, gt=0)
    # Ray Train scaling
    workers: int = Field(1, gt=0)
    cpus_per_worker: int = Field(1, ge=0)
    gpus_per_worker: float = Field(0, ge=0.0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    # torch.distributed backend: auto = nccl when workers have GPUs, else gloo. gloo with GPUs
    # lets GPU-requesting workers run on nodes whose GPUs are only advertised (Ray's fake
    # multi-node autoscaler in tests/run/test_autoscaling.py); on real GPUs nccl is much faster.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    zero_stage: Literal[0, 1, 2, 3] = 2              # DeepSpeed only
    # auto: bf16 where the worker's device computes it natively (a CUDA GPU with bf16; a CPU with
    # AVX512-BF16 or AMX), else fp32: on an AVX2-only CPU bf16 autocast is ~30x slower than fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    max_failures: int = Field(0, ge=-1)              # Ray FailureConfig; -1: retry forever
    storage_path: Optional[str] = None               # local path or s3://...; None: the run dir
    # Checkpoint averaging (fairseq's average_checkpoints.py). 0: off (model.pt: the best checkpoint
    # by valid BLEU). N >= 2: Ray Train keeps the last N checkpoints (not the 2 best), the stage
    # averages their weights and scores the average on valid as training does; average_pick
    # "better": model.pt is the average if its valid BLEU >= the best checkpoint's, else that one;
    # "averaged": always the average. Changing either retrains the stage (README, "Checkpoint averaging").
    average_last: int = Field(0, ge=0)
    average_pick: Literal["better", "averaged"] = "better"

    @model_validator(mode="after")
    def _fp16_needs_deepspeed(self) -> "TrainSpec":
        # bf16 under ddp is torch autocast (fp32 weights, bf16 matmuls; faster on CPUs with
        # AVX512-BF16, see BENCHMARKS.md). fp16 needs loss scaling, which only the DeepSpeed path has.
        if self.precision == "fp16" and self.strategy != "deepspeed":
            raise FieldError("precision", "fp16 needs strategy: deepspeed (loss scaling); ddp supports fp32 and bf16")
        return self

    @model_validator(mode="after")
    def _average_of_several(self) -> "TrainSpec":
        if self.average_last == 1:   # the "average" of one checkpoint would be the last, not the best
            raise FieldError("average_last", "1 would average a single checkpoint; 0 is off, N >= 2 averages the last N")
        return self


class TeacherSpec(TrainSpec):
    lambda1: float = Field(0.001, ge=0.0)            # eq 14: action-distribution regularizer


COPY_NAMES = {"soft": "SoftCopy", "uniform": "UniformCopy", "uniform_encoder": "UniformCopy of encoder states"}

# `copy` is the name the brief and the YAML use; it shadows the deprecated BaseModel.copy(),
# which nothing here calls, so the warning pydantic emits for it is silenced.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "copy"')

    class StudentSpec(TrainSpec):
        lambda2: float = Field(0.001, ge=0.0)        # eq 15: imitation loss weight
        imitation: bool = True                       # False: "NAT without imitation" ablation
        # False: a NAT with no imitation modules at all (the paper's baseline; needs imitation: false)
        imitation_modules: bool = True
        il_reduction: Literal["mean", "sum"] = "mean"   # L_IL per token, or summed over a batch's tokens
        # decoder inputs: SoftCopy; UniformCopy of the source embeddings (the paper's); uniform
        # copying of the encoder's states (this project's UniformCopy before 2026-12)
        copy: Literal["soft", "uniform", "uniform_encoder"] = "soft"
        length_weight: float = Field(0.1, ge=0.0)
        targets: Literal["distilled", "raw"] = "distilled"
        init_from_teacher: bool = True

        def label(self) -> str:
            """'imitate-NAT' for the paper's student, else what differs (e.g. an ablation variant)."""
            extras = ([COPY_NAMES[self.copy]] if self.copy != "soft" else []) + \
                (["raw targets"] if self.targets == "raw" else [])
            if self.imitation:
                name = "imitate-NAT"
            else:
                name = "NAT with imitation modules, no L_IL" if self.imitation_modules else "NAT without imitation"
            return f"{name} ({', '.join(extras)})" if extras else name

        @model_validator(mode="after")
        def _imitation_needs_modules(self) -> "StudentSpec":
            if self.imitation and not self.imitation_modules:
                raise FieldError("imitation_modules", "false leaves nothing to imitate with: set "
                                 "student.imitation: false too (the module-free NAT baseline)")
            return self


# ------------------------------------------------------------- distill, eval, serve, sweep --

class DistillSpec(_Section):
    shards: int = Field(16, gt=0)
    actors: int = Field(2, gt=0)
    gpus_per_actor: float = Field(0, ge=0.0)
    cpus_per_actor: float = Field(1, ge=0.0)
    beam_size: int = Field(4, gt=0)
    batch_tokens: int = Field(4096, gt=0)
    length_penalty: float = Field(1.0, ge=0.0)
    max_len_a: float = Field(1.5, ge=0.0)            # max output length = a * src_len + b
    max_len_b: int = Field(10, ge=0)
    # torch autocast around the teacher's beam search in the actors (weights stay fp32, beam
    # scores are summed in fp32). auto: bf16 where an actor decodes on CUDA, fp32 on the CPU,
    # where bf16 pays only with AVX512-BF16/AMX (BENCHMARKS.md, "Distillation precision").
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> "DistillSpec":
        # fp16 is for GPUs: on a CPU it is bf16's precision with a narrower range and, on CPUs
        # without fp16 matrix units (most), slower than fp32. Refused before anything starts.
        if self.precision == "fp16" and self.gpus_per_actor == 0:
            raise FieldError("precision",
                             "fp16 needs GPU actors (distill.gpus_per_actor > 0); on a CPU use bf16 or fp32")
        return self


class EvalSpec(_Section):
    beam_size: int = Field(4, gt=0)                  # AT teacher decoding and LPD rescoring
    delta_t: int = Field(3, ge=0, le=20)             # LPD: lengths T'-ΔT .. T'+ΔT
    length_penalty: float = Field(1.0, ge=0.0)
    latency_sentences: int = Field(100, gt=0)        # sentences decoded one by one for latency
    batch_tokens: int = Field(4096, gt=0)
    # sacreBLEU's BLEU tokenizer for the evaluate stage and `eval` (13a; intl, zh, char, none, ja-mecab, ...)
    bleu_tokenize: Annotated[str, AfterValidator(check_bleu_tokenize)] = "13a"
    # The evaluate stage decodes and times in a Ray task holding these: gpus: 1 puts it on a GPU
    # node (decoding on cuda) instead of the driver's CPU-only head. cpus is also its torch threads (≥ 1).
    cpus: float = Field(1, ge=0.0)
    gpus: float = Field(0, ge=0.0)
    # Decoding on a CPU (evaluate stage, eval, translate --run, serve, the registered model): the
    # models in int8 or bf16 (imitate_nat/cpu.py); auto: bf16 on CPUs with AMX, else int8; off:
    # fp32. No effect on a GPU. BLEU on Multi30k within ±0.06 of fp32 (BENCHMARKS.md).
    cpu_fast: Literal[CPU_MODES] = "auto"

    @field_validator("cpu_fast", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` (and `no`, `false`) as false, `on`/`true` as true.
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


class ServeSpec(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, gt=0)
    gpus_per_replica: float = Field(0, ge=0.0)
    max_batch_size: int = Field(16, gt=0)
    # 0: a batch takes whatever is queued when the replica is free. Decoding blocks the replica's
    # event loop, so requests arriving meanwhile form the next batch anyway; a wait only adds
    # latency at low load (BENCHMARKS.md, "Serving under load").
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    # On a CPU replica, a batch's texts are decoded in groups whose longest source is at most
    # this multiple of the shortest: padding costs a CPU as much as real tokens, and one batch
    # padded to its longest text was slower than no batching (BENCHMARKS.md). null: one group.
    # A GPU replica decodes the batch at once (padding is nearly free there; launches are not).
    length_bucket_ratio: Optional[float] = Field(1.25, ge=1.0)
    max_texts: int = Field(64, gt=0)                 # per request
    max_chars: int = Field(2000, gt=0)               # per text
    max_delta_t: int = Field(10, ge=0, le=20)        # as eval.delta_t
    max_body_bytes: int = Field(1_000_000, gt=0)
    # A request's decoding cost: its source tokens × (2ΔT+1), the LPD candidates the NAT decodes
    # and the AT rescores. 65,536 takes 64 texts of 146 tokens at ΔT 3, or one of 1,023 at ΔT 20.
    max_lpd_tokens: int = Field(65_536, gt=0)
    # Overload: requests waiting in Serve's proxy for a free replica slot; past that, 503 with
    # Retry-After at once instead of an ever longer queue.
    max_queued_requests: int = Field(64, gt=0)
    # Requests a replica takes at once (decoding, and queued for its next batches); null: twice
    # max_batch_size, at least 32 (throughput). Under overload an answered request waits behind
    # up to this many plus max_queued_requests: small values bound latency, at the cost of
    # smaller batches and more 503s (BENCHMARKS.md, overload).
    max_ongoing_requests: Optional[int] = Field(None, gt=0)
    retry_after_s: int = Field(1, ge=0)
    # Serve's end-to-end limit per HTTP request (408 past it), and the deadline for receiving a
    # request's body (408): slow clients cannot hold a replica's request slots.
    request_timeout_s: float = Field(60.0, gt=0)
    body_timeout_s: float = Field(10.0, gt=0)
    # null: off. N: each replica also answers HTTP itself, on `host` at ports N, N+1, … of its
    # node (Ray Serve's direct ingress), skipping Serve's HTTP proxy and its hop: about a third
    # of the Multi30k model's decode time at concurrency 1 on a 2-core CPU (BENCHMARKS.md). The
    # proxy on `port` keeps working. Read by Ray at its start: for a cluster `serve` starts itself.
    direct_port: Optional[int] = Field(None, ge=1, le=65535)

    @model_validator(mode="after")
    def _direct_ports_fit(self) -> "ServeSpec":
        if self.direct_port is None:
            return self
        if self.direct_port <= self.port < self.direct_port + self.replicas:
            raise FieldError("direct_port", f"the replicas' ports {self.direct_port}…"
                             f"{self.direct_port + self.replicas - 1} include serve.port {self.port}")
        if self.direct_port + self.replicas - 1 > 65535:
            raise FieldError("direct_port", f"{self.replicas} replicas need ports up to "
                             f"{self.direct_port + self.replicas - 1}, past 65535")
        return self


class SweepSpec(_Section):
    """`imitate-orch sweep`: Ray Tune (random search + ASHA) over λ1, λ2 and the action count;
    every trained student is then decoded at each ΔT of `delta_t` (ΔT is decoding only)."""

    num_samples: int = Field(8, gt=0)                # trials
    max_concurrent: int = Field(2, gt=0)             # trials running at once
    lambda1: tuple[float, float] = (1e-4, 1e-1)      # log-uniform [low, high]; low == high: fixed
    lambda2: tuple[float, float] = (1e-4, 1e-1)
    # A grid instead of a range: every value is tried, in each of the num_samples repetitions
    # (e.g. lambda2_values: [0.001, 0.01, 0.1, 1] with num_samples 1 is four trials).
    lambda1_values: list[float] | None = Field(None, min_length=1)
    lambda2_values: list[float] | None = Field(None, min_length=1)
    n_actions: list[int] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)  # uniform choice
    delta_t: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5], min_length=1)
    # What ranks the trials (valid set, final): NAT+LPD at its best ΔT, or the one-pass NAT.
    metric: Literal["valid_bleu_lpd", "valid_bleu_nat"] = "valid_bleu_lpd"
    mode: Literal["max", "min"] = "max"
    # ASHA early stopping over student training, on the student's valid BLEU reported at every
    # eval/checkpoint interval, trials compared at equal steps; stop the worst 1 - 1/reduction_factor at each rung.
    grace_period: int = Field(1, gt=0)               # valid reports every trial makes before it can be stopped
    reduction_factor: int = Field(2, ge=2)

    @field_validator("lambda1", "lambda2")
    @classmethod
    def _log_bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] and math.isfinite(v[1])):
            raise ValueError(f"need 0 < low <= high < inf for a log-uniform range, got {list(v)}")
        return v

    @field_validator("lambda1_values", "lambda2_values")
    @classmethod
    def _grid(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0 <= x < math.inf for x in v):
            raise ValueError(f"grid values must be finite and >= 0, got {v}")
        return None if v is None else sorted(set(v))

    @field_validator("n_actions")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(x <= 0 for x in v):
            raise ValueError(f"action counts must be positive, got {v}")
        return sorted(set(v))

    @field_validator("delta_t")
    @classmethod
    def _delta_range(cls, v: list[int]) -> list[int]:
        if any(not 0 <= x <= 20 for x in v):
            raise ValueError(f"ΔT values must be in 0..20, got {v}")
        return sorted(set(v))


class TrackingSpec(_Section):
    uri: Optional[str] = None                        # None: sqlite file under the work dir
    experiment: Optional[str] = None                 # None: the job name
    # A finished run logs its models as one mlflow.pyfunc model and registers it under the job's
    # name (registry.py); false: neither.
    register_model: bool = True

    @field_validator("uri")
    @classmethod
    def _has_scheme(cls, v: Optional[str]) -> Optional[str]:
        # A bare path would be an MLflow file store, which MLflow 3 refuses at the first log call.
        if v is not None and "://" not in v and not v.startswith("databricks"):
            raise ValueError(f"needs a scheme, e.g. sqlite:///runs/mlflow.db or http://host:5000 (got {v!r})")
        return v


class RaySpec(_Section):
    address: Optional[str] = None                    # None: start a local Ray; "auto": join
    num_cpus: Optional[int] = Field(None, gt=0)
    object_store_memory: Optional[int] = Field(None, gt=0)
    include_dashboard: Optional[bool] = None         # local Ray only; None: Ray decides (on if installed)


# ------------------------------------------------------------------------------- the job --

WORKDIR_ENV = "IMITATE_WORKDIR"   # cluster.yaml sets it on every node: the shared file system


def default_workdir() -> str:
    """Where runs go when a job does not say: $IMITATE_WORKDIR, else ./runs."""
    return os.environ.get(WORKDIR_ENV) or "./runs"


class JobSpec(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # used in paths: runs/<name>/...
    workdir: str = Field(default_factory=default_workdir)
    seed: int = Field(1, ge=0)
    data: DataSpec = Field(default_factory=DataSpec)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    serve: ServeSpec = Field(default_factory=ServeSpec)
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _defaults_from_name(self) -> "JobSpec":
        if self.tracking.experiment is None:
            self.tracking.experiment = self.name
        return self

    @field_validator("workdir")
    @classmethod
    def _workdir_usable(cls, v: str) -> str:
        # A URI would silently become a local folder ("s3://b/runs" -> "s3:/b/runs"): the run dir
        # needs a POSIX file system (atomic renames, memory-mapped data) that every node mounts.
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", v):
            raise ValueError(f"{v!r} is a URI; the work dir must be a file system path every Ray node "
                             f"mounts (NFS/EFS, e.g. /mnt/imitate/runs). Object stores are supported for "
                             f"checkpoints: teacher.storage_path / student.storage_path")
        # Caught now rather than as a traceback when the first stage makes its directory.
        if os.path.exists(v) and not os.path.isdir(v):
            raise ValueError(f"exists and is not a directory: {v}")
        return v

    def training_seed(self, stage: str) -> int:
        """The seed a training stage ("teacher" or "student") trains with: its own, else the job's."""
        own = getattr(self, stage).seed
        return self.seed if own is None else own

    def flat_params(self) -> dict[str, str]:
        """The whole spec as {"teacher.lr": "0.0005", ...} (MLflow params are strings)."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value if isinstance(value, str) else json.dumps(value)

        walk("", self.model_dump(mode="json"))
        return out
