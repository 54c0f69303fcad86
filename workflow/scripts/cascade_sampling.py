"""Rule cascade_sampling: config.yaml's sampling settings beside the cascade, the defaults of `ctgen sample`."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from pathlib import Path

from ctgen.pipelines.text_to_ct import write_sampling_defaults

write_sampling_defaults(
    Path(snakemake.output.json).parent,
    snakemake.params.sampling,
)
