"""What a training step would cost on a GPU, counted on any device (the CPU included).

On a GPU the host must run ahead of the device: it queues a step's ~1,000 kernels while the
device still runs the previous step's. Anything that waits for the device ends that, and then
every launch is exposed: a `.item()`, `float()` or `bool()` of a device tensor; an op whose
output size depends on values (`nonzero`, boolean indexing, `unique`, `repeat_interleave`
without `output_size`); a tensor made from Python data on the device (a blocking copy); a
blocking copy between host and device. `torch.cuda.set_sync_debug_mode("error")` finds these on
a GPU; `StepAudit` finds them on any device, at the dispatcher, so a test on the CPU fails where
a GPU run would wait.

On the CPU, host and device memory are one, so the audit follows which tensors are DEVICE
tensors: the ones it is given (model, optimizer state, resident pixels) and every result of an
op that reads one, or of a factory op (zeros, full, arange, ...), outside `part("host")` blocks,
or of an upload (`.to(device, non_blocking=True)`). Everything else is a host tensor: made in a
host part, or before the audit and not given. What it cannot see on the CPU: whether a host
buffer is pinned, and `x.to("cpu")` of a device tensor (on the CPU that is the device itself);
the GPU script's `set_sync_debug_mode` run covers both.

It also counts the device kernels each part of the step would launch: every op on device
tensors except views and allocations (a foreach op counts as one, as it is one launch per chunk
of tensors; dropout, three ops on a CPU, counts as the one fused kernel it is on a GPU).

With `trace=True` it also records what a CUDA graph of the step would freeze: a captured step
replays its kernels with the arguments they had at capture, so every Python number or generator
seed that reaches a kernel and changes from one step to the next (the learning rate, the step
count, a seed set on the host), every upload whose host buffer is not the same from step to
step, every upload that makes a new device tensor (`.to(device)`: a graph needs a static buffer
written in place) and every host allocation of pinned memory is a capture blocker.
`capture_blockers(audit.steps_traced)` lists them, by part, op and the line that asked.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..parts import HOST, current_part

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense: "reads a device value on the host (.item(), float(), bool(), int())",
    aten.nonzero: "output size depends on the values (nonzero)",
    aten.masked_select: "output size depends on the values (masked_select)",
    aten._unique2: "output size depends on the values (unique)",
    aten.unique_dim: "output size depends on the values (unique)",
    aten.unique_consecutive: "output size depends on the values (unique_consecutive)",
    aten.equal: "returns a Python bool (torch.equal)",
    aten.is_nonzero: "returns a Python bool",
    aten.lift_fresh: "a tensor made from Python data (torch.tensor / new_tensor / as_tensor): on a GPU, a blocking "
                     "copy; make constants once at set-up",
}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# ops that allocate or alias memory but launch no kernel
NO_KERNEL = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.resize_,
             aten.set_, aten._unsafe_view, aten.lift_fresh, aten._local_scalar_dense, aten.is_pinned,
             aten._pin_memory, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset,
             aten.as_strided_, aten.squeeze_, aten.unsqueeze_, aten.t_, aten.transpose_, aten.detach_,
             # a Python number in an op (torch.where(c, x, 1.0)): a wrapped scalar on a GPU, no kernel
             aten.scalar_tensor}
HOST_READS = {"tolist", "numpy", "cpu"}  # Tensor methods that copy a device tensor to the host and wait


@dataclass
class Finding:
    """One would-be host-device synchronisation."""

    op: str
    why: str
    where: str  # file:line (function) of the code that caused it
    part: str

    def __str__(self) -> str:
        return f"{self.where} [{self.part}] {self.op}: {self.why}"


@dataclass
class Report:
    """Counts over `steps` audited steps."""

    steps: int
    kernels: Counter = field(default_factory=Counter)  # per part: device kernels (compute and copies)
    ops: Counter = field(default_factory=Counter)  # per (part, op name): device kernels
    syncs: list[Finding] = field(default_factory=list)
    uploads: int = 0  # host-to-device copies (non-blocking)
    downloads: int = 0  # device-to-host copies (non-blocking, into a host buffer)
    host_ops: int = 0  # ops on host tensors outside host parts (host work left unmarked)

    def per_step(self) -> dict:
        n = max(1, self.steps)
        parts = {k: v / n for k, v in sorted(self.kernels.items(), key=lambda kv: -kv[1])}
        return {"kernels": sum(self.kernels.values()) / n, "parts": parts, "syncs": len(self.syncs) / n,
                "uploads": self.uploads / n, "downloads": self.downloads / n, "host_ops": self.host_ops / n}

    def top(self, name: str, k: int = 8) -> list[tuple[str, float]]:
        """The part's most frequent kernels per step."""
        ops = Counter({op: c for (p, op), c in self.ops.items() if p == name})
        return [(op, c / max(1, self.steps)) for op, c in ops.most_common(k)]


@dataclass(frozen=True)
class Traced:
    """One thing a captured step would freeze: a kernel and the host values among its arguments,
    an upload and its (host buffer, device buffer), or a pinned host allocation."""

    kind: str  # "kernel", "upload" (copy_ into a device buffer), "moved" (an upload by .to()), "pin"
    op: str
    part: str
    where: str
    values: tuple


class Seed(int):
    """The seed of a generator a kernel draws from (set on the host)."""

    def __str__(self) -> str:
        return f"seed {int(self)}"


def _host_values(tree) -> tuple:
    """The host values a kernel takes: Python numbers, and the seed of a generator it draws from."""
    leaves = tree_flatten(tree)[0]
    return tuple(Seed(x.initial_seed()) if isinstance(x, torch.Generator) else x for x in leaves
                 if isinstance(x, (int, float, torch.Generator)))


def capture_blockers(steps: list[list[Traced]]) -> list[str]:
    """What would stop the traced step from being captured once and replayed (one line each, by
    part, op and the line that asked): host values of a kernel that differ between the traced
    steps, a host buffer of an upload that is not the same one every step, an upload that makes a
    new device tensor, a pinned allocation, a kernel sequence that is not the same every step."""
    if len(steps) < 2:
        raise ValueError("capture_blockers compares steps: trace two or more")  # a bug, never input
    first = steps[0]
    if any([(t.kind, t.op, t.part) for t in s] != [(t.kind, t.op, t.part) for t in first] for s in steps[1:]):
        return ["the step launches other kernels from one step to the next: a graph replays one sequence"]
    found: dict[tuple, str] = {}
    for i, t in enumerate(first):
        seen = [s[i].values for s in steps]
        key = (t.part, t.op, t.where)
        if t.kind == "pin":
            found.setdefault(key + ("pin",), f"[{t.part}] {t.where}: pinned host memory allocated every step "
                                             "(allocate the host buffer once and write into it)")
        elif t.kind == "moved":
            found.setdefault(key + ("new",), f"[{t.part}] {t.where} {t.op}: each upload makes a new device tensor "
                                             "(copy_ into a device buffer made once)")
        elif t.kind == "upload" and len(set(seen)) > 1:
            found.setdefault(key + ("buffer",), f"[{t.part}] {t.where} {t.op}: uploads from another host buffer "
                                                "every step (write the step's numbers into one buffer)")
        elif t.kind == "kernel" and len(set(seen)) > 1:
            changed = [j for j in range(len(seen[0])) if len({v[j] for v in seen}) > 1]
            values = " -> ".join(", ".join(str(v[j]) for j in changed) for v in seen)
            if any(isinstance(seen[0][j], Seed) for j in changed):
                why = ("draws from a generator seeded on the host every step (draw from a counter-based hash "
                       "of the seed and a device step counter)")
            else:
                why = "takes a host number that changes every step (make it a device tensor written in place)"
            found.setdefault(key + ("values",), f"[{t.part}] {t.where} {t.op}: {why}: {values}")
    return list(found.values())


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _caller() -> str:
    """The innermost frame outside torch, Accelerate and this file: the line that asked."""
    frame = sys._getframe(2)
    skip = (str(Path(torch.__file__).parent), str(Path(__file__)), "accelerate", "contextlib", "/timm/")
    while frame is not None and any(s in frame.f_code.co_filename for s in skip):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: "StepAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "profiler":
            self.audit._op(func, args, kwargs, out)
        return out


class _Function(TorchFunctionMode):
    """Sees what never reaches the dispatcher on the CPU: host reads (tolist, numpy, cpu) and
    device moves (`.to(device)` is the tensor itself when the device is the CPU)."""

    def __init__(self, audit: "StepAudit") -> None:
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:  # one fused kernel on a GPU (native_dropout), three on a CPU
            return self.audit._fold(func, args, kwargs, "native_dropout")
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in HOST_READS or name in ("to", "cuda"):
            self.audit._move(name, args, kwargs, out)
        return out


class StepAudit:
    """Counts device kernels per part and records every would-be sync while active:

        audit = StepAudit(device_tensors(model, optimizer, store.pixels))
        with audit:
            for _ in range(steps): ...the step...
        report = audit.report(steps)
    """

    def __init__(self, device: Iterable[torch.Tensor] = (), trace: bool = False) -> None:
        self.is_device = WeakIdKeyDictionary()  # tensor -> True (device) / False (host); unknown = host
        for t in device:
            self.is_device[t] = True
        self.kernels, self.ops, self.syncs = Counter(), Counter(), []
        self.uploads = self.downloads = self.host_ops = 0
        self._folding = 0  # inside an op that is one kernel on a GPU (dropout)
        self._modes = (_Function(self), _Dispatch(self))
        self.trace = trace
        self.steps_traced: list[list[Traced]] = []  # with trace: per step (next_step), what capture would freeze

    def next_step(self) -> None:
        """With trace: what follows belongs to a new step."""
        self.steps_traced.append([])

    def _record(self, kind: str, op: str, values: tuple) -> None:
        if self.trace and self.steps_traced:
            self.steps_traced[-1].append(Traced(kind, op, current_part(), _caller(), values))

    def __enter__(self) -> "StepAudit":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def report(self, steps: int) -> Report:
        return Report(steps, Counter(self.kernels), Counter(self.ops), list(self.syncs), self.uploads,
                      self.downloads, self.host_ops)

    def _device(self, t: torch.Tensor) -> bool:
        return self.is_device.get(t, False)

    def _sync(self, op: str, why: str) -> None:
        self.syncs.append(Finding(op, why, _caller(), current_part()))

    def _tag(self, out, device: bool) -> None:
        for t in _tensors(out):
            self.is_device[t] = device

    def _op(self, func, args, kwargs, out) -> None:
        inputs = _tensors((args, kwargs))
        on_device = [self._device(t) for t in inputs]
        host_part = current_part() == HOST
        packet = func.overloadpacket
        if packet is aten.copy_:
            self._copy(args, kwargs, host_part)
            return
        if packet is aten._pin_memory:  # a host allocation: a graph's host buffer is made once
            self._record("pin", "pin_memory", ())
        if packet is aten._to_copy and kwargs.get("device") not in (None, inputs[0].device):
            return  # a move between devices: _move sees it at the Tensor.to call
        if host_part:
            if any(on_device):
                self._sync(str(packet), "a device tensor read in a host part (an implicit device-to-host copy)")
            self._tag(out, False)
            return
        device = any(on_device) or not inputs  # factories outside host parts make device tensors
        if packet is aten.lift_fresh:  # made for the device: one finding, and a device tensor from here on
            self._sync(str(packet), SYNC_OPS[packet])
            self._tag(out, True)
            return
        if not device:
            self.host_ops += 1
            self._tag(out, False)
            return
        if packet in SYNC_OPS:
            self._sync(str(packet), SYNC_OPS[packet])
        elif packet in INDEX_OPS and any(t is not None and t.dtype in (torch.bool, torch.uint8)
                                         for t in (args[1] if len(args) > 1 else [])):
            self._sync(str(packet), "boolean-mask indexing: the output size depends on the values")
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and \
                kwargs.get("output_size") is None:
            self._sync(str(packet), "repeat_interleave without output_size: the output size depends on the values")
        stray = [t for t, d in zip(inputs, on_device) if not d and t.dim() > 0]
        if stray:
            self._sync(str(packet), f"a host tensor of shape {tuple(stray[0].shape)} in a device op "
                                    "(an implicit, blocking host-to-device copy)")
        if not func.is_view and packet not in NO_KERNEL and not self._folding:
            self._kernel(packet.__name__)
            if self.trace:
                self._record("kernel", packet.__name__, _host_values((args, kwargs)))
        self._tag(out, True)

    def _kernel(self, name: str) -> None:
        self.kernels[current_part()] += 1
        self.ops[(current_part(), name)] += 1

    def _fold(self, func, args, kwargs, name: str):
        """Runs func counting its ops as the one kernel it is on a GPU (their checks still apply)."""
        self._folding += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self._folding -= 1
        if out is not args[0] and self._device(out):  # p = 0 or eval mode returns the input: no kernel
            self._kernel(name)
        return out

    def _copy(self, args, kwargs, host_part: bool) -> None:
        """copy_(dst, src, non_blocking): a device copy, a transfer, or host memory to host memory."""
        dst, src = args[0], args[1]
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        dst_dev, src_dev = self._device(dst), self._device(src)
        if not dst_dev and not src_dev:
            self.host_ops += not host_part
            return
        if dst_dev != src_dev:  # a transfer: the device must not be waited for
            if src_dev:
                self.downloads += 1
            else:
                self.uploads += 1
                self._record("upload", "copy_", (src.data_ptr(), dst.data_ptr()))
            if not non_blocking:
                self._sync("aten.copy_", f"a blocking {'device-to-host' if src_dev else 'host-to-device'} copy")
        if not self._folding:
            self._kernel("copy_")

    def _move(self, name: str, args, kwargs, out) -> None:
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is None:
            return
        if name in HOST_READS:
            if self._device(src):
                self._sync(f"Tensor.{name}", "copies a device tensor to the host and waits for it")
            return
        target = kwargs.get("device")
        for a in args[1:]:
            if isinstance(a, (torch.device, str)) or isinstance(a, torch.Tensor):
                target = a.device if isinstance(a, torch.Tensor) else a
        if target is None and name == "to":
            return  # a dtype change: the dispatcher sees it
        if not self._device(src):  # host -> device: an upload
            self.uploads += 1
            self._record("moved", f"Tensor.{name}", (src.data_ptr(),))
            if not kwargs.get("non_blocking", False):
                self._sync(f"Tensor.{name}", "a blocking host-to-device copy (non_blocking=False)")
            self._tag(out, True)
