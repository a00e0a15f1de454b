"""Which attribute groups a caption states (judge consistency's scope, and the stream's
``stated`` mask for D's attribute head, ``loss.attr_coef``).

A caption rarely states every attribute of its image ("this bird has a yellow crown and a
white belly" says nothing of the wings), and a generator cannot be asked to show what its
text did not say. So judge consistency scores a generated image only on the attribute
groups its caption mentions; the *values* come from the source image's labels
(``attr.npy``), which is right because captions describe their image truthfully.

A group is stated when:

* ``has_<part>_color``: a word for the part (``wing``/``wings``, ``bill``/``beak``, ...)
  and one of the group's colour words both occur in the caption;
* any other group (``has_bill_shape``, ``has_size``, ``has_wing_pattern``,
  ``has_bill_length``, ...): a word for one of its values occurs (``needle-like`` for
  ``needle``, ``little`` for ``small``, ``long`` for ``longer_than_head``, ...).

Words match by prefix (``wings`` matches ``wing``, ``cone-shaped`` matches ``cone``). The
vocabulary covers the embedded bird set's captions exactly and CUB's common phrasing
approximately.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

_PART_WORDS = {
    "bill": ("bill", "beak"), "belly": ("belly", "bellied", "stomach"), "breast": ("breast", "chest"),
    "leg": ("leg", "feet", "foot"), "upperparts": ("upperpart",), "underparts": ("underpart",),
    "wing": ("wing",), "tail": ("tail",), "crown": ("crown",), "back": ("back",), "eye": ("eye",),
    "throat": ("throat",), "nape": ("nape",), "forehead": ("forehead",), "head": ("head",),
}
_VALUE_WORDS = {
    "shorter": ("short",), "longer": ("long",), "cone": ("cone", "conical"), "small": ("small", "little"),
    "large": ("large", "big"), "solid": ("solid", "plain"), "grey": ("grey", "gray"),
    "multi": ("multi",), "curved": ("curved",), "hooked": ("hook",),
}
_STOP = {"than", "head", "the", "as", "same", "about", "in", "to", "or", "up", "down", "like", "in", "ft",
         "bill", "shape", "shaped", "seabird", "purpose", "all"}
_WORD = re.compile(r"[a-z]+")


def _tokens(value: str) -> list[str]:
    return [t for t in re.split(r"[^a-z]+", value.lower()) if t and t not in _STOP and len(t) > 2]


def _value_words(value: str) -> set[str]:
    out: set[str] = set()
    for t in _tokens(value):
        out.update(_VALUE_WORDS.get(t, (t,)))
    return out


def caption_groups(attributes: list[str]) -> list[Group]:
    """Per ``group::value`` group: (attribute indices, part words or (), value words)."""
    by: OrderedDict[str, list[int]] = OrderedDict()
    for i, n in enumerate(attributes):
        by.setdefault(n.split("::", 1)[0] if "::" in n else n, []).append(i)
    out = []
    for group, idx in by.items():
        tokens = group.lower().removeprefix("has_").split("_")
        values = set().union(*(_value_words(attributes[i].split("::", 1)[-1]) for i in idx))
        if tokens[-1] == "color" and len(tokens) > 1:
            part = tokens[-2]
            out.append((idx, _PART_WORDS.get(part, (part,)), values))
        else:
            out.append((idx, (), values))
    return out


def _hit(words: list[str], keys) -> bool:
    return any(w.startswith(k) for w in words for k in keys)


Group = tuple[list[int], tuple[str, ...], set[str]]  # attribute indices, part words, value words


def stated_mask(caption: str, groups: list[Group], n_attr: int) -> np.ndarray:
    """(n_attr,) bool: the attributes of the groups ``caption`` states."""
    words = _WORD.findall(caption.lower())
    mask = np.zeros(n_attr, bool)
    for idx, parts, values in groups:
        if (not parts or _hit(words, parts)) and values and _hit(words, values):
            mask[idx] = True
    return mask


def group_indices(attributes: list[str]) -> list[list[int]]:
    """The attribute indices of each ``group::value`` group, in :func:`caption_groups`' order."""
    return [idx for idx, _, _ in caption_groups(attributes)]


class StatedGroups:
    """caption -> :func:`stated_mask` for a set's attributes, remembered per caption (a set's
    captions repeat: the embedded set draws each image's from a small pool)."""

    def __init__(self, attributes: list[str]):
        self.groups, self.n_attr = caption_groups(attributes), len(attributes)
        self._seen: dict[str, np.ndarray] = {}

    def __call__(self, caption: str) -> np.ndarray:
        if caption not in self._seen:
            self._seen[caption] = stated_mask(caption, self.groups, self.n_attr)
        return self._seen[caption]


def caption_scope(captions: list[list[str]], attributes: list[str]) -> np.ndarray:
    """(N, C, A) bool: for each sample's captions, the attributes each one states."""
    stated = StatedGroups(attributes)
    out = np.zeros((len(captions), len(captions[0]) if captions else 0, len(attributes)), bool)
    for i, caps in enumerate(captions):
        for j, c in enumerate(caps):
            out[i, j] = stated(c)
    return out
