"""Slurm through submitit: training jobs that requeue themselves, the stage I -> II chain, sweeps.

The launchers in ``jobs/`` are thin wrappers around the ``*_main`` functions of :mod:`.cli`;
the sbatch scripts in ``slurm/`` call ``python -m stackgan.cluster resolve`` to check a config
before any rank starts. Cluster parameters (partition, GPUs, time, setup lines) come from one
YAML file, ``jobs/cluster.yaml`` (:class:`.settings.ClusterConfig`).

Process layout, as in ``slurm/*.sh``: one Slurm task per GPU (one per node without GPUs); every
task runs the trainer in-process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
taken from Slurm. On preemption or time-out Slurm sends submitit's signal (USR2 by default) to
every task: the trainer saves a checkpoint at the next step boundary, then hands over to
submitit, which calls :meth:`.jobs.TrainJob.checkpoint` and requeues the job; the job resumes
from the newest complete checkpoint in its run folder (``--resume auto``).

The pieces:

* :mod:`.settings` -- ``jobs/cluster.yaml`` and the submitit parameters of one job;
* :mod:`.jobs`     -- the job callables submitit pickles and runs on the nodes (training,
                      a command, a sweep's summary), and the config check they start from;
* :mod:`.submit`   -- submitting a plan of jobs with dependencies, waiting, the outcome table;
* :mod:`.plans`    -- the stage I -> stage II chain and sweeps (a grid as one job array);
* :mod:`.summary`  -- a sweep's outcome per point (``summary.md``, ``summary.csv``);
* :mod:`.cli`      -- the command lines: ``jobs/*.py`` and ``python -m stackgan.cluster``.
"""
