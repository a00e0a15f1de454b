"""StackGAN-HPC: text-to-bird StackGAN trained from webdataset shards with Accelerate."""

__version__ = "0.1.0"

import os as _os

# Idle OpenMP threads sleep instead of spinning (must precede torch's import). On a shared
# or busy machine spinning threads made small CPU networks 10-30x slower; set
# OMP_WAIT_POLICY=ACTIVE yourself to opt out.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
