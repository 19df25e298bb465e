"""Throughput and MFU: achieved training FLOP/s against the device's dense peak for the precision in use."""

from __future__ import annotations

import resource
import sys

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from vendor datasheets; fp32 means plain fp32 (no TF32).
# Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def peak_flops(device: torch.device, precision: str, cpu_peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU, or None when unknown (MFU is then left empty rather than guessed)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_TFLOPS:
            if key in name:
                tf = table.get(precision)
                return tf * 1e12 if tf else None
        return None
    return cpu_peak_tflops * 1e12 if cpu_peak_tflops else None


def mfu(flops_per_token: int, tokens_per_sec: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: (flops/token x tokens/s) / peak FLOP/s."""
    if not peak or tokens_per_sec <= 0:
        return None
    return flops_per_token * tokens_per_sec / peak


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
