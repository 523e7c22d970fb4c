"""What the planner knows of devices and models without touching them: documented constants.

Devices: memory as ``torch.cuda.mem_get_info()`` reports the whole card (what an allocator can
ever hold), dense bf16 tensor-core throughput, HBM bandwidth, and the links the collectives
and offload use. Sources: NVIDIA's data sheets (H100 SXM5, H200 SXM, A100 SXM4 40/80 GB, L40S);
the byte counts are the totals PyTorch reports on those cards. Link speeds are per GPU and per
direction: NVLink 4 (H100/H200) 450 GB/s, NVLink 3 (A100) 300 GB/s, PCIe 4 x16 (L40S) 25 GB/s;
between nodes one 400 Gb/s NIC per GPU (NDR InfiniBand, 50 GB/s) on H100/H200 and 200 Gb/s
(HDR, 25 GB/s) on A100/L40S; host links PCIe 5 x16 (~55 GB/s) on H100/H200, PCIe 4 (~25
GB/s) on the others. Host memory is a node's, shared by its GPUs: DGX H100 and DGX H200 2 TB,
DGX A100 2 TB (80 GB cards) and 1 TB (40 GB cards), per NVIDIA's data sheets; for L40S, 1 TB is
assumed (servers vary). ``--host-memory`` gives a node's own.

Models: the shapes of the published Hugging Face configs (``config.json``) of each preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One accelerator (or this machine's CPU) as the planner sees it."""

    name: str
    memory: int
    """Bytes an allocator can hold on one device."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    hbm_gbs: float
    """Memory bandwidth, GB/s."""
    intra_node_gbs: float
    """Per-GPU bandwidth to the other GPUs of its node, per direction, GB/s."""
    inter_node_gbs: float
    """Per-GPU bandwidth to other nodes, per direction, GB/s."""
    host_gbs: float
    """Device <-> pinned host memory, per direction, GB/s (activation offload)."""
    cuda: bool = True
    host_memory: int = 0
    """Host memory of one node, bytes, shared by its GPUs (0: not checked)."""


TIB = 2**40

DEVICES: dict[str, Device] = {
    "h100-80": Device("h100-80", 85_045_870_592, 989.0, 3350.0, 450.0, 50.0, 55.0, True, 2 * TIB),
    "h200-141": Device(
        "h200-141", 150_754_820_096, 989.0, 4800.0, 450.0, 50.0, 55.0, True, 2 * TIB
    ),
    "a100-80": Device("a100-80", 85_051_572_224, 312.0, 2039.0, 300.0, 25.0, 25.0, True, 2 * TIB),
    "a100-40": Device("a100-40", 42_505_273_344, 312.0, 1555.0, 300.0, 25.0, 25.0, True, TIB),
    "l40s-48": Device("l40s-48", 47_697_362_944, 362.0, 864.0, 25.0, 25.0, 25.0, True, TIB),
    # This machine's CPU: memory is what is available when the plan is made (see
    # cpu_device()); throughput is a rough 2-core figure, used only for ordering layouts.
    "cpu": Device("cpu", 0, 0.1, 20.0, 10.0, 10.0, 10.0, cuda=False),
}

HOST_ADAMW_PARAMS_PER_S = 1.0e9
"""Parameters per second that PyTorch's fused CPU AdamW updates for one GPU's shard with FSDP2's
CPU offload (the step then runs on the host). Measured: 434M/s on this project's 2-core VM
(float32, 50M parameters, 2 threads, the machine busy), about 217M per core; the 8 host cores a
GPU of a typical 8-GPU server has would do ~1.7e9 if memory bandwidth allows: 1e9 assumed."""

HOST_HEADROOM = 0.10
"""Share of a node's host memory left to everything but the offloaded tensors: the OS, each
rank's own process (Python, PyTorch, the CUDA driver's host side, the data loader). Assumed."""

MFU = 0.45
"""Share of the bf16 peak a training step's matmuls reach (torchtitan's published Llama 3 8B
runs on H100 reach 38-50% MFU with FSDP2 and selective checkpointing)."""


def cpu_device() -> Device:
    """The ``cpu`` preset with this machine's available memory (``MemAvailable``)."""
    return Device(**{**DEVICES["cpu"].__dict__, "memory": meminfo("MemAvailable")})


def meminfo(field: str) -> int:
    """A ``/proc/meminfo`` figure in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _llama(hidden: int, layers: int, heads: int, kv: int, ffn: int, **kw: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    }
    return {**cfg, **kw}


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _llama(
        576,
        30,
        9,
        3,
        1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": _llama(
        2048,
        16,
        32,
        8,
        8192,
        tie_word_embeddings=True,
        head_dim=64,
        rope_scaling={
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    ),
    "llama-3.2-3b": _llama(
        3072,
        28,
        24,
        8,
        8192,
        tie_word_embeddings=True,
        head_dim=128,
        rope_scaling={
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    ),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336),
    "llama-3.1-70b": _llama(8192, 80, 64, 8, 28672),
    "llama-3.1-405b": _llama(16384, 126, 128, 8, 53248),
}
