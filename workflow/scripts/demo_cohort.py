"""Rule demo_cohort: write the seeded synthetic cohort in the CT-RATE layout."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.demo import write_demo_cohort

write_demo_cohort(snakemake.output.root, snakemake.params.demo, workers=snakemake.threads)
