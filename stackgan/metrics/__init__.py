"""Metrics for generators: a registry, runnable on all ranks, results appended to JSONL.

    from stackgan.metrics import EvalContext, compute
    ctx = EvalContext.from_export(info, shards="shards/birds-embedded")   # once
    compute("judge_consistency,judge_fd,diversity", G, ctx, step=step, jsonl=run_dir / "metrics.jsonl")

Registered metrics: ``judge_consistency``, ``judge_fd``, ``diversity``, ``judge_diversity``
(:mod:`.scores`; the attribute judges in :mod:`.judges`),
``fid_inception`` (FID with the FID Inception, :mod:`.fid_inception`), ``inception_score``,
``fid`` (torchvision's Inception, monitoring; :mod:`.inception`), and for
stage II ``stage2_consistency``, ``stage2_fd``, ``fd256``, ``sharpness`` (:mod:`.stage2`,
256-px detail net and sharpness in :mod:`.detail`). Add
one with ``@register("name")`` on a function ``fn(G, ctx) -> dict`` (and what it needs with
``@requirement``); metrics measuring the same images share a pass (``GenerationPasses``). The
built-in metric modules are imported on first use of :func:`compute`, :func:`get` or :func:`names`.

Measuring nets (judges, detail net, Inceptions) are cached and read by :mod:`.netcache`; the
folder: :mod:`.core` (registry, context, generation), :mod:`.scores`, :mod:`.inception`,
:mod:`.stage2` (registered metrics), :mod:`.judges`, :mod:`.detail`, :mod:`.fid_inception`
(measuring nets), :mod:`.evalset`, :mod:`.captions`, :mod:`.redraw`, :mod:`.stats` (their parts).
"""
from .core import (EvalContext, GenerationPasses, MetricError, all_sum, append_jsonl, check, compute, generate, get,
                   my_batches, names, rank_world, register, requirement, resolve_device)

__all__ = ["EvalContext", "GenerationPasses", "MetricError", "all_sum", "append_jsonl", "check", "compute", "generate",
           "get", "my_batches", "names", "rank_world", "register", "requirement", "resolve_device"]
