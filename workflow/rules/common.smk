# Config validation and the values rules read; logic lives in ctprep.
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

R = config["results"]
SPLITS = config["dataset"]["splits"]
CHUNKS = [f"{i:03d}" for i in range(config["prep"]["n_chunks"])]
if config["prep"]["preset"] not in config["presets"]:
    raise ValueError(
        f"prep.preset {config['prep']['preset']!r} is not among presets: {sorted(config['presets'])}"
    )
PRESET = config["presets"][config["prep"]["preset"]]
DEMO = config.get("demo", {}).get("enabled", False)
DICOM_OUTPUTS = (
    [f"{R}/dicom/metadata.csv"] if config.get("dicom", {}).get("series_dir") else []
)


def get_dataset_root(wildcards):
    """The demo rule's output when the demo is on; a real CT-RATE copy needs no rule."""
    return config["dataset"]["root"]
