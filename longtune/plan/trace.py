"""One training step of longtune's own code, run on fake tensors, its memory and work counted.

:func:`trace_step` builds the native model on the meta device, applies the real
:func:`~longtune.parallel.parallelize.parallelize` (Ulysses SP, tiled MLP, activation
checkpointing, FSDP2 with the run's mixed precision) over a mesh of a *fake* process group of
the planned world size, materializes it as fake tensors, and runs the real step — forward with
the chunked loss, backward (with every recompute), the AdamW step — under a dispatch-level
memory tracker (:mod:`longtune.plan.memory`) that also counts FLOPs by PyTorch's formulas. Nothing is allocated: a 70B model at 128K traces on a laptop. What this
rank's memory holds comes out per segment of the step (a block's forward, the loss, a block's
backward, the tail, the optimizer step) with what made it, the FLOPs of the step, and the
largest single tensor and the op that made it.

Two things of the real step depend on the data and are parameters here: the supervised rows
(the chunked loss keeps only those; a ``nonzero`` the fake tensors cannot size — replaced, for
the trace only, by the first ``supervised`` rows) and the documents of a sequence (default one,
the worst case for attention). The optimizer is the trainer's fused AdamW, whose
kernel updates its state in place (the for-loop form would count temporaries it never makes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longtune.model.args import ModelArgs
from longtune.model.llama import Transformer
from longtune.plan.memory import MemoryTracker

#: Where in a step memory is counted, by the position of the block at work (a middle block's
#: segment is the largest of the middle blocks). The planner extrapolates each from traces of 3
#: and 4 blocks (both have a middle block): each grows linearly with the blocks.
SEGMENTS = (
    "fwd_first",
    "fwd_mid",
    "fwd_last",
    "loss",
    "bwd_first",
    "bwd_mid",
    "bwd_last",
    "tail",
    "optimizer",
)


@dataclass(frozen=True)
class Layout:
    """How one run is laid out: the levers the planner turns."""

    sp: int = 1
    ac: str = "selective"
    tiled_mlp: bool = False
    offload: bool = False
    """Activation offload: the block inputs checkpointing keeps live in pinned host memory."""
    micro_batch: int = 1
    cpu_offload: bool = False
    """FSDP2's CPUOffloadPolicy: parameters, gradients and optimizer state on the host."""

    def describe(self) -> str:
        parts = [f"sp={self.sp}", f"ac={self.ac}", f"mbs={self.micro_batch}"]
        parts += ["tiled_mlp"] * self.tiled_mlp + ["offload"] * self.offload
        return " ".join(parts + ["cpu_offload"] * self.cpu_offload)


@dataclass
class StepTrace:
    """What one traced step of an ``n_layers`` model holds and does on one rank."""

    n_layers: int
    peak: int
    """Bytes of tensors alive at this rank's peak."""
    segments: dict[str, tuple[int, dict[str, int]]]
    """Segment -> (the largest live bytes there, those bytes by what made them:
    ``parameters``, ``optimizer`` and ``inputs`` (held before the step), ``forward``,
    ``backward``, ``gradients`` (the parameters' own, FSDP's shards), ``optimizer step``)."""
    flops: float
    """FLOPs of the step on this rank (matmuls and attention; recomputes included)."""
    largest: tuple[int, str] = (0, "")
    """The largest tensor the step made: bytes, and the op, shape and phase that made it."""
    kept_block_inputs: int = 0
    """Bytes of one block's input (what full checkpointing keeps per block)."""
    block_shard_bytes: int = 0
    """Bytes of one block's parameters on this rank (its FSDP shard)."""


def extrapolate(
    small: StepTrace, large: StepTrace, n_layers: int, elsewhere: tuple[str, ...] = ()
) -> tuple[int, dict, str]:
    """The peak of an ``n_layers`` model from the traces of two smaller ones (``large`` has
    one block more, both at least 3): each segment's figures grow linearly with the blocks
    (block 0's forward sees no other block's state and does not grow), and the peak is the
    largest segment.

    Args:
        elsewhere: labels that live in another memory (FSDP's CPU offload: parameters,
            gradients, optimizer state on the host): left out of the peak.

    Returns:
        (peak bytes, those bytes by what made them, the segment where the peak is).
    """
    return peak_segment(extrapolate_segments(small, large, n_layers), elsewhere)


def extrapolate_segments(
    small: StepTrace, large: StepTrace, n_layers: int
) -> dict[str, tuple[int, dict[str, int]]]:
    """Every segment of an ``n_layers`` model, extrapolated (see :func:`extrapolate`)."""
    extra = n_layers - large.n_layers
    segments = {}
    for name in SEGMENTS:
        if name not in large.segments:
            continue
        by_large = large.segments[name][1]
        by_small = small.segments.get(name, large.segments[name])[1]
        k = 0 if name == "fwd_first" else extra
        by = {
            label: by_large.get(label, 0) + k * (by_large.get(label, 0) - by_small.get(label, 0))
            for label in set(by_large) | set(by_small)
        }
        segments[name] = (sum(by.values()), by)
    return segments


def peak_segment(
    segments: dict[str, tuple[int, dict[str, int]]], elsewhere: tuple[str, ...] = ()
) -> tuple[int, dict, str]:
    """The segment whose bytes, less the ``elsewhere`` labels, are the most: (those bytes,
    them by label, its name)."""
    best: tuple[int, dict, str] = (-1, {}, "")
    for name, (_, by) in segments.items():
        here = {label: n for label, n in by.items() if label not in elsewhere}
        total = sum(here.values())
        if total > best[0]:
            best = (total, here, name)
    return best


def ensure_fake_world(world: int) -> None:
    """A fake process group of ``world`` ranks (this process is rank 0): collectives return
    tensors of the right shapes and move nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError("the planner runs in a process without a real process group")
        if dist.get_world_size() == world:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


@contextlib.contextmanager
def _first_rows_supervised(count: int | None) -> Iterator[None]:
    """The chunked loss keeps the supervised rows with a ``nonzero`` fake tensors cannot size:
    for the trace, the first ``count`` rows (all when None), gathered as the real code does."""
    import longtune.model.loss as loss

    real = loss.supervised_rows

    def rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim = hidden.shape[-1]
        hidden, labels = hidden.reshape(-1, dim), labels.reshape(-1)
        if count is None or count >= labels.numel():
            return hidden, labels
        keep = torch.arange(count, device=hidden.device)
        return hidden.index_select(0, keep), labels.index_select(0, keep)

    loss.supervised_rows = rows
    try:
        yield
    finally:
        loss.supervised_rows = real


@contextlib.contextmanager
def _few_loss_chunks(tracker: MemoryTracker) -> Iterator[None]:
    """The chunked loss runs its first two chunks and its last; the FLOPs of the others are
    the second's, counted as many times. Memory is the same: each chunk frees what it made
    and writes its gradients in place into buffers made before the first, so every chunk but
    the last (which may be shorter) is the second again. A loss over 64K rows of a 128K
    vocabulary is 64 chunks: most of a trace at small SP degrees."""
    import longtune.model.loss as loss

    real = loss.chunk_starts

    def starts(n: int, chunk_size: int) -> Iterator[int]:
        every = real(n, chunk_size)
        if len(every) <= 3:
            yield from every
            return
        yield every[0]
        before = tracker.flops  # the first chunk is done when the second starts
        yield every[1]
        tracker.flops += (tracker.flops - before) * (len(every) - 3)
        yield every[-1]

    loss.chunk_starts = starts
    try:
        yield
    finally:
        loss.chunk_starts = real


def trace_step(
    args: ModelArgs,
    layout: Layout,
    *,
    world: int,
    context: int,
    n_layers: int,
    param_dtype: torch.dtype | None,
    lora: object | None = None,
    supervised: float = 1.0,
    documents: int = 1,
    gloo: bool = False,
) -> StepTrace:
    """Trace one optimizer step of rank 0 (see the module docstring).

    Args:
        args: the model's shape (its ``n_layers`` is replaced by ``n_layers``).
        layout: SP degree, checkpointing, tiled MLP, micro-batch (the offloads are not traced:
            :mod:`longtune.plan.planner` derives them from this trace).
        world: ranks of the run (the fake process group's size).
        context: tokens per sequence (``data.context_length``), divisible by ``layout.sp``.
        n_layers: blocks to build.
        param_dtype: compute dtype of the gathered parameters (None: float32, and no FSDP on
            one rank, as the trainer does on CPU).
        lora: a :class:`~longtune.model.lora.LoraSpec`, or None for full fine-tuning.
        supervised: share of the tokens that carry a loss.
        documents: documents per sequence (equal lengths).
        gloo: the run's backend is gloo (CPU): count the copy its reduce-scatter makes.

    Returns:
        The :class:`StepTrace` of a step with the optimizer state made (every step but a
        run's first).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        model = _parallel_model(args, layout, world, n_layers, param_dtype, lora)
        local = context // layout.sp
        tokens = layout.micro_batch * local
        cu = None
        if documents > 1:  # equal documents over the micro-batch (a real tensor: sized now)
            total = layout.micro_batch * context
            cu = torch.linspace(0, total, documents + 1).round().to(torch.int32)
        count = None if supervised >= 1 else max(1, int(tokens * supervised))
        with FakeTensorMode(allow_non_fake_inputs=True), _first_rows_supervised(count):
            model.to_empty(device="cpu")
            model.init_buffers(device="cpu")
            model.tie_weights()
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)  # the trainer's: in place
            ids = torch.zeros(layout.micro_batch, local, dtype=torch.long)
            pos = torch.arange(local).expand(layout.micro_batch, local)
            labels = torch.zeros(layout.micro_batch, local, dtype=torch.long)
            make_optimizer_state(opt, trainable)
            tracker = tracked_step(
                model, opt, ids, pos, labels, cu, few_loss_chunks=True, gloo=gloo
            )
        elem = (param_dtype or torch.float32).itemsize
        return StepTrace(
            n_layers=n_layers,
            peak=tracker.peak,
            segments=tracker.segments,
            flops=float(tracker.flops),
            largest=tracker.largest,
            kept_block_inputs=tokens * args.dim * elem,
            block_shard_bytes=sum(_local_bytes(p) for p in model.layers["0"].parameters()),
        )
    finally:  # no fake process group is left behind (a forked or later real one would clash)
        if dist.is_initialized() and dist.get_backend() == "fake":
            dist.destroy_process_group()


def _local_bytes(p: torch.Tensor) -> int:
    local = p._local_tensor if hasattr(p, "_local_tensor") else p
    return local.numel() * local.element_size()


def make_optimizer_state(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """The optimizer's state, as after a run's first step (zero gradients, one step)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def tracked_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ids: torch.Tensor,
    pos: torch.Tensor,
    labels: torch.Tensor,
    cu: torch.Tensor | None = None,
    few_loss_chunks: bool = False,
    gloo: bool = False,
) -> MemoryTracker:
    """One training step (forward with the loss, backward, optimizer step) under a
    :class:`MemoryTracker`, counted the planner's way: parameters, optimizer state and the
    micro-batch held, segments by block, reference cycles collected at segment starts. The
    same on fake tensors (:func:`trace_step`) and on real ones (the benchmarks and tests that
    check the planner against a real step).

    Args:
        few_loss_chunks: run three of the chunked loss's chunks (see :func:`_few_loss_chunks`).
        gloo: count gloo's copy of each reduce-scatter input (see :class:`MemoryTracker`).

    Returns:
        The tracker, with the step's peak, segments and FLOPs.
    """
    if hasattr(model, "_get_fsdp_state"):
        # FSDP2 re-lays each parameter shard into a padded buffer at its first forward (the old
        # storage freed): done before counting, or the parameters count twice, the new buffers
        # as made in the forward pass.
        model._get_fsdp_state()._lazy_init()
    gc.collect()  # the garbage of building the model is not the step's
    # What exists now is not the step's either: frozen, the collections at every segment start
    # look only at what the step makes (a full collection of the process took 28% of a trace).
    gc.freeze()
    tracker = MemoryTracker(gloo=gloo)
    tracker.hold(model.parameters(), "parameters")
    tracker.hold((t for st in opt.state.values() for t in st.values()), "optimizer")
    tracker.hold((ids, pos, labels), "inputs")
    try:
        chunks = _few_loss_chunks(tracker) if few_loss_chunks else contextlib.nullcontext()
        with tracker, _segments(model, tracker), chunks:
            loss = model(ids, position_ids=pos, cu_seqlens=cu, labels=labels)
            tracker.phase = "backward"
            loss.backward()
            gc.collect()
            grads = (p.grad for p in model.parameters() if p.grad is not None)
            tracker.relabel(grads, "gradients")
            tracker.phase, tracker.segment = "optimizer step", "optimizer"
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        gc.unfreeze()
    return tracker


def _parallel_model(
    args: ModelArgs,
    layout: Layout,
    world: int,
    n_layers: int,
    param_dtype: torch.dtype | None,
    lora: object | None,
) -> Transformer:
    """The model of ``n_layers`` blocks on the meta device, with LoRA and the trainer's
    ``parallelize`` over a fake process group of ``world`` ranks."""
    from longtune.model.lora import add_lora, freeze_base_dtype
    from longtune.parallel.dims import ParallelDims
    from longtune.parallel.parallelize import parallelize

    ensure_fake_world(world)
    dims = ParallelDims.build(
        world, layout.sp, -1, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads
    )
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(args, n_layers=n_layers))
        if lora is not None:
            add_lora(model, lora)
            freeze_base_dtype(model, param_dtype or torch.float32)
    levers = {"tiled_mlp": True} if layout.tiled_mlp else {}
    parallelize(model, dims.build_mesh("cpu"), layout.ac, param_dtype=param_dtype, **levers)
    return model


@contextlib.contextmanager
def _segments(model: Transformer, tracker: MemoryTracker) -> Iterator[None]:
    """Name the tracker's segments from the blocks' hooks: a block's forward; the loss after
    the last one; a block's backward from when its output's gradient is ready; the tail
    (embedding and root) once the first block's input gradient is."""
    blocks = list(model.layers.values())
    last = len(blocks) - 1

    params = list(model.parameters())

    def enter(name: str) -> None:
        # Python frees reference cycles (autograd's, FSDP's) when its collector runs, which
        # would make the trace depend on when that happens: collected at every segment's
        # start instead, with the automatic collector off (see trace_step).
        gc.collect()
        # The parameters' gradients made so far (FSDP's reduce-scattered shards) are told
        # apart: with FSDP's CPU offload they live on the host. Seen here, a block late at most.
        tracker.relabel((p.grad for p in params if p.grad is not None), "gradients")
        tracker.segment = name

    def set_segment(name: str):  # noqa: ANN202
        def hook(*_: object) -> None:
            enter(name)

        return hook

    handles = []
    for i, block in enumerate(blocks):
        where = "first" if i == 0 else "last" if i == last else "mid"
        bwd = {"first": "bwd_last", "last": "bwd_first", "mid": "bwd_mid"}[where]

        def pre(module, args, fwd=f"fwd_{where}", i=i):  # noqa: ANN001, ANN202
            enter(fwd)
            if i == 0 and args and torch.is_tensor(args[0]) and args[0].requires_grad:
                args[0].register_hook(set_segment("tail"))

        def post(module, args, out, bwd=bwd, i=i):  # noqa: ANN001, ANN202
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(set_segment(bwd))
            if i == last:
                enter("loss")

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if collecting:
            gc.enable()
