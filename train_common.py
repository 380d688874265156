"""
Training mechanics shared by train_pformer.py, train_stage1.py and train_stage2.py: distributed setup, mixed
precision, the lr schedule, the optimizer, checkpoint I/O, cross-rank averaging, logging and MFU.
The scripts themselves read as recipes; everything here is method-agnostic.
"""
import json
import math
import os
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# distributed setup


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the run."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cuda:3' or 'cpu'
    master: bool  # rank 0 does the logging and checkpointing


def setup_distributed(device='cuda'):
    """Join the process group when launched by torchrun (RANK is set), else run as one plain process on device."""
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available; pass --device=cpu")
    if 'RANK' not in os.environ:
        if device == 'cuda':
            device = 'cuda:0'
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
        return Dist(ddp=False, rank=0, local_rank=0, world_size=1, device=device, master=True)
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    world_size = int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'  # one GPU per process, picked by torchrun's local rank
        torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl', device_id=torch.device(device))
    else:
        dist.init_process_group(backend='gloo')
    return Dist(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                master=rank == 0)


def cleanup_distributed():
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_master():
    """True on rank 0 and in a single-process run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(tensor):
    """The mean of tensor over all ranks (a new tensor); tensor itself in a single-process run."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # gloo has no ReduceOp.AVG
    return tensor / dist.get_world_size()


def seed_everything(seed, rank):
    """Seed python, numpy and torch (all devices). Ranks get different seeds so their augmentations differ;
    the model's random init still agrees across ranks because DDP broadcasts rank 0's weights when wrapping."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# mixed precision


DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def autocast_context(device, dtype_name):
    """torch.autocast for CUDA in bfloat16/float16; a no-op context on CPU or in float32."""
    dtype = DTYPES[dtype_name]
    if not device.startswith('cuda') or dtype == torch.float32:
        return nullcontext()
    return torch.autocast('cuda', dtype=dtype)


def make_grad_scaler(device, dtype_name):
    """A GradScaler that is live only for float16 on CUDA (bfloat16 has float32's range and needs none);
    disabled, its scale/step/update calls pass straight through, so the training loop is the same either way."""
    assert dtype_name in DTYPES, dtype_name
    return torch.amp.GradScaler('cuda', enabled=device.startswith('cuda') and dtype_name == 'float16')

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


def make_optimizer(model, *, lr, weight_decay, betas, device):
    """AdamW over the trainable parameters: weight decay on matrices and embeddings (ndim >= 2), none on
    biases, LayerNorm weights and other 1-D parameters such as the ITC temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith('bias') else no_decay).append(p)
    if is_master():
        print(f"optimizer: {len(decay)} decayed tensors ({sum(p.numel() for p in decay):,} parameters), "
              f"{len(no_decay)} non-decayed tensors ({sum(p.numel() for p in no_decay):,} parameters)")
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    # the fused kernel is one launch per step instead of several per tensor; CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.startswith('cuda'))

# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """torch.save(state, path) atomically: the file at path is either the old checkpoint or the complete new one,
    never half a file, even if the job is killed mid-write (a real risk with multi-GB states on shared disks)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # the temp file sits in the same directory so that os.replace is a rename on one filesystem, hence atomic
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # and the rename itself survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, expect_stage=None):
    """The state dict saved at path, on CPU; checks state['stage'] == expect_stage unless expect_stage is None.
    Loaded with weights_only=True, so a checkpoint holds tensors and plain python values (no numpy arrays)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # on CPU: every rank loads the file, and map_location=device would put all their copies on one GPU
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a readable torch checkpoint (corrupt or truncated?): {first_line}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a training checkpoint dict")
    if expect_stage is not None and state.get('stage') != expect_stage:
        found = f"a stage-{state['stage']} checkpoint" if 'stage' in state else "a checkpoint without a 'stage' entry"
        raise ValueError(f"{path} is {found}, expected stage {expect_stage}")
    return state


def unwrap_model(model):
    """The plain module inside DDP and/or torch.compile wrappers (in either order)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, '_orig_mod'):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def trainable_state_dict(model):
    """{name: tensor} of the parameters that train; frozen ViT / LLM / P-Former weights are not saved again."""
    return {n: p.detach() for n, p in unwrap_model(model).named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, state_dict, source):
    """Copy state_dict into the model's trainable parameters. It must match them exactly: the same names
    (none missing, none extra) and shapes; a mismatch raises an error naming source and the first offending keys."""
    params = {n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}
    missing = [k for k in params if k not in state_dict]
    extra = [k for k in state_dict if k not in params]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(params[k].shape)}"
                  for k in params if k in state_dict and state_dict[k].shape != params[k].shape]

    def first_few(keys):
        return ', '.join(keys[:5]) + (f' and {len(keys) - 5} more' if len(keys) > 5 else '')
    problems = [f"{what} ({len(keys)}): {first_few(keys)}"
                for what, keys in [('missing', missing), ('unexpected', extra), ('shape mismatch', mismatched)] if keys]
    if problems:
        raise ValueError(f"{source} does not match the model's trainable parameters: " + '; '.join(problems))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state_dict[k])

# -----------------------------------------------------------------------------
# data


def infinite_batches(loader, start_epoch=0, start_index=0, steps_per_epoch=None):
    """Yield (epoch, batch) forever. Before each epoch, tell the sampler / dataset which epoch it is (so the
    shuffle changes) and, in the first epoch only, where to resume: start_index goes as is to the sampler's
    set_start (samples per rank) or the iterable dataset's skip (samples per rank-and-worker stream).
    steps_per_epoch ends every epoch after that many batches: tar-shard ranks get unequal sample counts, and a
    fixed count keeps all ranks in the same epoch. None runs each epoch to the end of the loader."""
    epoch, start = start_epoch, start_index
    while True:
        for obj in (loader.sampler, loader.batch_sampler, loader.dataset):
            if hasattr(obj, 'set_epoch'):
                obj.set_epoch(epoch)
            # after set_epoch, which a skip refers to; every epoch, since a start left by an epoch cut short
            # by steps_per_epoch must not carry over
            if hasattr(obj, 'set_start'):
                obj.set_start(start)
            if hasattr(obj, 'skip'):
                obj.skip(start)
        for step, batch in enumerate(loader):
            if step == steps_per_epoch:
                break
            yield epoch, batch
        epoch, start = epoch + 1, 0

# -----------------------------------------------------------------------------
# logging and MFU


class Logger:
    """One line per log step on the master: printed, appended as JSON to out_dir/log.jsonl, optionally to wandb."""

    def __init__(self, out_dir, master, wandb_log=False, wandb_project=None, wandb_run_name=None, config=None):
        self.master = master
        self.path = os.path.join(out_dir, 'log.jsonl')
        self.wandb = None
        if master:
            os.makedirs(out_dir, exist_ok=True)
            if wandb_log:
                import wandb  # only when asked for: it is not a requirement
                wandb.init(project=wandb_project, name=wandb_run_name, config=config)
                self.wandb = wandb

    def keep_until(self, step):
        """Start the log at `step`: drop the lines of later steps (an interrupted run logged past the checkpoint it
        resumes from) or, at step 0, the whole file of an earlier run, so that log.jsonl holds one run's curve."""
        if not self.master or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if step and json.loads(line).get('step', 0) <= step]
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

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
            if k == 'samples_per_sec':
                parts.append(f"{v:.1f} samples/s")
            elif k == 'mfu':
                parts.append(f"mfu {100 * v:.1f}%")
            elif isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
            else:
                parts.append(f"{k} {v}")
        print(' | '.join(parts), flush=True)
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': step, 'time': time.time(), **metrics}) + '\n')
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)


# dense bf16/fp16 tensor-core peak FLOP/s per GPU, matched in order as substrings of torch.cuda.get_device_name
PEAK_FLOPS = [
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('H200', 989e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('A10G', 125e12),
    ('RTX 4090', 165e12),
    ('V100', 125e12),
]


def mfu(flops_per_sample, samples_per_sec, device):
    """Model FLOPs utilization of one GPU (samples_per_sec is that GPU's throughput), as a fraction of its peak;
    None on CPU or on a GPU not in PEAK_FLOPS."""
    if not device.startswith('cuda'):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS:
        if key in name:
            return flops_per_sample * samples_per_sec / peak
    return None

# -----------------------------------------------------------------------------
# the training loop, the same for every stage


def train(*, model, loss_fn, loader, val_loader, cfg, dist_info, stage, generators=None):
    """Train `model` for cfg['max_steps'] optimizer steps and return it (unwrapped).

    loss_fn(model, batch) -> {"loss": total, <term>: value, ...}, run under autocast; every term is logged.
    cfg: the script's config (see train_stage1.py for the keys). generators: {name: torch.Generator} whose
    state is checkpointed with the run (e.g. the one that draws the ITM negatives).
    With cfg['init_from'] == 'resume' the run continues from out_dir/ckpt.pt: weights, optimizer, grad scaler,
    step, data position and random state, so that it ends where an uninterrupted run would."""
    device, master = dist_info.device, dist_info.master
    generators = generators or {}
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    logger = Logger(cfg['out_dir'], master, cfg['wandb_log'], cfg['wandb_project'], cfg['wandb_run_name'], cfg)
    optimizer = make_optimizer(model, lr=cfg['lr'], weight_decay=cfg['weight_decay'], betas=tuple(cfg['betas']),
                               device=device)
    scaler = make_grad_scaler(device, cfg['dtype'])
    step, epoch, batch_in_epoch = 0, 0, 0
    if cfg['init_from'] == 'resume':
        state = load_checkpoint(ckpt_path, expect_stage=stage)
        load_trainable_state_dict(model, state['model'], ckpt_path)
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        step, epoch, batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']
        rng = state['rng'][dist_info.rank % len(state['rng'])]
        torch.set_rng_state(rng['cpu'])
        if 'cuda' in rng and device.startswith('cuda'):
            torch.cuda.set_rng_state(rng['cuda'], device)
        for name, g in generators.items():
            g.set_state(state['generators'][name])
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif cfg['init_from'] != 'scratch':
        raise ValueError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    logger.keep_until(step)
    raw_model = model
    if cfg['compile']:
        from model import compile_blocks  # the blocks only: the captions' Python stays eager (see there)
        compile_blocks(model)
    if dist_info.ddp:
        # broadcast_buffers=False: the buffers here are constants (position ids, RoPE tables), no BatchNorm stats
        model = DDP(model, device_ids=[dist_info.local_rank] if device.startswith('cuda') else None,
                    broadcast_buffers=False)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    flops_per_sample = None  # counted on the first step: frozen forwards, the backward to the soft prompt, all

    def save():
        """Every rank's torch RNG state goes in, so that a resumed run draws the same dropout and crops."""
        rng = {'cpu': torch.get_rng_state()}
        if device.startswith('cuda'):
            rng['cuda'] = torch.cuda.get_rng_state(device)
        if dist_info.ddp:
            rngs = [None] * dist_info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if master:
            save_checkpoint(ckpt_path, dict(
                stage=stage, model=trainable_state_dict(raw_model), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, config=cfg,
                rng=rngs, generators={name: g.get_state() for name, g in generators.items()}))

    # resume where the data stopped: samples per rank for a sampler, per rank-and-worker stream for shards
    per_stream = cfg['batch_size'] // max(1, loader.num_workers) if _is_stream(loader) else cfg['batch_size']
    batches = infinite_batches(loader, start_epoch=epoch, start_index=batch_in_epoch * per_stream)
    model.train()
    skipped, t0 = 0, time.time()
    while step < cfg['max_steps']:
        lr = cosine_lr(step, warmup_steps=cfg['warmup_steps'], max_steps=cfg['lr_decay_steps'], lr=cfg['lr'],
                       min_lr=cfg['min_lr'], warmup_start_lr=cfg['warmup_start_lr'])
        for group in optimizer.param_groups:
            group['lr'] = lr
        for micro in range(cfg['grad_accum']):
            batch_epoch, batch = next(batches)
            if batch_epoch != epoch:
                epoch, batch_in_epoch = batch_epoch, 0
            batch_in_epoch += 1
            skipped += batch.get('skipped', 0)
            last = micro == cfg['grad_accum'] - 1
            # DDP all-reduces gradients only on the last micro-step
            sync = model.no_sync() if dist_info.ddp and not last else nullcontext()
            # the first micro-step runs under torch's FLOP counter (matmuls and attention, forward and backward);
            # under torch.compile it would see no ops, so compiled runs report no MFU
            count = FlopCounterMode(display=False) if flops_per_sample is None and not cfg['compile'] else None
            with count or nullcontext():
                with sync, autocast_context(device, cfg['dtype']):
                    losses = loss_fn(model, batch)
                with sync:
                    scaler.scale(losses['loss'] / cfg['grad_accum']).backward()
            if count is not None:
                flops_per_sample = count.get_total_flops() / len(batch['text'])
                if master:
                    print(f"training step: {flops_per_sample / 1e9:.3g} GFLOP per sample (torch.utils.flop_counter)")
        if cfg['grad_clip'] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg['log_interval'] == 0 or step == cfg['max_steps']:
            dt = time.time() - t0
            samples_per_sec = cfg['log_interval'] * cfg['grad_accum'] * cfg['batch_size'] / dt
            logger.log(step, {**{k: v.detach().float() for k, v in losses.items()}, 'lr': lr,
                              'samples_per_sec': samples_per_sec, 'skipped': skipped, 'epoch': epoch,
                              'mfu': mfu(flops_per_sample, samples_per_sec, device) if flops_per_sample else None})
            t0 = time.time()
        if val_loader is not None and (step % cfg['eval_interval'] == 0 or step == cfg['max_steps']):
            with preserved_rng(generators.values()):  # validation must not change what training draws next
                val_loss = evaluate(model, loss_fn, val_loader, cfg, device)
            logger.log(step, {'val_loss': val_loss})
            t0 = time.time()
        if step % cfg['ckpt_interval'] == 0 or step == cfg['max_steps']:
            save()
    return raw_model


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


def _is_stream(loader):
    return isinstance(loader.dataset, torch.utils.data.IterableDataset)


@torch.no_grad()
def evaluate(model, loss_fn, loader, cfg, device):
    """Mean total loss over at most cfg['eval_batches'] validation batches, averaged over ranks."""
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for i, batch in enumerate(loader):
        if i == cfg['eval_batches']:
            break
        with autocast_context(device, cfg['dtype']):
            total += loss_fn(model, batch)['loss'].float()
        n += 1
    model.train()
    return all_reduce_mean(total / max(n, 1))
