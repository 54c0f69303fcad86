"""The per-report 18-label vector from the mentions.

A label is 1 iff the report has a *present or uncertain* mention of it in the findings or the
impression. The clinical information (the indication: "Nodule follow-up.", "Rule out effusion.")
and the technique say why and how the scan was made, not what it shows, so their mentions are kept
in the mentions table but never set a label. Why uncertain counts: CT-RATE's radiologists labelled what
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
#: Sections that describe the scan (the others give its reason and its protocol).
FINDING_SECTIONS = frozenset({"findings", "impression"})


def label_vector(mentions: Iterable) -> dict[str, int]:
    """{label: 0/1} over ``LABELS`` in CT-RATE order."""
    hit = {m.label for m in mentions if m.status in POSITIVE and m.section in FINDING_SECTIONS}
    return {label: int(label in hit) for label in LABELS}
