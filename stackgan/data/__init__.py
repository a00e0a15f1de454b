"""Data: CUB/StackGAN layout reader, embedded bird set, shard preparation, training stream."""
