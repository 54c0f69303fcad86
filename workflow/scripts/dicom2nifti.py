"""Rule dicom2nifti: convert a folder of DICOM series to HU NIfTI and a CT-RATE metadata table."""
from ctprep.logs import log_to

log_to(snakemake.log[0])
from ctprep.dicom import convert_folder_to_outputs

convert_folder_to_outputs(
    snakemake.input.series_dir,
    snakemake.output.volumes,
    snakemake.output.metadata,
    snakemake.output.rejects,
    split=snakemake.params.split,
    strict=snakemake.params.strict,
    sources_csv=snakemake.output.sources,
    workers=snakemake.threads,
)
