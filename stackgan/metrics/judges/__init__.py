"""Attribute judges: small CNNs that say which CUB-format attributes an image shows.

Two kinds, selected by name (:func:`.choice.choose_judge`; :func:`.choice.ensure_judge` gives a
metric the selected one):

* ``parts`` (:mod:`.parts`, the default on the embedded bird set): trained on birds
  the embedded renderer draws with random, independent part combinations, one head per
  attribute group, so it reads each part on its own; its ceiling is what a caption states.
* ``species`` (:mod:`.species`, the only kind for CUB): trained on a shard set's *real* images
  (train split, minus a fixed held-out 1-in-``holdout`` subset of keys) to predict the
  per-image attribute labels (``attr.npy``). It learns species cues with the parts: on
  the embedded set a drawing of exactly what a caption states scores 75% of a real image.

Either scores generated images against the attributes of the caption they were generated from.

Scoring rule (:mod:`.rule`). Attribute names are ``group::value``
(``has_wing_color::blue``). For each *group* the caption states (at least one positive
label), the judge "sees" it when its highest-scoring value in that group is one of the
stated values; a group of a single attribute is seen when its logit is > 0. An image's
score is the share of its stated groups the judge sees. Only informative groups count:
those with at least two values present in the judge's training labels, and that the
trained judge reads on real test images (unseen species) at least ``READABLE_MARGIN``
better than always guessing the most frequent value (e.g. the embedded set's bird size
is normalised away by the bounding-box crop, so no image shows it). Predicting
everything at once cannot game the rule, and its chance level is about 1 / values.

``python -m stackgan.metrics.judges train --shards DIR [--kind parts|species] [--out PATH]``
trains and caches a judge (atomic write, default ``judge-parts.pt`` or ``judge.pt`` in the shard
folder, or in the cache folder when that is read-only: :mod:`stackgan.metrics.netcache`) and
prints its report; ``show PATH`` prints a judge file's report (:mod:`.cli`).

Modules: :mod:`.rule` (scoring rule and loss), :mod:`.base` (the shared conv block, the
:class:`Judge` object, fitting, real-image scores), :mod:`.species`, :mod:`.parts` (the two
kinds), :mod:`.choice` (selection, loading, training on first use), :mod:`.cli`.
"""
from .base import FORMAT, FORMAT_V1, JUDGE_SIZE, KINDS, READABLE_MARGIN, Judge, JudgeError
from .choice import (DEFAULT_FILE, JudgeChoice, check_fit, choose_judge, default_kind, ensure_judge,
                     format_report, load_judge, train_judge)
from .parts import PartJudgeNet, PartJudgeReport, train_part_judge
from .rule import attribute_groups, attribute_hits, group_hits, group_names, judge_loss, share
from .species import JudgeNet, JudgeReport, species_identity, train_species_judge
from .cli import main  # last: the command line uses all of the above

__all__ = ["DEFAULT_FILE", "FORMAT", "FORMAT_V1", "JUDGE_SIZE", "KINDS", "READABLE_MARGIN", "Judge",
           "JudgeChoice",
           "JudgeError", "JudgeNet", "JudgeReport", "PartJudgeNet", "PartJudgeReport", "attribute_groups",
           "attribute_hits", "check_fit", "choose_judge", "default_kind", "ensure_judge", "format_report",
           "group_hits", "group_names", "judge_loss", "load_judge", "main", "share", "species_identity",
           "train_judge", "train_part_judge", "train_species_judge"]
