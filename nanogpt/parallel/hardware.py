"""Turn the hardware group (which may say `auto`) into concrete device, dtype and switches."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch

from nanogpt.config import DType, Device, HardwareConfig
from nanogpt.errors import ConfigError

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peak FLOP/s (without sparsity), by a substring of the device name.
# The first match wins, so more specific names come first.
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


@dataclass
class Hardware:
    device: str  # "cpu", "cuda", "cuda:0", "mps"
    dtype: torch.dtype  # autocast dtype (float32: no autocast)
    compile: bool
    peak_flops: float | None  # None until measured or known

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def use_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        name = torch.cuda.get_device_name() if self.device_type == "cuda" else self.device
        return f"{name}, {str(self.dtype).removeprefix('torch.')}, compile={'on' if self.compile else 'off'}"


def resolve(cfg: HardwareConfig) -> Hardware:
    device = Device(cfg.device)
    if device == Device.auto:
        if torch.cuda.is_available():
            device = Device.cuda
        elif torch.backends.mps.is_available():
            device = Device.mps
        else:
            device = Device.cpu
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("hardware.device=cuda but no CUDA GPU is visible: use hardware=cpu or hardware=auto")
    if device == Device.mps and not torch.backends.mps.is_available():
        raise ConfigError("hardware.device=mps but MPS is not available: use hardware=cpu or hardware=auto")

    dtype = DType(cfg.dtype)
    if dtype == DType.auto:
        if device == Device.cuda:
            # native bf16 only (Ampere and newer): T4/V100 only emulate it, slowly; they get fp16
            dtype = DType.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else DType.float16
        else:
            dtype = DType.float32
    if device == Device.cpu and dtype == DType.bfloat16 and not x86_has_native_bf16():
        _warn_emulated(dtype)
    if device == Device.cpu and dtype == DType.float16 and not x86_has_native_fp16():
        _warn_emulated(dtype)
    torch_dtype = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}[dtype]

    if cfg.cpus_per_process and os.environ.get("SUBMITIT_EXECUTOR"):
        # a job of a launcher uses the cores it reserved: torch's default, every core of the node, makes
        # the jobs sharing a node fight over them (4 jobs on 2 cores ran 16x slower than one)
        torch.set_num_threads(cfg.cpus_per_process)
    if device == Device.cuda:
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32

    compile_model = cfg.compile if cfg.compile is not None else device == Device.cuda
    if compile_model and device == Device.cpu and cpp_compiler() is None:
        _warn_no_cpp_compiler()
        compile_model = False
    peak = cfg.peak_flops
    if peak is None and device == Device.cuda:
        peak = gpu_peak_flops(torch.cuda.get_device_name())
    return Hardware(device=device.value, dtype=torch_dtype, compile=compile_model, peak_flops=peak)


def x86_has_native_bf16() -> bool:
    """False only on an x86 CPU that torch's probes say lacks both avx512_bf16 and AMX. Other CPUs
    (ARM's own bf16 instructions, say), or a torch without the private probes: True, not a wrong warning."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return not all(probes) or any(probe() for probe in probes)


def x86_has_native_fp16() -> bool:
    """Whether an x86 CPU multiplies float16 natively (AMX-FP16, or AVX512-FP16 as /proc/cpuinfo
    lists it); other CPUs (ARM has float16 arithmetic of its own): True."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    amx_fp16 = getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            avx512_fp16 = " avx512_fp16" in cpuinfo.read()
    except OSError:  # not Linux: say nothing rather than warn wrongly
        return True
    return amx_fp16 or avx512_fp16


@functools.cache  # once a process: preflight and the training loop both resolve the hardware group
def _warn_emulated(dtype: DType) -> None:
    short, native = {DType.bfloat16: ("bf16", "avx512_bf16 or AMX"), DType.float16: ("fp16", "avx512_fp16 or AMX-FP16")}[dtype]
    log.warning(f"hardware.dtype={dtype.value} on an x86 CPU without native {short} ({native}): its matmuls "
                "are emulated, usually slower than float32; set hardware.dtype=float32")


@functools.cache
def cpp_compiler() -> str | None:
    """The C++ compiler TorchInductor would build torch.compile's CPU kernels with ($CXX, else
    g++), or None when it finds none. Importing the inductor costs about a second: only asked when
    compile is on for a CPU."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or an inductor that cannot load here: no compiler to use
        return None


@functools.cache
def _warn_no_cpp_compiler() -> None:
    log.warning("hardware.compile: no C++ compiler for torch.compile's CPU kernels (install g++, or point CXX at "
                "one), so this run trains without compiling; set hardware.compile=false to silence this")


def gpu_peak_flops(name: str) -> float | None:
    for key, flops in GPU_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def measure_peak_flops(device: str, dtype: torch.dtype = torch.float32, trials: int = 5, seconds: float = 0.1) -> float:
    """Achieved FLOP/s of a large square matmul: the reference for MFU where no datasheet peak is
    known (CPUs, unlisted GPUs). MFU against it reads as 'fraction of what this device's matmul
    actually reaches'. The best of several short trials, so that a busy machine lowers it less.

    The operands come from a generator of its own: a measurement must not move the RNG streams
    that training draws its dropout masks and batches from (a measured and a given peak_flops
    would otherwise train differently)."""
    n = 1024
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.split(":")[0], lambda: None)
    a @ b  # warm up kernels and caches
    sync()
    best = 0.0
    for _ in range(trials):
        iterations, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            sync()
            iterations += 1
        best = max(best, 2 * n**3 * iterations / (time.perf_counter() - start))
    return best
