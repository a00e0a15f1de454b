"""Run ``python -m stackgan.train`` with DeepSpeed's CPU accelerator claiming fp16 support.

DeepSpeed trains fp16 only where its accelerator says it can (any CUDA GPU; on a CPU only
with AVX512-FP16), and the trainer falls back to fp32 elsewhere. PyTorch itself runs fp16
convolutions, BatchNorm and autocast on any CPU, slowly, so on a CPU-only machine the fp16
engines (fp16 weights, fp32 master copy, a loss scaler each) can still be exercised end to
end: this launcher flips the capability flag, then runs the trainer exactly as its CLI does.

    python tests/ds_fp16_cpu.py --config ... train.backend=deepspeed train.mixed_precision=fp16
"""
import runpy
import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True
sys.argv = ["stackgan.train", *sys.argv[1:]]
runpy.run_module("stackgan.train", run_name="__main__")
