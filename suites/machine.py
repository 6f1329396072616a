"""A record of the machine a suite ran on, stored beside its results."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from algm.measure.allocator import POLICY


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi, else /proc), None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    try:
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        return match.group(1) if match else None
    except OSError:
        return None


def machine_record(device: str = "cpu") -> dict:
    """CPU, versions and, on a CUDA device, the GPU facts a GPU figure depends on (GPU
    fields None on CPU; ``cuda`` is the CUDA version torch was built with)."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    props = torch.cuda.get_device_properties(torch.device(device)) if cuda else None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_allocator": POLICY,  # how CPU forwards are timed (algm.measure.allocator)
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if cuda else None,
        "compute_capability": f"{props.major}.{props.minor}" if cuda else None,
        "driver": nvidia_driver() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
