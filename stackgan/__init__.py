"""StackGAN-HPC: text-to-bird StackGAN trained from webdataset shards with Accelerate."""

__version__ = "0.1.0"
