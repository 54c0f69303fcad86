"""A seeded synthetic chest-CT cohort in CT-RATE's exact layout, for demos and tests."""

from ctprep.demo.cohort import FAULTS, write_demo_cohort
from ctprep.demo.phantom import Phantom, Tissue

__all__ = ["FAULTS", "Phantom", "Tissue", "write_demo_cohort"]
