"""The hardware catalog: one table of GPUs (and a CPU entry for the quickstart), with sources.

Input:  nothing (reference data).
Output: `GPUS`, a read-only mapping from a catalog id (the `cluster { gpu = ... }` value) to a
`HardwareSpec`; `get_gpu(id)` (case-insensitive, tolerant of `-SXM`/`_` spellings).
Invariants / units:
- `peak_tflops[precision]` is the *dense* (no 2:4 sparsity) tensor-core peak in TFLOP/s, keys among
  bf16, fp16, fp8, mxfp8, fp4, tf32, fp32; a precision the generation cannot run is absent.
- `hbm_bytes` is the capacity the driver reports (what an allocator can actually see) where an
  NVIDIA-authored MLPerf system description gives it in MiB, else the marketed capacity in GB (1e9).
- Bandwidths are bytes/s. `nvlink_bw` is *unidirectional* per GPU (half of NVIDIA's bidirectional
  "900 GB/s" for H100), which is what a ring all-reduce step can push one way. `net_bw` is the
  scale-out (InfiniBand) bandwidth per GPU, unidirectional, in bytes/s (400 Gb/s = 50e9 B/s).
- `nvlink_domain` is how many GPUs share one NVLink/NVSwitch domain (8 on HGX, 72 on NVL72 racks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

GB = 1_000_000_000
MIB = 1 << 20
GIB = 1 << 30


# The training precisions (the language's `precision`) and the datasheet peak each one runs at.
TRAINING_PRECISIONS = ("bf16", "fp16", "fp32", "fp8", "mxfp8", "nvfp4")
_PEAK_KEY = {"nvfp4": "fp4"}  # NVFP4 GEMMs run on the FP4 tensor cores


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    id: str
    generation: str  # ampere | hopper | blackwell | cpu
    peak_tflops: Mapping[str, float]  # dense, per GPU
    hbm_bytes: int
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s, unidirectional, per GPU
    nvlink_domain: int  # GPUs per NVLink domain
    net_bw: float  # bytes/s, unidirectional, per GPU (scale-out NIC)
    source: str = ""

    def peak(self, precision: str) -> float:
        """Dense peak in FLOP/s for a training precision (bf16/fp16/fp8/mxfp8/nvfp4/fp32). fp32 means
        plain FP32 (PyTorch leaves TF32 matmuls off by default); nvfp4 runs at the datasheet's dense FP4
        rate. KeyError if unsupported: check `supports`."""
        return self.peak_tflops[_PEAK_KEY.get(precision, precision)] * 1e12

    def supports(self, precision: str) -> bool:
        """FP8 needs Hopper or newer; MXFP8 and NVFP4 (FP4) need Blackwell (Transformer Engine rules)."""
        return _PEAK_KEY.get(precision, precision) in self.peak_tflops


def _peaks(**kw: float) -> Mapping[str, float]:
    return MappingProxyType(dict(kw))


_A100_SRC = ("NVIDIA A100 datasheet (312 TF dense BF16/FP16, 156 TF TF32, 19.5 TF FP32; NVLink 3 600 GB/s "
             "bidirectional), as cited by glennklockwood.com/garden/processors/A100 and stas00/ml-engineering; "
             "8x ConnectX-6 HDR 200 Gb/s per DGX A100: MLCommons training_results_v2.0 NVIDIA "
             "dgxa100_n8_ngc22.04_pytorch.json; 312 TF cross-checked by Narayanan et al. 2021 (163 TF = 52 %)")
_H100_SRC = ("NVIDIA H100 SXM5 datasheet (989.4 TF dense BF16, 1978.9 TF FP8, 494.7 TF TF32, 66.9 TF FP32; "
             "3.35 TB/s HBM3; NVLink 4 900 GB/s bidirectional); 81,559 MiB and 8x ConnectX-7 NDR 400 Gb/s: "
             "MLCommons training_results_v4.0 NVIDIA eos_n64_ngc24.04_nemo.json")
_H200_SRC = ("NVIDIA H200 datasheet (same tensor peaks as H100, 4.8 TB/s HBM3e); 143,771 MiB, NVLink 900 GB/s, "
             "ConnectX-7 400 Gb/s: MLCommons training_results_v4.0 NVIDIA h200_ngc24.04_nemo.json")
_B200_SRC = ("NVIDIA HGX B200 datasheet (8 GPUs: 36 PF BF16, 72 PF FP8, 144 PF FP4 with sparsity -> dense per GPU "
             "2.25 / 4.5 / 9 PF); 180 GB HBM3e: MLCommons inference_results_v4.1 NVIDIA B200-SXM-180GBx1_TRT.json; "
             "NVLink 5 1.8 TB/s bidirectional; 8 TB/s HBM (stas00/ml-engineering; another page gives 7.7 TB/s)")
_B300_SRC = ("NVIDIA HGX B300 datasheet (8 GPUs: 36 PF BF16, 72 PF FP8, 108 PF dense FP4 -> per GPU 2.25 / 4.5 / 13.5 "
             "PF dense); capacity 270 GB as in the Dell MLPerf system name B300-SXM-270GB (NVIDIA markets 288 GB; "
             "we use the smaller, usable figure); NVLink 5 1.8 TB/s; ConnectX-8 800 Gb/s per GPU")
_GB200_SRC = ("NVIDIA GB200 NVL72 datasheet (rack: 360 PF BF16, 720 PF FP8, 1440 PF FP4 with sparsity -> dense per GPU "
              "2.5 / 5 / 10 PF); 189,471 MiB, NVLink 5 1.8 TB/s, 1x ConnectX-7 400 Gb/s per GPU: MLCommons "
              "training_results_v5.1 NVIDIA tyche_ngpu72_ngc25.09_nemo.json")
_GB300_SRC = ("NVIDIA GB300 NVL72 datasheet (rack: 360 PF BF16, 720 PF FP8 -> dense per GPU 2.5 / 5 PF; 15 PF dense FP4); "
              "284,208 MiB, NVLink 5 1.8 TB/s, ConnectX-8 800 Gb/s: MLCommons training_results_v5.1 NVIDIA "
              "theia_ngpu8_ngc25.09_nemo.json")

_ALL: tuple[HardwareSpec, ...] = (
    HardwareSpec("A100-40GB", "ampere", _peaks(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
                 40 * GIB, 1555 * GB, 300 * GB, 8, 25 * GB, _A100_SRC),
    HardwareSpec("A100-80GB", "ampere", _peaks(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
                 80 * GIB, 2039 * GB, 300 * GB, 8, 25 * GB, _A100_SRC),
    HardwareSpec("H100", "hopper", _peaks(bf16=989.4, fp16=989.4, fp8=1978.9, tf32=494.7, fp32=66.9),
                 81_559 * MIB, 3350 * GB, 450 * GB, 8, 50 * GB, _H100_SRC),
    HardwareSpec("H200", "hopper", _peaks(bf16=989.4, fp16=989.4, fp8=1978.9, tf32=494.7, fp32=66.9),
                 143_771 * MIB, 4800 * GB, 450 * GB, 8, 50 * GB, _H200_SRC),
    HardwareSpec("B200", "blackwell",
                 _peaks(bf16=2250.0, fp16=2250.0, fp8=4500.0, mxfp8=4500.0, fp4=9000.0, tf32=1125.0, fp32=75.0),
                 180 * GB, 8000 * GB, 900 * GB, 8, 50 * GB, _B200_SRC),
    HardwareSpec("B300", "blackwell",
                 _peaks(bf16=2250.0, fp16=2250.0, fp8=4500.0, mxfp8=4500.0, fp4=13500.0, tf32=1125.0, fp32=75.0),
                 270 * GB, 8000 * GB, 900 * GB, 8, 100 * GB, _B300_SRC),
    HardwareSpec("GB200", "blackwell",
                 _peaks(bf16=2500.0, fp16=2500.0, fp8=5000.0, mxfp8=5000.0, fp4=10000.0, tf32=1250.0, fp32=80.0),
                 189_471 * MIB, 8000 * GB, 900 * GB, 72, 50 * GB, _GB200_SRC),
    HardwareSpec("GB300", "blackwell",
                 _peaks(bf16=2500.0, fp16=2500.0, fp8=5000.0, mxfp8=5000.0, fp4=15000.0, tf32=1250.0, fp32=80.0),
                 284_208 * MIB, 8000 * GB, 900 * GB, 72, 100 * GB, _GB300_SRC),
    # The CPU quickstart (torch.distributed over gloo on one host). NOT a hardware datasheet: a modest,
    # round figure for a few x86 cores running bf16/fp32 matmuls (~0.2 TFLOP/s), 16 GiB of RAM, DRAM
    # bandwidth ~20 GB/s, "NVLink" = shared memory between local ranks (~5 GB/s), 10 Gb/s network.
    HardwareSpec("CPU", "cpu", _peaks(bf16=0.2, fp16=0.2, fp32=0.2),
                 16 * GIB, 20 * GB, 5 * GB, 64, 1.25 * GB,
                 "nemoc CPU quickstart: illustrative figures for a small x86 host, not a measured peak"),
)

GPUS: Mapping[str, HardwareSpec] = MappingProxyType({g.id: g for g in _ALL})

_ALIASES = {"A100": "A100-80GB", "A100-80G": "A100-80GB", "A100-40G": "A100-40GB", "H100-SXM": "H100",
            "H100-80GB": "H100", "H200-SXM": "H200", "B200-SXM": "B200"}


def get_gpu(gpu_id: str) -> HardwareSpec | None:
    """The catalog entry for `gpu_id` (case-insensitive; `_` and `-` are equivalent), or None."""
    key = gpu_id.strip().upper().replace("_", "-")
    key = _ALIASES.get(key, key)
    return GPUS.get(key)
