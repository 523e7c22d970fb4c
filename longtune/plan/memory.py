"""A dispatch-level tracker of the bytes tensors hold, for real and fake tensors alike.

Every op's outputs are seen as they are made (a ``TorchDispatchMode``): an output that aliases
an input (a view, an in-place op) adds nothing and keeps the input's allocation alive; any other
output is a new allocation of ``numel * itemsize`` bytes (its storage's size), freed when the
last tensor over it is collected (``weakref.finalize``). Tensors that exist before (parameters,
gradients, optimizer state) are registered with :meth:`MemoryTracker.hold`. The peak is the
largest sum of live allocations, with what it was made of: kinds of held tensors, and the
phase (forward / backward / optimizer) that made each other allocation.

A storage resized in place (``UntypedStorage.resize_``: FSDP2 frees a gathered parameter by
resizing its storage to 0 after the block, and gives it back its size before the next use)
changes its allocation's bytes.

Written for the planner: PyTorch's ``MemTracker`` counted a tied parameter twice and missed
frees on fake tensors (PyTorch 2.13); this tracker gives the same figure for fake and real
tensors (``tests/test_plan.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary


class _Allocation:
    __slots__ = ("nbytes", "label", "refs", "live", "key", "__weakref__")

    def __init__(self, nbytes: int, label: str) -> None:
        self.nbytes, self.label, self.refs, self.live = nbytes, label, 0, True
        self.key: int | None = None


def _storage_key(t: torch.Tensor) -> int | None:
    """The identity of a tensor's storage (what ``UntypedStorage.resize_`` is called on)."""
    try:
        return _local(t).untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. sparse)
        return t.numel() * t.element_size()


def _local(t: Any) -> torch.Tensor | None:
    """The plain tensor behind a DTensor (its local shard), or the tensor itself."""
    if not isinstance(t, torch.Tensor):
        return None
    return t._local_tensor if hasattr(t, "_local_tensor") else t


_REDUCE_SCATTER = torch.ops.c10d._reduce_scatter_base_.default


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes of this process, and their peak (see the module docstring).

    Use as a context manager around the step; :attr:`phase` labels what is made (set it from
    outside: ``"forward"``, ``"backward"``, ``"optimizer"``).
    """

    def __init__(self, gloo: bool = False) -> None:
        """
        Args:
            gloo: the step runs on gloo (CPU) and is traced on a fake process group: count the
                full-size copy gloo's reduce-scatter makes of its input (ProcessGroupGloo's
                ``reduce_scatter_tensor_coalesced`` all-reduces a clone and keeps its chunk),
                which NCCL does not make and fake tensors do not show, at the moment it is
                made.
        """
        super().__init__()
        self.gloo = gloo
        self._owner: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._live: set[_Allocation] = set()
        self._by_storage: dict[int, _Allocation] = {}
        self._resize: Any = None
        self.current = 0
        self.by_label: dict[str, int] = {}
        self.peak = 0
        self.peak_by_label: dict[str, int] = {}
        self.phase = "forward"
        self.segment: Any = "start"
        """Where the step is (set from outside, e.g. by module hooks)."""
        self.segments: dict[Any, tuple[int, dict[str, int]]] = {}
        """segment -> (its largest live total, that total by label)."""
        self.largest = (0, "")
        self.flops = 0
        """FLOPs of the ops seen, by ``torch.utils.flop_counter``'s formulas (matmuls and
        attention). Counted here: ``FlopCounterMode``'s module tracker hooks every module's
        outputs, which keeps the tensors of a checkpointed block's recompute alive."""

    # ---- registration ---------------------------------------------------------------------

    def hold(self, tensors: Iterable[Any], label: str) -> None:
        """Count tensors that already exist (parameters, gradients, optimizer state)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t not in self._owner:
                self._attach(t, _Allocation(_nbytes(t), label))

    def relabel(self, tensors: Iterable[Any], label: str) -> None:
        """Count the allocations behind ``tensors`` as ``label`` from now on (e.g. what the
        backward pass made that turned out to be parameter gradients)."""
        for t in tensors:
            alloc = self._owner.get(_local(t)) if isinstance(t, torch.Tensor) else None
            if alloc is None or alloc.label == label or alloc not in self._live:
                continue
            self.by_label[alloc.label] -= alloc.nbytes
            alloc.label = label
            self.by_label[label] = self.by_label.get(label, 0) + alloc.nbytes

    def _attach(self, t: torch.Tensor, alloc: _Allocation) -> None:
        if alloc.refs == 0:
            self._live.add(alloc)
            self.current += alloc.nbytes
            self.by_label[alloc.label] = self.by_label.get(alloc.label, 0) + alloc.nbytes
            alloc.key = _storage_key(t)
            if alloc.key is not None:
                self._by_storage[alloc.key] = alloc
        alloc.refs += 1
        self._owner[t] = alloc
        weakref.finalize(t, MemoryTracker._release, weakref.ref(self), alloc)

    @staticmethod
    def _release(tracker_ref: weakref.ref, alloc: _Allocation) -> None:
        alloc.refs -= 1
        tracker = tracker_ref()
        if alloc.refs == 0 and tracker is not None and alloc in tracker._live:
            tracker._live.discard(alloc)
            tracker.current -= alloc.nbytes
            tracker.by_label[alloc.label] -= alloc.nbytes
            if tracker._by_storage.get(alloc.key) is alloc:
                del tracker._by_storage[alloc.key]

    # ---- storage resizes (FSDP2 frees a gathered parameter by resizing its storage to 0) -----

    def __enter__(self) -> MemoryTracker:
        original = self._resize = torch.UntypedStorage.resize_
        tracker_ref = weakref.ref(self)

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = original(storage, size)
            tracker = tracker_ref()
            if tracker is not None:
                tracker._resized(storage._cdata, storage.nbytes())
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._resize
        super().__exit__(*exc)

    def _resized(self, key: int, nbytes: int) -> None:
        alloc = self._by_storage.get(key)
        if alloc is None or alloc not in self._live or alloc.nbytes == nbytes:
            return
        delta = nbytes - alloc.nbytes
        alloc.nbytes = nbytes
        self.current += delta
        self.by_label[alloc.label] += delta
        self._peak_check()

    def _transient(self, nbytes: int) -> None:
        """Bytes that exist for a moment now, made in the current phase."""
        self.current += nbytes
        self.by_label[self.phase] = self.by_label.get(self.phase, 0) + nbytes
        self._peak_check()
        self.current -= nbytes
        self.by_label[self.phase] -= nbytes

    def _peak_check(self) -> None:
        seg = self.segments.get(self.segment)
        if seg is None or self.current > seg[0]:
            self.segments[self.segment] = (self.current, dict(self.by_label))
        if self.current > self.peak:
            self.peak, self.peak_by_label = self.current, dict(self.by_label)

    # ---- dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.gloo and func is _REDUCE_SCATTER:
            self._transient(_nbytes(args[1]))
        count = flop_registry.get(func.overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        aliased = _aliased_inputs(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t in self._owner:
                continue
            source = next((a for a in aliased if a is not None and a in self._owner), None)
            if source is None:
                source = next((i for i in inputs if i is t), None)
            if source is not None and source in self._owner:
                self._attach(t, self._owner[source])  # a view: the input's allocation
                continue
            # A view of a storage already counted, through an input this tracker never saw
            # made (a collective's output buffer allocated inside the backend, split into
            # gradient shards) or an op whose schema does not say it aliases (wait_tensor):
            # the storage's allocation, once.
            alloc = self._by_storage.get(_storage_key(t))
            if alloc is not None and alloc in self._live:
                self._attach(t, alloc)
                continue
            n = _nbytes(t)
            self._attach(t, _Allocation(n, self.phase))
            if n > self.largest[0]:
                self.largest = (n, f"{func.overloadpacket.__name__} {list(t.shape)} ({self.phase})")
        self._peak_check()
        return out


def _aliased_inputs(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor | None]:
    """The inputs an op's outputs may alias (views and in-place ops), from its schema."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    found = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        for t in value if isinstance(value, list | tuple) else (value,):
            found.append(t if isinstance(t, torch.Tensor) else None)
    return found
