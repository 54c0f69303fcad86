if DICOM_OUTPUTS:

    rule dicom2nifti:
        input:
            series_dir=config["dicom"]["series_dir"],
        output:
            volumes=directory(f"{R}/dicom/volumes"),
            metadata=f"{R}/dicom/metadata.csv",
            rejects=f"{R}/rejects/dicom.parquet",
        params:
            split=config["dicom"]["split"],
            strict=config["prep"]["strict"],
        log:
            f"{R}/logs/dicom2nifti.log",
        benchmark:
            f"{R}/benchmarks/dicom2nifti.tsv"
        threads: 1
        resources:
            mem_mb=4000,
            runtime=120,
        conda:
            "../../envs/prep.yaml"
        script:
            "../scripts/dicom2nifti.py"
