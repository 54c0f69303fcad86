"""The per-report 18-label vector from the mentions.

A label is 1 iff the report has a *present or uncertain* mention of it, in any section (findings,
impression, even clinical information). Why uncertain counts: CT-RATE's radiologists labelled what
the report raises as a finding ("nodule (granuloma?)", "atelectasis? sequela?"), and a generator
prompted with a suspected finding should show it. Why sections are OR-ed: the impression is a
summary of the findings and usually repeats only the main ones, so a finding stated in either
section is in the scan; a negation in one section never cancels a presence in the other (the
impression's "no pneumonia" does not erase the findings' "minimal atelectasis").
"""

from __future__ import annotations

from collections.abc import Iterable

from ctprep.ctrate import LABELS

#: Statuses that make a label 1.
POSITIVE = frozenset({"present", "uncertain"})


def label_vector(mentions: Iterable) -> dict[str, int]:
    """{label: 0/1} over ``LABELS`` in CT-RATE order."""
    hit = {m.label for m in mentions if m.status in POSITIVE}
    return {label: int(label in hit) for label in LABELS}
