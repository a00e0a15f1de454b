"""Which judge a run uses, and its file: selection by name or path, loading with checks,
training on first use (cached through :mod:`stackgan.metrics.netcache`), and the
``attributes`` requirement check the judge metrics declare."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stackgan.data.meta import ShardError, ShardMeta, load_metadata

from ..core import EvalContext, MetricError, rank_world, requirement
from ..netcache import cache_path, load_net, make_once, shard_fingerprint
from ..redraw import RedrawError, embedded_renderer, is_embedded
from .base import FORMAT, FORMAT_V1, KINDS, Judge, JudgeError
from .parts import PartJudgeNet, PartJudgeReport, train_part_judge
from .parts import format_report as parts_report
from .species import JudgeNet, JudgeReport, train_species_judge
from .species import format_report as species_report

DEFAULT_FILE = {"parts": "judge-parts.pt", "species": "judge.pt"}  # in the shard folder or the cache folder
_NETS = {"species": (JudgeNet, JudgeReport), "parts": (PartJudgeNet, PartJudgeReport)}


@dataclass(frozen=True)
class JudgeChoice:
    kind: str  # the kind named, or for a file path the kind trained there when it is missing
    path: Path
    named: bool  # chosen by kind name ("" included): the file must hold that kind


def default_kind(meta: ShardMeta) -> str:
    """``parts`` on shards drawn by the embedded generator, ``species`` on any other."""
    return "parts" if is_embedded(meta) else "species"


def choose_judge(shards: str | Path, judge: str = "", meta: ShardMeta | None = None,
                 cache_dir: str | Path = "") -> JudgeChoice:
    """What ``judge`` selects on ``shards``: ``""`` the shard set's default kind
    (:func:`default_kind`), ``"parts"`` / ``"species"`` that kind at its default file
    (:data:`DEFAULT_FILE`, in the shard folder or, when that is read-only, the cache folder:
    :func:`stackgan.metrics.netcache.cache_path`), anything else a judge file (of whichever
    kind it holds; trained there with the default kind when it does not exist)."""
    meta = meta or load_metadata(shards)
    if judge and judge not in KINDS:
        return JudgeChoice(default_kind(meta), Path(judge), named=False)
    kind = judge or default_kind(meta)
    if kind == "parts" and not is_embedded(meta):
        raise JudgeError(f"{shards}: the part-wise judge ('parts') learns from the embedded bird renderer "
                         "and these shards were not drawn by it; use the species judge (--judge species)")
    return JudgeChoice(kind, cache_path(meta, DEFAULT_FILE[kind], cache_dir=cache_dir), named=True)


def load_judge(path: str | Path, device: str | torch.device = "cpu",
               attributes: list[str] | None = None) -> Judge:
    """Load a judge file of either kind (no code runs: weights_only); with ``attributes``,
    refuse one trained for other attribute names."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(
            f"judge not found: {path} (train one: python -m stackgan.metrics.judges train --shards DIR)")
    d = load_net(path, (FORMAT, FORMAT_V1), JudgeError, "judge")
    if d["format"] == FORMAT_V1:
        d = {**d, "kind": "species", "trained_on": d.get("shards") or {},
             "net": {"num_attributes": len(d["attributes"]), "width": d["width"],
                     "temperature": d["temperature"]}}
    elif d.get("kind") not in KINDS:
        raise JudgeError(f"{path}: judge of unknown kind {d.get('kind')!r} (known: {', '.join(KINDS)})")
    if attributes is not None and list(attributes) != list(d["attributes"]):
        raise JudgeError(
            f"{path}: judge was trained for {len(d['attributes'])} other attributes than the shards' "
            f"{len(attributes)}; train a judge on these shards (python -m stackgan.metrics.judges train)"
        )
    net_cls, report_cls = _NETS[d["kind"]]
    net = net_cls(**d["net"])
    net.load_state_dict(d["state_dict"])
    report = report_cls(**d["report"]) if d.get("report") else None
    judge = Judge(net, d["attributes"], d["groups"], d["holdout_mod"], d["prior"], report)
    judge.trained_on = d.get("trained_on") or {}
    judge.path = path
    return judge.to(device)


def train_judge(shards: str | Path, kind: str = "species", *, device: str | torch.device = "cpu", log=print,
                **options) -> Judge:
    """Train a judge of ``kind`` for ``shards`` with its defaults (``options`` override them:
    :func:`.species.train_species_judge`'s or :func:`.parts.train_part_judge`'s)."""
    if kind == "species":
        return train_species_judge(shards, device=device, log=log, **options)
    if kind == "parts":
        return train_part_judge(str(shards), device=device, log=log, **options)
    raise JudgeError(f"unknown judge kind {kind!r}; known: {', '.join(KINDS)}")


def check_fit(judge: Judge, path: Path, meta: ShardMeta, log) -> None:
    """Refuse a part-wise judge drawn by another renderer than the shards'; warn when a
    species judge was trained on other shards."""
    if judge.kind == "parts":
        try:
            want = embedded_renderer(meta).identity()
        except RedrawError as e:
            raise JudgeError(f"{path} is a part-wise judge, but {e}") from e
        if judge.trained_on != want:
            raise JudgeError(f"{path}: part-wise judge trained on renderer {judge.trained_on}, the shards at "
                             f"{meta.root} are {want}; retrain it (python -m stackgan.metrics.judges train "
                             f"--shards {meta.root} --kind parts)")
        return
    was = judge.trained_on.get("fingerprint")
    if was and "train" in meta.splits and was != shard_fingerprint(meta) and rank_world()[0] == 0:
        log(f"WARNING: judge {path} was trained on other shards ({judge.trained_on.get('root')}) than "
            f"{meta.root}; retrain it (python -m stackgan.metrics.judges train --shards {meta.root} "
            "--kind species)")


def ensure_judge(ctx: EvalContext) -> Judge:
    """The judge ``ctx.judge`` selects (:func:`choose_judge`): loaded from its file, or
    trained there first (rank 0 trains, the others wait) when the file does not exist yet."""
    if "judge" in ctx.cache:
        return ctx.cache["judge"]
    try:
        choice = choose_judge(ctx.shards, ctx.judge, ctx.meta, ctx.cache_dir)

        def make() -> None:
            ctx.log(f"no {choice.kind} judge at {choice.path}: training one for {ctx.shards} "
                    "(cached for later runs)")
            trained = train_judge(ctx.shards, choice.kind, device=ctx.device, log=lambda m: None)
            trained.save(choice.path)
            ctx.log(f"judge: {format_report(trained.report)}")

        make_once(choice.path, make)
        judge = load_judge(choice.path, ctx.device, ctx.meta.attributes)
        if choice.named and judge.kind != choice.kind:
            raise JudgeError(f"{choice.path} holds a {judge.kind} judge, not the {choice.kind} judge "
                             "asked for")
        check_fit(judge, choice.path, ctx.meta, ctx.log)
    except (JudgeError, ShardError) as e:
        raise MetricError(str(e)) from e
    ctx.cache["judge"] = judge
    return judge


def format_report(r: JudgeReport | PartJudgeReport | None) -> str:
    """A judge's training report, either kind, for people."""
    if r is None:
        return "(no report)"
    return species_report(r) if isinstance(r, JudgeReport) else parts_report(r)


@requirement("attributes")
def check_attributes(ctx: EvalContext) -> None:
    """The judge metrics need attribute labels and a judge kind these shards can have."""
    if not ctx.meta.attributes:
        raise MetricError(
            f"{ctx.shards}: the shards carry no attributes (attr.npy); the attribute judge needs the "
            "embedded bird set or CUB prepared with its attribute labels")
    try:
        choose_judge(ctx.shards, ctx.judge, ctx.meta, ctx.cache_dir)
    except JudgeError as e:
        raise MetricError(str(e)) from e
