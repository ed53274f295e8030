"""Turn the hardware group (which may say `auto`) into concrete device, dtype and switches."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import re
import time
from dataclasses import dataclass

import torch

from nanogpt.config import DType, Device, HardwareConfig
from nanogpt.errors import ConfigError

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s with fp32 accumulation, as PyTorch's
# matmuls run them, by the GPU's model as `gpu_model` reads it out of torch.cuda.get_device_name().
# The key is the whole model, not a substring of the name: "H100" does not catch "H100 PCIe",
# "L40" does not catch "L40S", nor "A10" the "A10G" (AWS's part, for which NVIDIA publishes no
# figure), nor "RTX 3090" the "RTX 3090 Ti" or "RTX 4090" a laptop part. A GPU not listed is
# reported as unknown (once) rather than given a neighbour's number. Datasheets print the
# sparse figure too, twice the dense one: the dense one is the one training can reach.
GPU_PEAK_FLOPS = {
    # NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe alike
    ("A100",): 312e12,
    ("A100", "PCIE"): 312e12,
    ("A800",): 312e12,  # NVIDIA A800 datasheet: the A100's compute, with a slower NVLink
    ("A800", "PCIE"): 312e12,
    # NVIDIA H100 Tensor Core GPU datasheet: BF16/FP16 Tensor Core (1,979 | 1,513 | 1,671 TFLOPS with sparsity)
    ("H100",): 989e12,  # H100 SXM ("NVIDIA H100 80GB HBM3"); the Hopper whitepaper gives 989.4
    ("H100", "PCIE"): 756e12,
    ("H100", "NVL"): 835e12,
    # NVIDIA H200 Tensor Core GPU datasheet: the H100's tensor cores, more memory (1,979 | 1,671 with sparsity)
    ("H200",): 989e12,  # H200 SXM
    ("H200", "NVL"): 835e12,
    ("GH200",): 989e12,  # NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 SXM's figure
    # NVIDIA L4 Tensor Core GPU datasheet: BF16/FP16 Tensor Core 242 TFLOPS with sparsity
    ("L4",): 121e12,
    # NVIDIA L40S datasheet: BF16/FP16 Tensor Core 362.05 TFLOPS (733 with sparsity)
    ("L40S",): 362e12,
    # NVIDIA L40 datasheet: BF16/FP16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)
    ("L40",): 181e12,
    # NVIDIA A10 Tensor Core GPU datasheet: BF16/FP16 Tensor Core 125 TFLOPS (250 with sparsity)
    ("A10",): 125e12,
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A: GeForce RTX 3090, peak BF16/FP16
    # tensor TFLOPS with FP32 accumulate 71 (142 with sparsity; FP16 accumulate, which PyTorch does not use, 142)
    ("RTX", "3090"): 71e12,
    # NVIDIA Ada GPU Architecture whitepaper, appendix A: GeForce RTX 4090, peak BF16/FP16 tensor
    # TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity)
    ("RTX", "4090"): 165e12,
    # NVIDIA Ampere GA102 GPU Architecture whitepaper v2, appendix C: RTX A6000, BF16/FP16 tensor TFLOPS
    # with FP32 accumulate 154.8 (309.7 with sparsity)
    ("RTX", "A6000"): 155e12,
    # NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 36 PFLOPS with sparsity for 8 GPUs, 2.25 dense per GPU
    ("B200",): 2250e12,
    # NVIDIA V100 datasheet: Tensor Performance (FP16; V100 has no bf16) 125 TFLOPS (SXM2), 112 (PCIe)
    ("V100",): 125e12,
    ("V100", "PCIE"): 112e12,
    # NVIDIA T4 datasheet: Mixed Precision (FP16/FP32) 65 TFLOPS
    ("T4",): 65e12,
}

# Words of a device name that do not tell one model's peak from another's: the vendor, the
# brand, the memory size or kind, and SXM (the form factor the bare model name means).
_NAME_NOISE = re.compile(r"NVIDIA|GEFORCE|TESLA|\d+GB|HBM\d*E?|SXM\d*")


@dataclass
class Hardware:
    device: str  # "cpu", "cuda", "cuda:0", "mps"
    dtype: torch.dtype  # autocast dtype (float32: no autocast)
    compile: bool
    peak_flops: float | None  # per device, for MFU; None until measured (train.build_training)
    peak_from: str = "measured"  # where peak_flops comes from: "datasheet", "hardware.peak_flops" or "measured"

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

    deterministic = cfg.deterministic if cfg.deterministic is not None else device == Device.cpu
    if deterministic:
        # a GPU needs this set before cuBLAS starts to give deterministic matmuls
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op with no deterministic kernel warns instead of stopping the run
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    compile_model = cfg.compile if cfg.compile is not None else device == Device.cuda
    if compile_model and device == Device.cpu and cpp_compiler() is None:
        _warn_no_cpp_compiler()
        compile_model = False
    peak, peak_from = cfg.peak_flops, "hardware.peak_flops"
    if peak is None and device == Device.cuda:
        peak, peak_from = datasheet_peak_flops(torch.cuda.get_device_name()), "datasheet"
    return Hardware(device=device.value, dtype=torch_dtype, compile=compile_model, peak_flops=peak,
                    peak_from=peak_from if peak is not None else "measured")


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


def gpu_model(name: str) -> tuple[str, ...]:
    """The words of a CUDA device name that name the model: "NVIDIA H100 80GB HBM3" -> ("H100",),
    "NVIDIA A100-SXM4-40GB" -> ("A100",), "NVIDIA GeForce RTX 3090 Ti" -> ("RTX", "3090", "TI")."""
    words = re.split(r"[\s_-]+", name.upper())
    return tuple(word for word in words if word and not _NAME_NOISE.fullmatch(word))


def gpu_peak_flops(name: str) -> float | None:
    """The dense bf16/fp16 peak FLOP/s of a CUDA device by its name, or None for a GPU the table
    does not hold (GPU_PEAK_FLOPS says why it matches whole models)."""
    return GPU_PEAK_FLOPS.get(gpu_model(name))


def datasheet_peak_flops(name: str) -> float | None:
    """gpu_peak_flops, and for a GPU the table does not hold one line, once a process (preflight and
    the loop both resolve the hardware group), that says so: its MFU is then against its measured
    matmul rate, which reads high beside other GPUs' datasheet MFU."""
    peak = gpu_peak_flops(name)
    if peak is None:
        _warn_unknown_gpu(name)
    return peak


@functools.cache
def _warn_unknown_gpu(name: str) -> None:
    log.warning(f"GPU {name!r} is not in nanogpt's table of peak FLOP/s: MFU is reported against its measured "
                f"matmul rate, not its datasheet peak; set hardware.peak_flops=<its dense bf16 FLOP/s> "
                f"(e.g. 312e12 for an A100) for MFU comparable across GPUs")


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
    sync = torch.get_device_module(device.split(":")[0]).synchronize  # waits for a GPU; a no-op on a CPU
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
        if iterations == 1:  # one matmul outlasts a trial (half precision emulated on a CPU: seconds each):
            break  # each further trial would be one more such matmul, 5 x 3 s where 0.5 s was meant
    return best


# The best peak measured in this process, per (device, dtype, threads). A local sweep runs its jobs
# one after another in one process (the basic launcher): each job after the first starts 0.5 s
# sooner, at no cost in trust, since a peak is what the device can reach and the best of the
# measurements so far is the truest. Not kept on disk: a file would outlive the load it was
# measured under, and be shared by the different machines of a cluster's home dir.
_best_measured: dict[tuple, float] = {}


def measured_peak_flops(device: str, dtype: torch.dtype, again: bool = False) -> float:
    """measure_peak_flops, once a process (again=True: once more, keeping the higher rate)."""
    key = (device, dtype, torch.get_num_threads())
    if again or key not in _best_measured:
        log.info(f"measuring the peak FLOP/s of {device} for MFU (0.5 s; hardware.peak_flops=<FLOP/s> skips it)")
        _best_measured[key] = max(_best_measured.get(key, 0.0), measure_peak_flops(device, dtype))
    return _best_measured[key]


class MFU:
    """Model FLOPs utilisation as nanogpt-train and nanogpt-bench report it: the model's
    estimate_mfu (its FLOPs per token times tokens/s, over the peak) against hw.peak_flops, and
    never above 100%.

    A value above 100% means the peak is too low. A measured peak is low when the machine was
    busier during the 0.5 s probe than while training (another process took the cores): the
    first reading above 100% therefore measures the peak again, now, and keeps the higher of the
    two (a peak is what the device can reach, so the best measurement is the truest). If a
    reading is still above 100%, or the peak is not measured (a datasheet figure, or
    hardware.peak_flops), it is reported as 100% and flagged `capped`, with one warning that says
    why: a number above 100% is no utilisation at all, and a reader comparing runs must see that
    this one is not comparable. Measuring once more, not at every reading, bounds the cost (0.5 s,
    kept out of the step times by the caller) where the model's own matmuls simply outrun the
    probe's 1024x1024 one."""

    def __init__(self, hw: Hardware, model, seq_len: int, measure=None):
        self.hw, self.model, self.seq_len = hw, model, seq_len
        self.measure = measure or functools.partial(measured_peak_flops, again=True)
        self.remeasured = self.warned = False

    def __call__(self, tokens_per_s: float) -> tuple[float, bool]:
        """(MFU, capped) for tokens_per_s tokens per second trained on this device."""
        mfu = self.model.estimate_mfu(tokens_per_s, self.seq_len, self.hw.peak_flops)
        if mfu > 1 and self.hw.peak_from == "measured" and not self.remeasured:
            self.remeasured = True
            before = self.hw.peak_flops
            self.hw.peak_flops = max(before, self.measure(self.hw.device, self.hw.dtype))
            log.info(f"MFU read {mfu:.0%} of the peak measured at start ({before / 1e12:.3g} TFLOP/s): the machine "
                     f"was likely busier then; measured it again: {self.hw.peak_flops / 1e12:.3g} TFLOP/s from now on")
            mfu = self.model.estimate_mfu(tokens_per_s, self.seq_len, self.hw.peak_flops)
        if mfu <= 1:
            return mfu, False
        if not self.warned:
            self.warned = True
            why = {"measured": "even measured again: this model's matmuls outrun the 1024x1024 probe's, or the "
                               "machine was busy during both measurements",
                   "hardware.peak_flops": "hardware.peak_flops is below what training reaches",
                   "datasheet": "the datasheet peak of the table in nanogpt/parallel/hardware.py is below what "
                                "training reaches: please report it"}[self.hw.peak_from]
            log.warning(f"MFU would read {mfu:.0%} of the {self.hw.peak_from} peak ({self.hw.peak_flops / 1e12:.3g} "
                        f"TFLOP/s): {why}. Values above 100% are reported as 100% and flagged (mfu_capped in "
                        f"metrics.jsonl); set hardware.peak_flops to the device's peak FLOP/s for a fixed reference")
        return 1.0, True
