"""
Training mechanics shared by train_pformer.py, train_stage1.py and train_stage2.py, method-agnostic: config checks,
mixed precision, the lr schedule, the optimizer, checkpoints, the data position, logging and MFU, and the training
loop itself (`train`, at the end). The scripts read as recipes; distributed.py has the process group.

What a long run can count on: a nan or inf loss stops the run, naming the step and its batch's files, before it can
replace the last good checkpoint; checkpoints are written atomically, with a checksum of their tensors, and never
with non-finite weights; a run from scratch never overwrites an earlier run's checkpoint unless asked; one run
writes an out_dir at a time; a data source that cannot fill one batch stops the run at once; SIGTERM or Ctrl-C
ends the run after its step with a checkpoint; a killed run resumes exactly (weights, optimizer, step, data
position, random state) with init_from='resume', and only with the settings it was started with unless asked.
"""
import glob
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

from backbones import DTYPES, FrozenLLM, FrozenViT, load_weights
from checkpoints import read_checkpoint, save_checkpoint
from data import dataset_identity
from distributed import all_reduce_mean, gather_objects, is_master
from metrics import provenance, write_atomic
from model import QFormer

# -----------------------------------------------------------------------------
# config checks, seeding, mixed precision


def check_config(cfg):
    """Fail at start-up, naming the key, on values that would otherwise fail (or loop forever) later."""
    def fail(key, why):
        raise ValueError(f"config key {key!r} = {cfg[key]!r}: {why}")

    for key in ("batch_size", "grad_accum", "max_steps", "lr_decay_steps", "log_interval", "eval_interval",
                "ckpt_interval"):
        if cfg[key] < 1:
            fail(key, "must be at least 1")
    for key in ("warmup_steps", "eval_batches", "grad_clip", "weight_decay", "lr", "min_lr", "warmup_start_lr"):
        if cfg[key] < 0:
            fail(key, "must not be negative")
    if cfg["dtype"] not in DTYPES:
        fail("dtype", f"one of {', '.join(DTYPES)}")
    betas = cfg["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        fail("betas", "two numbers in [0, 1), e.g. (0.9, 0.98)")
    if cfg["init_from"] not in ("scratch", "resume"):
        fail("init_from", "'scratch' or 'resume'")
    if cfg.get("lr_schedule", "step") not in ("step", "epoch"):
        fail("lr_schedule", "'step' or 'epoch'")


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch (all devices) with seed + rank. The scripts build the model after
    seed_everything(seed) on every rank, so that even random frozen weights agree across ranks (DDP does not
    broadcast frozen weights); `train` then reseeds with the rank, so that dropout differs between ranks."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def autocast_context(device, dtype_name):
    """torch.autocast for CUDA in bfloat16/float16; a no-op context on CPU or in float32."""
    dtype = DTYPES[dtype_name]
    if not device.startswith("cuda") or dtype == torch.float32:
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def make_grad_scaler(device, dtype_name):
    """A GradScaler that is live only for float16 on CUDA (bfloat16 has float32's range and needs none);
    disabled, its scale/step/update calls pass straight through, so the training loop is the same either way."""
    assert dtype_name in DTYPES, dtype_name
    return torch.amp.GradScaler("cuda", enabled=device.startswith("cuda") and dtype_name == "float16")

# -----------------------------------------------------------------------------
# optimization


def cosine_lr(step, *, warmup_steps, max_steps, lr, min_lr, warmup_start_lr):
    """Learning rate at step: linear warmup warmup_start_lr -> lr over warmup_steps, cosine lr -> min_lr until
    max_steps, min_lr after."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def epoch_cosine_lr(step, epoch, *, warmup_steps, epochs, lr, min_lr, warmup_start_lr):
    """LAVIS's LinearWarmupCosineLRScheduler, which the official video runs use: in epoch 0 a linear warmup over
    warmup_steps, then lr until the epoch ends; from epoch 1 on one value per epoch, the cosine at epoch / epochs
    (so the last epoch of 10 trains at about 1.22e-5 with lr 1e-4, min_lr 1e-5, never at min_lr)."""
    if epoch == 0:
        return min(lr, warmup_start_lr + (lr - warmup_start_lr) * step / max(warmup_steps, 1))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs))


def learning_rate(step, cfg, batches_per_epoch=None):
    """The learning rate of optimizer step `step`: cosine_lr (lr_schedule 'step'), or epoch_cosine_lr ('epoch')
    over lr_decay_steps / (steps per epoch) epochs."""
    common = dict(warmup_steps=cfg["warmup_steps"], lr=cfg["lr"], min_lr=cfg["min_lr"],
                  warmup_start_lr=cfg["warmup_start_lr"])
    if cfg.get("lr_schedule", "step") == "step":
        return cosine_lr(step, max_steps=cfg["lr_decay_steps"], **common)
    epochs = max(1, round(cfg["lr_decay_steps"] * cfg["grad_accum"] / batches_per_epoch))
    return epoch_cosine_lr(step, step * cfg["grad_accum"] // batches_per_epoch, epochs=epochs, **common)


def batches_per_epoch(loader, cfg):
    """Batches per epoch and rank, for lr_schedule 'epoch' (None otherwise); tar shards have no known length."""
    if cfg.get("lr_schedule", "step") == "step":
        return None
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError("lr_schedule='epoch' needs an epoch of known length: annotation files, not tar shards")
    return len(loader)


def make_optimizer(model, *, lr, weight_decay, betas, device):
    """AdamW over the trainable parameters: weight decay on matrices and embeddings (ndim >= 2), none on
    biases, LayerNorm weights and other 1-D parameters such as the ITC temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith("bias") else no_decay).append(p)
    if is_master():
        print(f"optimizer: {len(decay)} decayed tensors ({sum(p.numel() for p in decay):,} parameters), "
              f"{len(no_decay)} non-decayed tensors ({sum(p.numel() for p in no_decay):,} parameters)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel is one launch per step instead of several per tensor; CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.startswith("cuda"))

# -----------------------------------------------------------------------------
# checkpoints of a run (the files themselves: checkpoints.py)


def unwrap_model(model):
    """The plain module inside a DDP wrapper."""
    return model.module if isinstance(model, DDP) else model


def trainable_state_dict(model):
    """{name: tensor} of the parameters that train; frozen ViT / LLM / P-Former weights are not saved again."""
    return {n: p.detach() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


@contextmanager
def out_dir_lock(out_dir, master):
    """One run writes an out_dir at a time: the master holds out_dir/run.lock ({"pid", "host", "since"}) while the
    run lasts. Another live run's lock stops this one at start-up, naming it; the lock of a process that is gone
    (same host) is stale and taken over with a warning. A lock of another host cannot be checked from here."""
    if not master:
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    path, host = os.path.join(out_dir, "run.lock"), socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            with open(path, "x") as f:  # "x": created only if absent, atomically
                json.dump(me, f)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):  # unreadable or half written: its writer died
                owner = {}
            if attempt == 0 and (not owner or owner.get("host") == host and not _process_alive(owner.get("pid"))):
                warnings.warn(f"{path}: taking over the stale lock of a run that is gone ({owner or 'unreadable'})")
                os.remove(path)
                continue
            raise RuntimeError(f"{out_dir} is in use by the run of pid {owner.get('pid')} on {owner.get('host')} "
                               f"(since {owner.get('since')}): one run writes an out_dir at a time; if that run is "
                               f"over, delete {path}") from None
    try:
        yield
    finally:
        if os.path.isfile(path):
            os.remove(path)


def _process_alive(pid):
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def prepare_out_dir(cfg):
    """out_dir/ckpt.pt, after two start-up checks: a run from scratch never replaces an earlier run's checkpoint
    (unless cfg['overwrite']), and the temp files of a checkpoint write that was killed are removed."""
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if cfg["init_from"] == "scratch" and os.path.isfile(ckpt_path) and not cfg["overwrite"]:
        raise FileExistsError(f"{ckpt_path} holds an earlier run: continue it with --init_from=resume, choose "
                              f"another --out_dir, or start over in this one with --overwrite=True")
    if is_master():
        for tmp in glob.glob(ckpt_path + ".*.tmp"):
            os.remove(tmp)
    return ckpt_path


@dataclass
class Position:
    """Where the run is: optimizer steps taken, and the data position (epoch, batches of it consumed by each rank)."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: int = 0  # unreadable samples passed over since the last log line
    files: list = field(default_factory=list)  # the files of the current step's batches (to name a bad one)

    def advance(self, epoch, batch):
        if epoch != self.epoch:
            self.epoch, self.batch_in_epoch = epoch, 0
        self.batch_in_epoch += 1
        self.skipped += batch.get("skipped", 0)
        self.files += batch.get("file", [])


def save(path, model, optimizer, scaler, position, generators, cfg, dist_info, stage, data):
    """Every rank's torch RNG state goes in, so that a resumed run draws the same dropout; `data`, the training
    set's identity (data.dataset_identity), so that a resumed run can tell whether it reads the same data; and
    what wrote it (metrics.provenance: commit, versions, threads, device)."""
    rng = {"cpu": torch.get_rng_state()}
    if dist_info.device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state(dist_info.device)
    rngs = [rng]
    if dist_info.ddp:
        rngs = [None] * dist_info.world_size
        dist.all_gather_object(rngs, rng)
    if dist_info.master:
        save_checkpoint(path, dict(
            stage=stage, model=trainable_state_dict(model), optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(), step=position.step, epoch=position.epoch,
            batch_in_epoch=position.batch_in_epoch, world_size=dist_info.world_size, config=cfg, rng=rngs,
            generators={name: g.get_state() for name, g in generators.items()}, data=data,
            provenance=provenance(dist_info.device)))


# settings a resumed run may change without changing what it computes (batch size and workers: see restore)
RESUMABLE_CHANGES = {"init_from", "overwrite", "resume_changes", "out_dir", "max_steps", "log_interval",
                     "eval_interval", "eval_batches", "ckpt_interval", "wandb_log", "wandb_project", "wandb_run_name",
                     "val_ann", "val_image_roots", "val_text", "strict_images", "num_workers", "batch_size", "device",
                     "compile"}


def check_resume(state, cfg, data, path):
    """Refuse to resume a run with other settings than the checkpoint's (the seed, the data and its contents, the
    lr schedule, augmentation, dropout, model sizes: every key but RESUMABLE_CHANGES), listing the differences in
    one line, unless cfg['resume_changes'] says they are meant."""
    old = state.get("config", {})
    changed = [f"{k} {old[k]!r} -> {cfg[k]!r}" for k in sorted(set(old) & set(cfg))  # keys of both versions
               if k not in RESUMABLE_CHANGES and old[k] != cfg[k]]
    if state.get("data") not in (None, data):
        changed.append("the training data's files or captions changed")
    if changed and not cfg.get("resume_changes"):
        raise ValueError(f"{path} was written with other settings: {'; '.join(changed)}. Resume with them anyway with "
                         f"--resume_changes=True, or start over with --overwrite=True")
    if changed and is_master():
        print(f"resuming with changed settings (resume_changes=True): {'; '.join(changed)}")


def restore(path, model, optimizer, scaler, generators, cfg, dist_info, stage, data):
    """Load a checkpoint of this run and return its Position, after check_resume. The same batch size and world
    size resume exactly. Otherwise an annotation-file run continues its epoch after the same number of samples
    (rounded down to a multiple of the new global batch) with the random state of rank (rank % old world size); a
    tar-shard run, whose shards were dealt to the old ranks and workers, cannot and stops."""
    state = read_checkpoint(path, expect_stage=stage)
    check_resume(state, cfg, data, path)
    load_weights(model, state["model"], path, trainable_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][dist_info.rank % len(state["rng"])]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and dist_info.device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], dist_info.device)
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    position = Position(state["step"], state["epoch"], state["batch_in_epoch"])
    old = (state["config"]["batch_size"], state.get("world_size", 1), state["config"]["num_workers"])
    new = (cfg["batch_size"], dist_info.world_size, cfg["num_workers"])
    if old != new:
        if cfg.get("train_shards"):
            raise ValueError(f"{path} was written with batch_size, world size, num_workers = {old}, this run has "
                             f"{new}: a tar-shard run resumes only with the same (the shards are dealt to them)")
        samples = position.batch_in_epoch * old[0] * old[1]
        position.batch_in_epoch = samples // (new[0] * new[1])
        if dist_info.master:
            print(f"resuming with batch_size, world size = {new[:2]} instead of {old[:2]}: epoch {position.epoch} "
                  f"continues after {position.batch_in_epoch * new[0] * new[1]} of its samples ({samples} were seen)")
    if dist_info.master:
        print(f"resuming from {path} at step {position.step} (epoch {position.epoch}, batch {position.batch_in_epoch})")
    return position

# -----------------------------------------------------------------------------
# data


def infinite_batches(loader, start_epoch=0, start_index=0, steps_per_epoch=None):
    """Yield (epoch, batch) forever. Before each epoch, tell the sampler / dataset which epoch it is (so the
    shuffle changes) and, in the first epoch only, where to resume: start_index goes as is to the sampler's
    set_start (samples per rank) or the iterable dataset's skip (samples per rank-and-worker stream).
    steps_per_epoch ends every epoch after that many batches. An epoch from its start that yields no batch at all
    stops the run, naming the data: it would otherwise loop over empty epochs forever."""
    epoch, start = start_epoch, start_index
    while True:
        for obj in (loader.sampler, loader.batch_sampler, loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
            # after set_epoch, which a skip refers to; every epoch, since a start left by an epoch cut short
            # by steps_per_epoch must not carry over
            if hasattr(obj, "set_start"):
                obj.set_start(start)
            if hasattr(obj, "skip"):
                obj.skip(start)
        n = 0
        for n, batch in enumerate(loader, 1):
            yield epoch, batch
            if n == steps_per_epoch:
                break
        if n == 0 and start == 0:
            source = getattr(loader.dataset, "source", type(loader.dataset).__name__)
            raise RuntimeError(f"no batch of {loader.batch_size} samples could be formed from {source} in epoch "
                               f"{epoch}: fewer usable samples per rank than one batch (too small, or unreadable)")
        epoch, start = epoch + 1, 0


def data_start(loader, position, cfg):
    """Samples to pass over at the start of the resumed epoch: per rank for a sampler, per (rank, worker) stream
    for tar shards (whose DataLoader workers deliver batches round-robin)."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return position.batch_in_epoch * cfg["batch_size"] // max(1, loader.num_workers)
    return position.batch_in_epoch * cfg["batch_size"]

# -----------------------------------------------------------------------------
# logging, MFU, and the watch for non-finite values


class Logger:
    """One line per log step on the master: printed, appended as JSON to out_dir/log.jsonl, optionally to wandb."""

    def __init__(self, out_dir, master, wandb_log=False, wandb_project=None, wandb_run_name=None, config=None):
        self.master = master
        self.path = os.path.join(out_dir, "log.jsonl")
        self.wandb = None
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if wandb_log:
                import wandb  # only when asked for: it is not a requirement
                wandb.init(project=wandb_project, name=wandb_run_name, config=config)
                self.wandb = wandb

    def keep_until(self, step):
        """Start the log at `step`: drop the lines of later steps (an interrupted run logged past the checkpoint it
        resumes from) or, at step 0, the whole file of an earlier run, so that log.jsonl holds one run's curve.
        A line that is not JSON (a write cut short by a full disk or a kill) is dropped with a warning."""
        if not self.master or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path} line {lineno} is not JSON (cut short?): dropped")
                    continue
                if step and row.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        write_atomic(self.path, lambda f: f.writelines(kept))

    def log(self, step, metrics):
        """metrics: {name: float, int, None or 0-d tensor}. Tensors are read here (a GPU sync), so call this only
        every log_interval steps. None values (mfu on CPU) are not printed; 'samples_per_sec' and 'mfu' (a fraction)
        get their own formats."""
        if not self.master:
            return
        metrics = {k: v.item() if torch.is_tensor(v) else v for k, v in metrics.items()}
        parts = [f"step {step}"]
        for k, v in metrics.items():
            if v is None:
                continue
            if k == "samples_per_sec":
                parts.append(f"{v:.1f} samples/s")
            elif k == "mfu":
                parts.append(f"mfu {100 * v:.1f}%")
            elif isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
            else:
                parts.append(f"{k} {v}")
        print(" | ".join(parts), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)


# dense bf16/fp16 tensor-core peak FLOP/s of the whole GPU and its SM count, matched in order as substrings of
# torch.cuda.get_device_name; a MIG slice gets the share of the peak that its SMs are
PEAK_FLOPS = [
    ("H100 PCIe", 756e12, 114),
    ("H100 NVL", 835e12, 132),
    ("H100", 989e12, 132),
    ("H200 NVL", 835e12, 132),
    ("H200", 989e12, 132),
    ("A100", 312e12, 108),
    ("L40S", 362e12, 142),
    ("A10G", 125e12, 80),
    ("RTX 4090", 165e12, 128),
    ("V100", 125e12, 80),
]


def peak_flops(device):
    """The dense half-precision peak of the GPU `device` (scaled to its SMs for a MIG slice), or None."""
    if not device.startswith("cuda"):
        return None
    name, sms = torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).multi_processor_count
    for key, peak, full_sms in PEAK_FLOPS:
        if key in name:
            return peak * min(1.0, sms / full_sms)
    return None


def mfu(flops_per_sample, samples_per_sec, device):
    """Model FLOPs utilization of one GPU (samples_per_sec is that GPU's throughput), as a fraction of its peak;
    None on CPU or on a GPU not in PEAK_FLOPS."""
    peak = peak_flops(device)
    return None if peak is None or not flops_per_sample else flops_per_sample * samples_per_sec / peak


@contextmanager
def counting_flops():
    """torch's FLOP counter (matrix products and attention, forward and backward) around one micro-step, run
    eagerly: compiled code would hide its operations from the counter."""
    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        yield counter


class NonFiniteWatch:
    """Watches the loss (and, without a GradScaler, the gradient norm) for nan / inf without a host sync per step:
    a flag on the device keeps the first bad step; check() reads it (at log and checkpoint steps, on all ranks
    together) and stops the run, naming the files of that step's batches (on every rank; written in full to
    out_dir/nonfinite_step<N>.txt). Under fp16 the GradScaler skips steps with inf gradients by design."""

    def __init__(self, device, check_grads):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.check_grads = check_grads
        self.files = {}  # step -> the files of its batches, since the last check

    def record(self, step, loss, grad_norm, files=None):
        bad = ~torch.isfinite(loss.detach())
        if self.check_grads:
            bad = bad | ~torch.isfinite(grad_norm)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        if files:
            self.files[step] = files

    def check(self, ckpt_path):
        flag = torch.where(self.first_bad < 0, torch.iinfo(torch.long).max, self.first_bad)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank stops together, none waits in a collective
        step, recorded, self.files = flag.item(), self.files, {}
        if step == torch.iinfo(torch.long).max:
            return
        kept = f"{ckpt_path} still holds the last good checkpoint" if os.path.isfile(ckpt_path) else \
            "no checkpoint was written"
        files = [f for rank_files in gather_objects(recorded.get(step, [])) for f in rank_files]
        batch = ""
        if files:
            listing = os.path.join(os.path.dirname(ckpt_path), f"nonfinite_step{step + 1}.txt")
            if is_master():
                with open(listing, "w") as f:
                    f.write("\n".join(files) + "\n")
            batch = f" Its batch held {len(files)} files ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''}; " \
                    f"all in {listing}): if one is broken, remove it."
        raise FloatingPointError(f"the loss or gradient norm was not finite (nan or inf) at step {step + 1}: run "
                                 f"stopped; {kept}. Lower the lr, or train in bfloat16 / float32.{batch}")


class StopSignals:
    """SIGTERM (what a cluster scheduler sends before it kills) and SIGINT (Ctrl-C) ask the run to stop: the step in
    progress finishes, the ranks agree on the step to stop after, a checkpoint is written, and the run exits with
    128 + the signal's number. A second signal acts as it would without this (Ctrl-C twice interrupts at once).
    Under DDP the ranks all-reduce a flag at every step and act on the previous step's flag, read without waiting
    for the step in flight on the GPU: no rank stops alone, and no host sync is added."""

    def __init__(self, device):
        self.received, self.previous, self.pending = 0, {}, None
        self.device = device

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where Python allows handlers
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        self._restore()

    def agreed(self):
        """The number of the signal received (by any rank under DDP) once every rank knows of it, else 0."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.full((1,), self.received, dtype=torch.int, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        host = torch.empty(1, dtype=torch.int, pin_memory=self.device.startswith("cuda"))
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event() if self.device.startswith("cuda") else None
        if done is not None:
            done.record()
        previous, self.pending = self.pending, (host, done)
        if previous is None:
            return 0
        if previous[1] is not None:
            previous[1].synchronize()  # the previous step's end, not this one's
        return int(previous[0][0])

# -----------------------------------------------------------------------------
# the training loop, the same for every stage


def compile_blocks(model, **compile_kwargs):
    """torch.compile, in place, the code that does the tensor work: the frozen ViT, each attention regime of the
    Q-Former (and P-Former) as one graph over all its layers (and its read_image), and the frozen LLM. The Python
    around them stays eager: the tokenizers read the captions as strings, and a whole-model torch.compile would
    specialise on their text and recompile for every batch. One graph per regime, not per layer: the layers differ
    (cross-attention every other layer), and per-layer graphs times regimes times train/eval would pass
    torch.compile's recompile limit (8) and fall back to eager. Parameter names do not change, so checkpoints are the same as without compile."""
    for m in model.modules():
        if isinstance(m, FrozenViT):
            m.compile(**compile_kwargs)
        elif isinstance(m, QFormer):
            for name in ("read_image", "encode_queries", "encode_text", "encode_joint", "decode_text"):
                setattr(m, name, torch.compile(getattr(m, name), **compile_kwargs))
        elif isinstance(m, FrozenLLM):
            m.model.compile(**compile_kwargs)
    return model


def prepare_model(model, cfg, dist_info):
    """(the model, the model to call): its blocks compiled in place with cfg['compile'], wrapped in DDP under
    torchrun. DDP neither broadcasts nor watches the frozen weights and the buffers: every rank builds the same
    frozen parts (from the same files, or the same seed), and broadcasting a ViT-g + OPT-2.7b is about 7 GB."""
    if cfg["compile"]:
        compile_blocks(model)  # the blocks only: the captions' Python stays eager (see there)
    if not dist_info.ddp:
        return model, model
    ignore = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return model, DDP(model, device_ids=[dist_info.local_rank] if dist_info.device.startswith("cuda") else None)


def forward_backward(model, loss_fn, batches, position, scaler, cfg, dist_info, count_flops=False):
    """cfg['grad_accum'] micro-steps of forward and backward. Returns the last micro-step's losses and, with
    count_flops, the FLOPs per sample of the first micro-step (else None)."""
    flops = None
    for micro in range(cfg["grad_accum"]):
        epoch, batch = next(batches)
        position.advance(epoch, batch)
        # DDP all-reduces gradients only on the last micro-step; no_sync() makes a one-use context each time
        sync = model.no_sync() if dist_info.ddp and micro < cfg["grad_accum"] - 1 else nullcontext()
        counter = counting_flops() if count_flops and micro == 0 else nullcontext()
        with sync, counter as flop_counter:
            with autocast_context(dist_info.device, cfg["dtype"]):
                losses = loss_fn(model, batch)
            scaler.scale(losses["loss"] / cfg["grad_accum"]).backward()
        if flop_counter is not None:
            flops = flop_counter.get_total_flops() / len(batch["text"])
    return losses, flops


def optimizer_step(optimizer, scaler, params, cfg):
    """Unscale, clip (grad_clip > 0), step, zero the gradients; returns the gradient norm (before clipping)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def evaluate(model, loss_fn, loader, cfg, device):
    """Mean total loss over at most cfg['eval_batches'] validation batches, averaged over ranks; None when there is
    no batch to evaluate (never a made-up 0)."""
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for batch in loader:
        if n == cfg["eval_batches"]:
            break
        with autocast_context(device, cfg["dtype"]):
            total += loss_fn(model, batch)["loss"].float()
        n += 1
    model.train()
    return None if n == 0 else all_reduce_mean(total / n)


@contextmanager
def preserved_rng(generators=()):
    """Restore torch's CPU/CUDA random state and the given generators' states on exit."""
    states = [torch.get_rng_state()] + [g.get_state() for g in generators]
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        for g, state in zip(generators, states[1:]):
            g.set_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Stopped(Exception):
    """A run ended by a signal, its checkpoint written: the message and the exit status (128 + the signal)."""


def train(*, model, loss_fn, loader, val_loader, cfg, dist_info, stage, generators=None):
    """Train `model` for cfg['max_steps'] optimizer steps and return it (train_loop), holding out_dir's lock
    (out_dir_lock). Stopped by SIGTERM or SIGINT (StopSignals), it writes a checkpoint of the step reached, prints
    one line and exits with 128 + the signal's number (143 for SIGTERM), as a process killed by it would."""
    try:
        with out_dir_lock(cfg["out_dir"], dist_info.master), StopSignals(dist_info.device) as signals:
            return train_loop(model=model, loss_fn=loss_fn, loader=loader, val_loader=val_loader, cfg=cfg,
                              dist_info=dist_info, stage=stage, generators=generators, signals=signals)
    except Stopped as stopped:
        print(stopped.args[0], file=sys.stderr, flush=True)  # one line: nothing went wrong
        sys.exit(stopped.args[1])
    finally:
        stop_workers(loader, val_loader)


def stop_workers(*loaders):
    """End the loaders' DataLoader workers now, as torch does when a loader is dropped: they ignore SIGTERM
    (data.seed_worker), so the terminate that Python's exit sends to child processes would not end them."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # where a persistent_workers loader keeps its workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def train_loop(*, model, loss_fn, loader, val_loader, cfg, dist_info, stage, generators, signals):
    """The training loop of `train`.

    loss_fn(model, batch) -> {"loss": total, <term>: value, ...}, run under autocast; every term is logged.
    cfg: the script's config (see train_stage1.py for the keys). generators: {name: torch.Generator} whose
    state is checkpointed with the run (e.g. the one that draws the ITM negatives).
    With cfg['init_from'] == 'resume' the run continues from out_dir/ckpt.pt: weights, optimizer, grad scaler,
    step, data position and random state, so that it ends where an uninterrupted run would."""
    generators, device, master = generators or {}, dist_info.device, dist_info.master
    seed_everything(cfg["seed"], dist_info.rank)
    ckpt_path = prepare_out_dir(cfg)
    logger = Logger(cfg["out_dir"], master, cfg["wandb_log"], cfg["wandb_project"], cfg["wandb_run_name"], cfg)
    optimizer = make_optimizer(model, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]),
                               device=device)
    scaler = make_grad_scaler(device, cfg["dtype"])
    position, data = Position(), dataset_identity(loader.dataset)
    if cfg["init_from"] == "resume":
        position = restore(ckpt_path, model, optimizer, scaler, generators, cfg, dist_info, stage, data)
    logger.keep_until(position.step)
    model, net = prepare_model(model, cfg, dist_info)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = infinite_batches(loader, position.epoch, data_start(loader, position, cfg))
    epoch_length = batches_per_epoch(loader, cfg)
    watch = NonFiniteWatch(device, check_grads=not scaler.is_enabled())
    # the throughput of each log line: this rank's samples over the training time since the previous line, which
    # may be fewer than log_interval steps (the last line, the first after a resume) and leaves validation out
    # (perf_counter: a monotonic clock, which a wall-clock adjustment cannot make run backwards)
    flops_per_sample, interval_steps, interval_time, t0 = None, 0, 0.0, time.perf_counter()
    net.train()
    while position.step < cfg["max_steps"]:
        lr = learning_rate(position.step, cfg, epoch_length)
        for group in optimizer.param_groups:
            group["lr"] = lr
        position.files = []
        losses, flops = forward_backward(net, loss_fn, batches, position, scaler, cfg, dist_info,
                                         count_flops=flops_per_sample is None)
        if flops is not None:
            flops_per_sample = flops
            if master:
                print(f"training step: {flops_per_sample / 1e9:.3g} GFLOP per sample (torch.utils.flop_counter)")
        grad_norm = optimizer_step(optimizer, scaler, trainable, cfg)
        watch.record(position.step, losses["loss"], grad_norm, position.files)
        position.step += 1
        interval_steps += 1
        last = position.step == cfg["max_steps"]
        if position.step % cfg["log_interval"] == 0 or last:
            watch.check(ckpt_path)
            interval_time += time.perf_counter() - t0
            samples = interval_steps * cfg["grad_accum"] * cfg["batch_size"]  # this rank's
            samples_per_sec = samples / interval_time
            losses = {k: all_reduce_mean(v.detach().float()) for k, v in losses.items()}  # the global batch's
            logger.log(position.step, {**losses, "lr": lr,
                                       "grad_norm": grad_norm.float(), "samples": samples,
                                       "samples_per_sec": samples_per_sec,
                                       "skipped": position.skipped, "epoch": position.epoch,
                                       "mfu": mfu(flops_per_sample, samples_per_sec, device)})
            position.skipped, interval_steps, interval_time, t0 = 0, 0, 0.0, time.perf_counter()
        if val_loader is not None and cfg["eval_batches"] and (position.step % cfg["eval_interval"] == 0 or last):
            interval_time += time.perf_counter() - t0  # the steps before validation count, validation itself does not
            with preserved_rng(generators.values()):  # validation must not change what training draws next
                val_loss = evaluate(net, loss_fn, val_loader, cfg, device)
            if val_loss is not None:
                logger.log(position.step, {"val_loss": val_loss})
            t0 = time.perf_counter()
        signum = signals.agreed()
        if position.step % cfg["ckpt_interval"] == 0 or last or signum:
            watch.check(ckpt_path)
            save(ckpt_path, model, optimizer, scaler, position, generators, cfg, dist_info, stage, data)
        if signum and not last:
            raise Stopped(f"stopped by {signal.Signals(signum).name} after step {position.step}: {ckpt_path} holds "
                          f"it; continue with --init_from=resume", 128 + signum)
    return model
