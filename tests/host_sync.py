"""A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): it lists what, on a GPU, would make the host wait for
the device. On a CPU the host and the "device" are one, so every tensor is tagged by where it would live on a GPU:
on the host if it came from the data loader or from a factory without a device (a tokenizer's ids), or was computed
from host tensors only; on the device otherwise (weights, and everything computed from them). Then:

- a copy of a host tensor to the device without non_blocking=True is a blocking copy;
- reading a device tensor on the host (.item(), bool(), int(), .tolist(), .cpu(), .numpy()) waits for it;
- an op whose output size depends on a device tensor's values (nonzero, boolean indexing, masked_select, unique,
  repeat_interleave without output_size, bincount, equal) reads that size on the host.

Python-level calls are seen through a TorchFunctionMode (placement, copies), the ops they run, the backward's
included, through a TorchDispatchMode (reads, data-dependent sizes)."""
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST = "_host_sync_probe_on_host"  # attribute set on tensors that would live on the host
aten = torch.ops.aten
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
                  aten.unique_consecutive.default, aten.bincount.default, aten.equal.default,
                  aten.repeat_interleave.Tensor}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_, torch.tensor, torch.as_tensor,
         torch.Tensor.new_tensor}
HOST_READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}


def on_host(t):
    return getattr(t, HOST, False)


def mark_host(tree):
    for t in tree_flatten(tree)[0]:
        if isinstance(t, torch.Tensor):
            setattr(t, HOST, True)
    return tree


def where(skip=("torch/", "host_sync.py")):
    """The innermost caller outside torch and this file: 'file:line in function'."""
    for frame in reversed(traceback.extract_stack()):
        if not any(s in frame.filename for s in skip):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"
    return "?"


def _moves_to_device(func, args, kwargs):
    """(whether this call moves a host tensor to the device, whether it is non-blocking)."""
    non_blocking = bool(kwargs.get("non_blocking", False))
    if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
        data = args[1] if func is torch.Tensor.new_tensor else args[0]
        device = kwargs.get("device", args[0].device if func is torch.Tensor.new_tensor else None)
        from_host = not isinstance(data, torch.Tensor) or on_host(data)
        return device is not None and from_host, False
    if func is torch.Tensor.copy_:
        dst, src = args[0], args[1]
        non_blocking = bool(args[2]) if len(args) > 2 else non_blocking
        return isinstance(src, torch.Tensor) and on_host(src) and not on_host(dst), non_blocking
    src, rest = args[0], args[1:]
    non_blocking = non_blocking or any(isinstance(a, bool) and a for a in rest[:2])
    if func is torch.Tensor.cuda:
        return on_host(src), non_blocking
    target = kwargs.get("device")
    for a in rest:
        if isinstance(a, (torch.device, str, torch.Tensor)):
            target = a
    if target is None:  # a dtype-only cast stays where it is
        return False, non_blocking
    to_device = not on_host(target) if isinstance(target, torch.Tensor) else True
    return on_host(src) and to_device, non_blocking


class _Placement(TorchFunctionMode):
    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.probe.paused:
            return func(*args, **kwargs)
        if func in HOST_READS and isinstance(args[0], torch.Tensor) and not on_host(args[0]):
            self.probe.record(f"{func.__name__}() of a device tensor")
        moved, non_blocking = _moves_to_device(func, args, kwargs) if func in MOVES else (False, False)
        if moved and not non_blocking:
            self.probe.record(f"blocking copy to the device ({func.__name__})")
        out = func(*args, **kwargs)
        if moved and func is not torch.Tensor.copy_ and any(out is a for a in args):  # a no-op on a CPU; on a GPU, a new tensor on the device
            out = out.view_as(out)
        if func is torch.Tensor.copy_:  # in place: the tensor stays where it is
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in HOST_READS:
            host = True
        elif func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.new_tensor):
            host = on_host(args[0]) and not moved and kwargs.get("device") is None
        elif func in MOVES:  # torch.tensor, torch.as_tensor
            host = kwargs.get("device") is None
        else:  # a factory without a device makes a host tensor; an op on host tensors only stays on the host
            host = all(on_host(t) for t in inputs) if inputs else kwargs.get("device") is None
        if host:
            mark_host(out)
        return out


class _Reads(TorchDispatchMode):
    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.probe.paused:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            on_device = any(not on_host(t) for t in tensors)
            if func is aten._local_scalar_dense.default and on_device:
                self.probe.record("a device tensor read as a Python number (.item(), bool(), int())")
            elif func in DATA_DEPENDENT and on_device and not (func is aten.repeat_interleave.Tensor
                                                                and kwargs.get("output_size") is not None):
                name = func.overloadpacket.__name__
                self.probe.record(f"{name}: its output size depends on a device tensor's values")
            elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool and not on_host(i) for i in args[1]):
                name = func.overloadpacket.__name__
                self.probe.record(f"{name} with a boolean device mask (its size is read on the host)")
        return func(*args, **kwargs)


class HostSyncProbe:
    """with HostSyncProbe() as probe: ...; probe.syncs lists 'what at file:line in function', one per event.
    probe.paused (or `with probe.pause():`) stops the watch, e.g. while the data loader builds a batch."""

    def __init__(self):
        self.syncs, self.paused = [], False

    def record(self, what):
        self.syncs.append(f"{what} at {where()}")

    def pause(self):
        probe = self

        class Paused:
            def __enter__(self):
                probe.paused = True

            def __exit__(self, *exc):
                probe.paused = False
        return Paused()

    def __enter__(self):
        self._modes = [_Placement(self), _Reads(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
