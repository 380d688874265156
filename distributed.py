"""
Distributed training: joining the process group that torchrun sets up, and the collectives the losses use.

Every function here also works in a plain single process (no torch.distributed at all), and gives the same result
on 1 process with batch B as on N ranks with B / N each: the losses and their gradients do not depend on the number
of GPUs (tests/test_ddp.py checks it with 2 gloo processes on CPU).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the run."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # 'cuda:3' or 'cpu'
    master: bool  # rank 0 does the logging and checkpointing


def setup_distributed(device="cuda"):
    """Join the process group when launched by torchrun (RANK is set), else run as one plain process on `device`.
    On CUDA, float32 matrix products may use TF32 tensor cores (P-Former's nearest-embedding search, retrieval
    scoring and any float32 run; the half-precision autocast paths are unaffected)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but CUDA is not available; pass --device=cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        if device == "cuda":
            device = "cuda:0"
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        return Dist(ddp=False, rank=0, local_rank=0, world_size=1, device=device, master=True)
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one GPU per process, picked by torchrun's local rank
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device))
    else:
        dist.init_process_group(backend="gloo")
    return Dist(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size, device=device, master=rank == 0)


def cleanup_distributed():
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world_size():
    """(rank, number of ranks); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_master():
    """True on rank 0 and in a single-process run."""
    return rank_and_world_size()[0] == 0


def all_reduce_mean(tensor):
    """The mean of `tensor` over all ranks (a new tensor); `tensor` itself in a single-process run."""
    if rank_and_world_size()[1] == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)  # gloo has no ReduceOp.AVG
    return tensor / dist.get_world_size()


_host_group = {}  # the default process group -> a gloo group over the same ranks, for integers read on the host


def max_over_ranks(n):
    """The largest of the ranks' integers `n`; `n` itself on one process. Exchanged on the host (gloo, over CPU
    tensors), never through the GPU: an NCCL all-reduce would leave the result on the GPU, and reading it back would
    make the host wait for all the work queued before it. Under NCCL a gloo group over the same ranks is made on the
    first call (a collective call: every rank makes it at the same point of the same step)."""
    if rank_and_world_size()[1] == 1:
        return n
    group = None
    if dist.get_backend() != "gloo":
        world = dist.group.WORLD
        if world not in _host_group:
            _host_group.clear()  # a group of an earlier, destroyed process group is no use
            _host_group[world] = dist.new_group(backend="gloo")
        group = _host_group[world]
    value = torch.tensor(n)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (any picklable object); [obj] on one process."""
    if rank_and_world_size()[1] == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_no_grad(x):
    """Concatenate `x` over ranks along dim 0, detached: the methods' `concat_all_gather` (ITC, P-Former's
    contrastive term). Detached on one process too, so that the loss and its gradient do not depend on the
    number of ranks."""
    rank, world = rank_and_world_size()
    x = x.detach()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of the gathered tensor and keeps this rank's slice:
    one reduce-scatter (NCCL), or an all-reduce and a slice where the backend has none (gloo)."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        rank, world = rank_and_world_size()
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad.chunk(world)[rank]


def gather_with_grad(x):
    """Concatenate `x` over ranks along dim 0, keeping the gradient (ITM's hard-negative images, which may live on
    another rank). Gathered in the dtype it comes in: under autocast, callers hand it half-precision features."""
    return x if rank_and_world_size()[1] == 1 else _GatherWithGrad.apply(x)
