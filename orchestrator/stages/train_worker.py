"""The per-worker training loop run by Ray Train for the teacher (AT) and the student (NAT).

Data: the tokenizer stage's (or, for distilled targets, the distill stage's) binarized corpus,
memory-mapped (imitate_nat/indexed.py), and its batch plan, written once by the stage
(train.py) and memory-mapped too: a worker holds 16 bytes per batch, reads only its own
batches' pages, and nothing is tokenized or planned again on a (re)start. Batches hold up to
`batch_tokens` tokens *per worker* (fairseq's --max-tokens); a step takes `update_freq` of
them on every worker (gradient accumulation) and each micro-batch's loss is weighted by its
share of the step's target tokens, so after the gradient averaging of DDP or DeepSpeed the
update is that of one worker on every token of the step.

Strategies: `ddp` (torch DDP via ray.train.torch.prepare_model; fp32, or bf16 by torch
autocast) or `deepspeed` (ZeRO 0-3, fp32/bf16/fp16, on Ray's process group). Checkpoints go to Ray Train every
`checkpoint_every` steps (and at the end) with the valid score; Ray restores the latest on a
worker failure or when the same run is started again.

A checkpoint holds everything the next step depends on: weights, optimizer, step, best score,
the early-stopping count and every rank's torch RNG state (dropout). So training on from a
checkpoint, after a failure or with a raised max_steps, takes the same steps as a run that was
never stopped (the data order and the learning rate are functions of the step).

Checkpoints are verified before they are loaded (train_checkpoints.py). Each rank records its Ray node and pid as an
MLflow tag `worker.<rank>` of the stage's run (where the workers ran, which pid to look at).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from imitate_nat import ATDemonstrator, LossConfig, ModelConfig, NATLearner
from imitate_nat.checkpoint import load_model, save_model
from imitate_nat.cpu import has_native_bf16
from imitate_nat.data import read_lines
from imitate_nat.indexed import BatchPlan, IndexedDataset, collate, shuffled
from imitate_nat.losses import at_loss, nat_loss, unwrap
from imitate_nat.metrics import bleu
from imitate_nat.optim import lr_at, make_optimizer, set_lr
from imitate_nat.tokenizer import Tokenizer
from imitate_nat.translate import at_beam, nat_one_pass, translate

from ..run.layout import MODEL
from ..run.tracking import Tracker
from ..spec.schema import TrainSpec
from .train_checkpoints import BEST_MODEL, restore_intact, restore_rng, save_rng, write_checksums

STATE = "trainer_state.pt"   # DDP: model + optimizer + step (loaded with weights_only=True)
DS_TAG = "ds"                # DeepSpeed checkpoint tag inside a Ray checkpoint
log = logging.getLogger("imitate_orch")


class TrainData:
    """A worker's view of the binarized training pairs and their batch plan (written once by
    the stage: imitate_nat.indexed.write_batch_plan). The token ids and the plan's pair
    indices stay on disk, memory-mapped; a worker reads the pages of its own batches, and a
    batch's tensors are made when it is trained on."""

    def __init__(self, src_prefix: str, tgt_prefix: str, plan_prefix: str):
        self.src, self.tgt = IndexedDataset(src_prefix), IndexedDataset(tgt_prefix)
        self.plan = BatchPlan(plan_prefix)

    def __len__(self) -> int:
        return self.plan.num_pairs

    def tokens(self, batch: int) -> int:
        """Target tokens (+ EOS) of plan batch `batch`: the tokens it is scored on."""
        return int(self.plan.tokens[batch])

    def collate(self, batch: int):
        return collate(self.src, self.tgt, self.plan[batch])


def batch_stream(data: TrainData, seed: int, start_step: int, rank: int, world: int, update_freq: int = 1):
    """Yields (step, this worker's micro-batches, their target tokens, the step's target tokens on
    all workers) for ever, from step start_step + 1.

    The plan's batches (cut once, in length order) are shuffled per epoch (seed × 1000 + epoch):
    a function of the step alone, so a resumed run takes the same batches. A step takes world ×
    update_freq batches in plan order and worker r the r-th of every world (fairseq's
    --max-tokens per GPU and --update-freq); the last batches of an epoch that cannot fill a
    step wait for the next epoch's order (none with one worker and update_freq 1, where this
    is the whole plan)."""
    n_batches, per_step = len(data.plan), world * update_freq
    steps_per_epoch = n_batches // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data)} training pairs make {n_batches} batches of {data.plan.meta['max_tokens']} "
                         f"tokens: fewer than one step needs ({world} workers × update_freq {update_freq}); "
                         "lower batch_tokens")
    step, epoch = start_step, start_step // steps_per_epoch
    first = start_step - epoch * steps_per_epoch   # resuming mid-epoch: the steps already taken are skipped
    while True:
        plan = shuffled(range(n_batches), seed * 1000 + epoch)
        for s in range(first, steps_per_epoch):
            step += 1
            group = plan[s * per_step:(s + 1) * per_step]
            mine = group[rank::world]
            yield step, [data.collate(b) for b in mine], [data.tokens(b) for b in mine], sum(map(data.tokens, group))
        epoch, first = epoch + 1, 0


def worker_precision(precision: str, device: torch.device) -> str:
    """The precision a worker trains in: `auto` resolved for its device (bf16 where bf16 products
    are native: a CUDA GPU that supports them, a CPU with AVX512-BF16 or AMX; else fp32), any
    other setting as given, with a warning where bf16 is emulated (an AVX2-only CPU: a step
    ~30x slower than fp32, BENCHMARKS.md)."""
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else has_native_bf16()
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        log.warning("precision bf16 on a %s without native bf16 products (%s): torch emulates them and a training "
                    "step runs many times slower than in fp32; set precision: auto or fp32", device.type,
                    "no AVX512-BF16 or AMX" if device.type == "cpu" else "no bf16 support")
    return precision


def deepspeed_config(t: TrainSpec, precision: str) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": t.update_freq,
           "gradient_clipping": t.clip_norm, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
           "zero_optimization": {"stage": t.zero_stage}, "zero_allow_untested_optimizer": True}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return cfg


def valid_set(c: "WorkerConfig") -> tuple[list[str], list[str]]:
    """The valid sentences scored during training: (sources, references)."""
    return read_lines(c.valid_src)[:c.valid_sentences], read_lines(c.valid_tgt)[:c.valid_sentences]


def valid_bleu(model, kind, tok, src_lines, ref_lines, device) -> float:
    core = unwrap(model)
    was_training = core.training
    core.eval()
    decoder = at_beam(core, beam_size=1) if kind == "at" else nat_one_pass(core)
    hyps = translate(src_lines, tok, decoder, batch_tokens=4096, device=device, max_src_len=core.cfg.max_positions)
    core.train(was_training)
    return bleu(hyps, ref_lines).score


def full_state_dict(model, zero_stage: int) -> dict:
    """The whole model's weights on every rank (ZeRO-3 partitions them: gather first)."""
    core = unwrap(model)
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(core.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
    return core.state_dict()


@dataclass(frozen=True)
class WorkerConfig:
    """What each Ray Train worker of a teacher or student stage needs (built by train.py)."""
    kind: str                   # "at" (the teacher) or "nat" (the student)
    seed: int
    train: TrainSpec            # the job's teacher or student section
    model: ModelConfig
    losses: LossConfig
    spm: str
    train_src: str
    train_tgt: str
    train_plan: str             # the batch plan's prefix (imitate_nat.indexed.write_batch_plan)
    valid_src: str
    valid_tgt: str
    valid_sentences: int | None  # valid BLEU during training on at most this many sentences (None: all)
    teacher: str                # the demonstrator's model file (read by students only)
    init_from_teacher: bool
    threads: int
    progress: bool
    tracker: Tracker | None     # the job's experiment: rank 0 logs into the stage's run through it
    run_id: str | None


@dataclass
class Trainee:
    """One worker's model (wrapped by DDP or DeepSpeed), optimizer, and the frozen teacher a
    student imitates (None for the teacher stage, or a student trained without L_IL)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    teacher: torch.nn.Module | None
    use_ds: bool
    precision: str              # what this worker trains in (worker_precision: auto resolved)
    autocast_bf16: bool


def setup(c: WorkerConfig, device) -> Trainee:
    """Build the model (a student starts from the teacher), its optimizer and the wrapper."""
    import ray.train.torch

    t, teacher = c.train, None
    if c.kind == "at":
        model = ATDemonstrator(c.model)
    else:
        model = NATLearner(c.model)
        teacher, _ = load_model(c.teacher, device)
        teacher.requires_grad_(False)
        if c.init_from_teacher:
            model.init_from_at(teacher.cpu())
            teacher.to(device)
        if c.model.copy != "soft":
            model.log_tau.requires_grad_(False)  # unused by UniformCopy; DDP insists every trainable param is used
        if not c.losses.imitation:
            teacher = None
    optimizer = make_optimizer(model.parameters(), t.lr, t.weight_decay)
    use_ds, precision = t.strategy == "deepspeed", worker_precision(t.precision, device)
    if use_ds:
        import deepspeed
        if device.type == "cpu":
            # DeepSpeed JIT-compiles its shared-memory all-reduce (~1 min of gcc per machine and
            # venv) on a CPU; only its inference all-reduce uses it, training's collectives are
            # gloo's. DeepSpeed keeps this dict for such edits (deepspeed/ops/__init__.py).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        model, optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                      config=deepspeed_config(t, precision), dist_init_required=False)
    else:
        model = ray.train.torch.prepare_model(model, move_to_device=device)
    # ddp + bf16: autocast the forward (and loss); weights, gradients and Adam stay fp32.
    return Trainee(model, optimizer, teacher, use_ds, precision, autocast_bf16=not use_ds and precision == "bf16")


def train_step(tr: Trainee, c: WorkerConfig, micro: list, weights: list[float], lr: float, device):
    """One update from this worker's micro-batches (update_freq of them), micro-batch k's mean
    token loss scaled by weights[k] = its target tokens × world / the step's target tokens on all
    workers: after DDP's (or DeepSpeed's) average over workers, the update is that of one worker
    on every token of the step. Gradients are exchanged once, after the last micro-batch.
    Returns (summed scaled loss, summed weighted nll, the last micro-batch's loss terms)."""
    set_lr(tr.optimizer, lr)
    if not tr.use_ds:
        tr.optimizer.zero_grad(set_to_none=True)
    loss_sum, nll_sum, stats = torch.zeros((), device=device), 0.0, {}
    for k, (batch, weight) in enumerate(zip(micro, weights)):
        last = k == len(micro) - 1
        no_sync = getattr(tr.model, "no_sync", None)   # DDP; a single worker's model has none
        with (no_sync() if no_sync and not last and not tr.use_ds else contextlib.nullcontext()):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.autocast_bf16):
                if c.kind == "at":
                    loss, stats = at_loss(tr.model, batch.to(device), c.losses)
                else:
                    loss, stats = nat_loss(tr.model, batch.to(device), c.losses, tr.teacher)
            scaled = loss * weight
            if tr.use_ds:   # DeepSpeed accumulates over gradient_accumulation_steps = update_freq
                tr.model.backward(scaled, scale_wrt_gas=False)
                tr.model.step()
            else:
                scaled.backward()
        loss_sum, nll_sum = loss_sum + scaled.detach().float(), nll_sum + stats["nll"] * weight
    if not tr.use_ds:
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), c.train.clip_norm)
        tr.optimizer.step()
    return loss_sum, nll_sum, stats


def validate(tr: Trainee, c: WorkerConfig, tok, valid, rank: int, world: int, device, best: float,
             bad_evals: int) -> tuple[float, bool, int]:
    """Valid BLEU (decoded on rank 0, or on every rank under ZeRO-3, whose weights are
    partitioned), broadcast with the early-stopping decision: (score, stop, bad_evals)."""
    flag = torch.zeros(2, device=device)  # [valid score, stop]
    if rank == 0 or (tr.use_ds and c.train.zero_stage == 3):
        score = valid_bleu(tr.model, c.kind, tok, *valid, device)
        bad_evals = 0 if score > best else bad_evals + 1
        flag[0], flag[1] = score, float(c.train.patience is not None and bad_evals >= c.train.patience)
    if world > 1:
        dist.broadcast(flag, src=0)
    return float(flag[0]), bool(flag[1]), bad_evals


def train_loop(config: dict) -> None:
    """The Ray Train worker function; config = {"worker": WorkerConfig}."""
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    c: WorkerConfig = config["worker"]
    t = c.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(c.seed + rank)
    if c.threads:
        torch.set_num_threads(c.threads)
    # A GPU Ray assigned but CUDA cannot see (a node that only advertises GPUs): train on the CPU.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    tok = Tokenizer(c.spm)
    data = TrainData(c.train_src, c.train_tgt, c.train_plan)
    valid = valid_set(c)
    tr = setup(c, device)

    def load(d: Path) -> tuple[int, float, int, bytes | None]:
        meta = json.loads((d / "progress.json").read_text())
        best_model = (d / BEST_MODEL).read_bytes() if rank == 0 and (d / BEST_MODEL).is_file() else None
        if tr.use_ds:
            tr.model.load_checkpoint(str(d), tag=DS_TAG)
        else:
            state = torch.load(d / STATE, map_location=device, weights_only=True)
            unwrap(tr.model).load_state_dict(state["model"])
            tr.optimizer.load_state_dict(state["optimizer"])
        restore_rng(d, rank, device)
        return meta["step"], meta["best"], meta.get("bad_evals", 0), best_model

    # best_model: averaging runs, rank 0: the model file of the best checkpoint so far
    start_step, best, bad_evals, best_model = 0, float("-inf"), 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        start_step, best, bad_evals, best_model = restore_intact(checkpoint, load, world)
    if start_step >= t.max_steps or (t.patience is not None and bad_evals >= t.patience):
        # The restored checkpoint is the final one (driver killed after training), or early
        # stopping had ended this run: a raised max_steps would not have trained on either.
        return

    run_handle = c.tracker.handle(c.run_id) if c.tracker else None
    if run_handle:  # where this rank runs: node id and pid (observability, fault tests)
        run_handle.set_tag(f"worker.{rank}", json.dumps({"node": ray.get_runtime_context().get_node_id(),
                                                          "pid": os.getpid(), "precision": tr.precision}))
    tracker = run_handle if rank == 0 else None
    name = "teacher" if c.kind == "at" else "student"
    bar = tqdm(total=t.max_steps, desc=name, position=0) if rank == 0 and c.progress else None
    if bar:
        bar.update(start_step)
    tr.model.train()
    # Throughput between log points, validation and checkpoints left out: train/tokens_per_s
    # (target tokens of all workers) and train/steps_per_s (updates).
    clock, paused, tokens_since, steps_since = time.perf_counter(), 0.0, 0, 0
    for step, micro, tokens, step_tokens in batch_stream(data, c.seed, start_step, rank, world,
                                                         t.update_freq):
        lr = lr_at(step, t.lr, t.warmup_steps)
        loss, nll, stats = train_step(tr, c, micro, [n * world / step_tokens for n in tokens], lr, device)
        tokens_since, steps_since = tokens_since + step_tokens, steps_since + 1

        if step % t.log_every == 0 or step == t.max_steps:
            g = torch.stack([loss, torch.tensor(float(nll), device=device)])
            if world > 1:
                dist.all_reduce(g)
            g = (g / world).tolist()
            now = time.perf_counter()
            seconds = max(now - clock - paused, 1e-9)
            speed = {"train/tokens_per_s": tokens_since / seconds, "train/steps_per_s": steps_since / seconds}
            clock, paused, tokens_since, steps_since = now, 0.0, 0, 0
            if tracker:
                tracker.log_metrics({"train/loss": g[0], "train/nll": g[1], "train/lr": lr, "train/tokens": step_tokens,
                                     **speed, **{f"train/{k}": v for k, v in stats.items() if k not in ("loss", "nll")}},
                                    step=step)
            if bar:
                bar.set_description(f"{name} loss {g[0]:.3f}")
        if bar:
            bar.update(1)

        last, stop = step >= t.max_steps, False
        if step % t.checkpoint_every == 0 or step % t.eval_every == 0 or last:
            pause_start = time.perf_counter()
            score, stop, bad_evals = validate(tr, c, tok, valid, rank, world, device, best, bad_evals)
            if tracker:
                tracker.log_metrics({"valid/bleu": score}, step=step)
            best_model = None if score > best else best_model   # None: this checkpoint is the best
            best = max(best, score)
            best_model = report_checkpoint(tr, t, rank, device, {"step": step, "best": best, "bad_evals": bad_evals},
                                           score, c.kind, best_model)
            paused += time.perf_counter() - pause_start
        if last or stop:
            break
    if bar:
        bar.close()


def report_checkpoint(tr: Trainee, t: TrainSpec, rank: int, device, counters: dict, score: float, kind: str,
                      best_model: bytes | None) -> bytes | None:
    """Every rank reports (a barrier) and writes its RNG state; rank 0 writes the model file and
    progress, and under DeepSpeed every rank writes its partition. Ray merges the directories
    into one checkpoint. Averaging runs keep their last checkpoints, not their best, so rank 0
    also writes the best model file so far (`best_model`, or this checkpoint's own when None)
    as BEST_MODEL and returns it for the next checkpoint."""
    import ray.train

    model, optimizer, use_ds, step = tr.model, tr.optimizer, tr.use_ds, counters["step"]
    state = full_state_dict(model, t.zero_stage) if use_ds else None
    with tempfile.TemporaryDirectory() as d:
        save_rng(Path(d), rank, device)
        if use_ds:
            model.save_checkpoint(d, tag=DS_TAG)
        if rank == 0:
            core = unwrap(model)
            if state is not None:
                model_file_source = type(core)(core.cfg)
                model_file_source.load_state_dict({k: v.float() for k, v in state.items()})
            else:
                model_file_source = core
                torch.save({"model": core.state_dict(), "optimizer": optimizer.state_dict()}, os.path.join(d, STATE))
            save_model(model_file_source, os.path.join(d, MODEL), meta={"step": step, "valid_bleu": score, "kind": kind})
            Path(d, "progress.json").write_text(json.dumps(counters))
            if t.average_last:
                best_model = best_model or Path(d, MODEL).read_bytes()
                Path(d, BEST_MODEL).write_bytes(best_model)
        write_checksums(Path(d), rank)
        ray.train.report({"step": step, "valid_bleu": score}, checkpoint=ray.train.Checkpoint.from_directory(d))
    return best_model
