"""The per-worker training loop run by Ray Train for the teacher (AT) and the student (NAT).

Data parallel with a fixed *global* batch: every worker builds the same shuffled list of
token-bucketed batches and takes its slice of each (sentences rank, rank+W, …). Each worker's
loss is rescaled by (its tokens × W / the global batch's tokens), so after the gradient
averaging of DDP or DeepSpeed the update is that of one worker on the whole batch.

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

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from imitate_nat import ATDemonstrator, LossConfig, ModelConfig, NATLearner
from imitate_nat.checkpoint import load_model, save_model
from imitate_nat.data import make_batch, read_lines, token_batches
from imitate_nat.losses import at_loss, nat_loss, unwrap
from imitate_nat.metrics import bleu
from imitate_nat.optim import lr_at, make_optimizer, set_lr
from imitate_nat.tokenizer import Tokenizer
from imitate_nat.translate import at_beam, nat_one_pass, translate

from ..run.layout import MODEL
from .train_checkpoints import restore_intact, restore_rng, save_rng, write_checksums

STATE = "trainer_state.pt"   # DDP: model + optimizer + step (loaded with weights_only=True)
DS_TAG = "ds"                # DeepSpeed checkpoint tag inside a Ray checkpoint
log = logging.getLogger("imitate_orch")


def load_pairs(src_path, tgt_path, tok: Tokenizer, max_len: int):
    src, tgt = tok.encode_batch(read_lines(src_path)), tok.encode_batch(read_lines(tgt_path))
    keep = [i for i in range(len(src)) if 0 < len(src[i]) < max_len and 0 < len(tgt[i]) < max_len]
    return [src[i] for i in keep], [tgt[i] for i in keep]


def global_batches(src, tgt, batch_tokens: int, epoch: int, seed: int):
    lengths = [max(len(s), len(t)) + 1 for s, t in zip(src, tgt)]
    return token_batches(lengths, batch_tokens, shuffle=True, seed=seed * 1000 + epoch)


def batch_stream(src, tgt, batch_tokens, seed, start_step, rank, world):
    """Yields (step, local Batch or None, local tokens, global tokens) forever, from start_step+1."""
    step, epoch = 0, 0
    while True:
        for idx in global_batches(src, tgt, batch_tokens, epoch, seed):
            step += 1
            if step <= start_step:
                continue  # resuming: skip what was already trained on, keep the same order
            mine = idx[rank::world]
            global_tokens = sum(len(tgt[i]) + 1 for i in idx)
            local = make_batch([src[i] for i in mine], [tgt[i] for i in mine]) if mine else None
            yield step, local, sum(len(tgt[i]) + 1 for i in mine), global_tokens
        epoch += 1


def deepspeed_config(t: dict) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "gradient_clipping": t["clip_norm"], "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
           "zero_optimization": {"stage": t["zero_stage"]}, "zero_allow_untested_optimizer": True}
    if t["precision"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif t["precision"] == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return cfg


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


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t, kind = config["train"], config["kind"]
    torch.manual_seed(config["seed"] + rank)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    tok = Tokenizer(config["spm"])
    cfg = ModelConfig.from_dict(config["model_cfg"])
    losses = LossConfig(**config["loss_cfg"])
    src, tgt = load_pairs(config["train_src"], config["train_tgt"], tok, cfg.max_positions)
    n_valid = config["valid_sentences"]
    valid_src, valid_ref = read_lines(config["valid_src"])[:n_valid], read_lines(config["valid_tgt"])[:n_valid]

    teacher = None
    if kind == "at":
        model = ATDemonstrator(cfg)
    else:
        model = NATLearner(cfg)
        teacher, _ = load_model(config["teacher"], device)
        teacher.requires_grad_(False)
        if config["init_from_teacher"]:
            model.init_from_at(teacher.cpu())
            teacher.to(device)
        if cfg.copy == "uniform":
            model.log_tau.requires_grad_(False)  # unused by UniformCopy; DDP insists every trainable param is used
        if not losses.imitation:
            teacher = None
    optimizer = make_optimizer(model.parameters(), t["lr"], t["weight_decay"])

    use_ds = t["strategy"] == "deepspeed"
    # ddp + bf16: autocast the forward (and loss); weights, gradients and Adam stay fp32.
    autocast_bf16 = not use_ds and t["precision"] == "bf16"
    if use_ds:
        import deepspeed
        model, optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                      config=deepspeed_config(t), dist_init_required=False)
    else:
        model = ray.train.torch.prepare_model(model)

    def load(d: Path) -> tuple[int, float, int]:
        meta = json.loads((d / "progress.json").read_text())
        if use_ds:
            model.load_checkpoint(str(d), tag=DS_TAG)
        else:
            state = torch.load(d / STATE, map_location=device, weights_only=True)
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        restore_rng(d, rank, device)
        return meta["step"], meta["best"], meta.get("bad_evals", 0)

    start_step, best, bad_evals = 0, float("-inf"), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        start_step, best, bad_evals = restore_intact(checkpoint, load)

    if start_step >= t["max_steps"] or (t.get("patience") is not None and bad_evals >= t["patience"]):
        # The restored checkpoint is the final one (driver killed after training), or early
        # stopping had ended this run: a raised max_steps would not have trained on either.
        return

    run_handle = config["tracker"].handle(config["run_id"]) if config.get("tracker") else None
    if run_handle:  # where this rank runs: node id and pid (observability, fault tests)
        run_handle.set_tag(f"worker.{rank}", json.dumps({"node": ray.get_runtime_context().get_node_id(),
                                                          "pid": os.getpid()}))
    tracker = run_handle if rank == 0 else None
    name = "teacher" if kind == "at" else "student"
    bar = tqdm(total=t["max_steps"], desc=name, position=0) if rank == 0 and config.get("progress") else None
    if bar:
        bar.update(start_step)
    loss_fn = (lambda m, b: at_loss(m, b, losses)) if kind == "at" else (lambda m, b: nat_loss(m, b, losses, teacher))
    stop = False
    model.train()
    for step, batch, local_tokens, global_tokens in batch_stream(src, tgt, t["batch_tokens"], config["seed"],
                                                                 start_step, rank, world):
        lr = lr_at(step, t["lr"], t["warmup_steps"])
        set_lr(optimizer, lr)
        if batch is None:  # fewer sentences than workers in this global batch: contribute zero
            batch, weight = make_batch(src[:1], tgt[:1]), 0.0
        else:
            weight = local_tokens * world / global_tokens
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss, stats = loss_fn(model, batch.to(device))
        scaled = loss * weight
        if use_ds:
            model.backward(scaled)
            model.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_norm"])
            optimizer.step()

        if step % t["log_every"] == 0 or step == t["max_steps"]:
            g = torch.tensor([float(scaled.detach()), stats["nll"] * weight], device=device)
            if world > 1:
                dist.all_reduce(g)
            g = (g / world).tolist()
            if tracker:
                tracker.log_metrics({"train/loss": g[0], "train/nll": g[1], "train/lr": lr,
                                     **{f"train/{k}": v for k, v in stats.items() if k not in ("loss", "nll")}}, step=step)
            if bar:
                bar.set_description(f"{name} loss {g[0]:.3f}")
        if bar:
            bar.update(1)

        last = step >= t["max_steps"]
        if step % t["checkpoint_every"] == 0 or step % t["eval_every"] == 0 or last:
            flag = torch.zeros(2, device=device)  # [valid score, stop]
            # ZeRO-3 partitions the weights: every rank must take part in each forward pass.
            if rank == 0 or (use_ds and t["zero_stage"] == 3):
                score = valid_bleu(model, kind, tok, valid_src, valid_ref, device)
                bad_evals = 0 if score > best else bad_evals + 1
                flag[1] = float(t.get("patience") is not None and bad_evals >= t["patience"])
                if tracker:
                    tracker.log_metrics({"valid/bleu": score}, step=step)
                flag[0] = score
            if world > 1:
                dist.broadcast(flag, src=0)
            score, stop = float(flag[0]), bool(flag[1])
            best = max(best, score)
            report_checkpoint(model, optimizer, use_ds, t, rank, device,
                              {"step": step, "best": best, "bad_evals": bad_evals}, score, kind)
        if last or stop:
            break
    if bar:
        bar.close()


def report_checkpoint(model, optimizer, use_ds, t, rank, device, counters: dict, score, kind) -> None:
    """Every rank reports (a barrier) and writes its RNG state; rank 0 writes the model file and
    progress, and under DeepSpeed every rank writes its partition. Ray merges the directories
    into one checkpoint."""
    import ray.train

    step = counters["step"]
    state = full_state_dict(model, t["zero_stage"]) if use_ds else None
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
        write_checksums(Path(d), rank)
        ray.train.report({"step": step, "valid_bleu": score}, checkpoint=ray.train.Checkpoint.from_directory(d))
