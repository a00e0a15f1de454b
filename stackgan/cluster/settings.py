"""The cluster's settings (``jobs/cluster.yaml``) and the submitit parameters of one job."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..config import ConfigError, apply_overrides, update_from_yaml


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU-only nodes
    tasks_per_node: int = 0  # 0 = one per GPU (one per node without GPUs)
    cpus_per_task: int = 8
    mem_gb: float = 0.0  # 0 = the partition's default
    timeout_min: int = 1440

    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


@dataclass
class ClusterConfig:
    folder: str = "slurm/logs/submitit/%j"  # job pickles + logs, on the shared filesystem
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, conda
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    signal_delay_s: int = 300  # time-limit warning: checkpoint this long before the end
    max_num_timeout: int = 20  # requeues after a time-out before giving up (preemptions are free)
    stop_grace_s: int = 120  # after SIGTERM + checkpoint: wait this long for Slurm to end the job
    array_parallelism: int = 16  # sweep points running at once
    poll_s: int = 15  # --wait: seconds between sacct polls
    train: Resources = field(default_factory=lambda: Resources(nodes=1, gpus_per_node=4, cpus_per_task=8))
    eval: Resources = field(default_factory=lambda: Resources(gpus_per_node=1, cpus_per_task=8, timeout_min=120))
    summary: Resources = field(default_factory=lambda: Resources(cpus_per_task=1, timeout_min=15))


def load_cluster_config(path: str | Path | None, overrides: list[str] = ()) -> ClusterConfig:
    """Read jobs/cluster.yaml (unknown keys and wrong types are refused, naming the key)."""
    cc = ClusterConfig()
    if path is not None:
        update_from_yaml(cc, path, what="cluster config")
    apply_overrides(cc, overrides, "cluster override")
    for name in ("train", "eval", "summary"):
        r: Resources = getattr(cc, name)
        if r.nodes < 1 or r.cpus_per_task < 1 or r.timeout_min < 1 or r.gpus_per_node < 0:
            raise ConfigError(f"cluster config {name}: nodes, cpus_per_task, timeout_min must be >= 1 "
                              f"and gpus_per_node >= 0, got {r}")
    return cc


def executor_parameters(cc: ClusterConfig, res: Resources, name: str) -> dict:
    """submitit AutoExecutor parameters (generic + ``slurm_*``) for one job."""
    p: dict[str, Any] = {
        "name": name,
        "timeout_min": res.timeout_min,
        "nodes": res.nodes,
        "tasks_per_node": res.ntasks_per_node(),
        "cpus_per_task": res.cpus_per_task,
        "slurm_signal_delay_s": cc.signal_delay_s,
        "slurm_array_parallelism": cc.array_parallelism,
    }
    if res.gpus_per_node:
        p["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        p["mem_gb"] = res.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cc, key):
            p[f"slurm_{key}"] = getattr(cc, key)
    if cc.setup:
        p["slurm_setup"] = list(cc.setup)
    if cc.sbatch:
        p["slurm_additional_parameters"] = {str(k): v for k, v in cc.sbatch.items()}
    return p
