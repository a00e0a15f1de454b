"""Training-throughput benchmark: our StackGAN step against the original's and the machine's peak.

    python -m stackgan.bench [--device cpu|cuda] [--quick] [--only PARTS] [--out FILE.json]

Everything is measured in one run, on the same machine, because absolute times move by 2x
or more with other load. Each part runs in a fresh worker process (so peak memory is per
part), and inside a worker the steps being compared run **interleaved**, one iteration of
each per round (the order rotates), so that load changes hit all of them alike; ratios are
medians of per-round ratios. The fraction of peak uses the matmul figure measured in the
same worker, just before its timed rounds.

Parts (``--only``, comma separated; default: all):

* ``check``    -- the original step and ours give the same losses on the same weights/inputs;
* ``peak``     -- the machine's own matmul (4096^2 on CPU, 8192^2 on CUDA) and conv fwd+bwd
                  throughput at StackGAN layer sizes: NCHW, channels-last, up-conv rewrite;
* ``stage1`` / ``stage2`` / ``embedded`` -- seconds per iteration, images/s, FLOPs per
                  iteration (``FlopCounterMode``), GFLOP/s and fraction of the matmul figure
                  for the original step, our step (``stackgan.step.gan_step`` + EMA, set up
                  as the trainer does: up-block as one transposed conv, fused Adam,
                  channels-last on large maps) and ``ours-before`` (the trainer's step before
                  those three speed-ups: the before/after in one run);
* ``variants`` -- each speed-up taken away alone, in one worker (stage I b16, stage II b4):
                  plain upsample + conv, channels-last everywhere, foreach Adam, NCHW,
                  for-loop Adam, and no_grad vs inference_mode for the frozen stage-I G;
* ``compile``  -- ``torch.compile`` of G and D (compile time reported), stage I only;
* ``bf16`` (CPU, once) / every precision (CUDA) -- autocast training vs the fp32 original;
* ``procs``    -- 1 process x 2 threads vs 2 DDP (gloo) processes x 1 thread, stage I (CPU);
* ``memory``   -- stage II at the official batch 64: peak RSS (GPU memory) of our step;
* ``data``     -- ``stackgan.bench.data`` (shard stream) next to the trainer's images/s.

The pieces, in the order a run uses them:

* :mod:`.cli`      -- the command line; runs the plan's jobs and writes the report;
* :mod:`.plan`     -- which worker jobs the chosen parts need, and running one in a fresh process;
* :mod:`.workers`  -- what a worker process measures (one function per kind of job);
* :mod:`.cases`    -- network sizes, batches and the synthetic inputs;
* :mod:`.original` -- the baseline: StackGAN-Pytorch's training iteration, op for op;
* :mod:`.ours`     -- the trainer's step and the variants that take one speed-up away;
* :mod:`.measure`  -- timing, FLOPs, peak memory, the matmul and conv peaks;
* :mod:`.report`   -- derived figures (GFLOP/s, fractions of peak, targets), tables, JSON.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding this copy of stackgan (workers import it)
