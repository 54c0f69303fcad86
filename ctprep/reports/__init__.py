"""Negation-aware chest-CT report parser (spaCy rule pipeline) for the 18 CT-RATE abnormalities.

``ReportParser().parse(text_or_fields)`` gives sections, finding mentions (status, side, lobe,
size, count, severity) and the 18-label vector; ``structured_prompt`` turns mentions into a
canonical prompt; ``evaluate`` scores the labels against radiologist labels.
"""

from ctprep.ctrate import LABELS
from ctprep.reports.evaluate import evaluate, evaluate_main
from ctprep.reports.mentions import Mention
from ctprep.reports.pipeline import ParsedReport, ReportParser, get_parser, parse_report
from ctprep.reports.structured import NO_FINDINGS, structured_prompt

__all__ = ["LABELS", "Mention", "NO_FINDINGS", "ParsedReport", "ReportParser", "evaluate", "evaluate_main",
           "get_parser", "parse_report", "structured_prompt"]
