"""ctprep: CT-RATE and DICOM chest CT preparation (HU volumes, prompts, webdataset shards)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ctgen")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
