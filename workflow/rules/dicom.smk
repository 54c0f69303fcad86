if DICOM:

    rule dicom2nifti:
        input:
            series_dir=config["dicom"]["series_dir"],
        output:
            volumes=directory(f"{R}/dicom/volumes"),
            metadata=f"{R}/dicom/metadata.csv",
            sources=f"{R}/dicom/sources.csv",
            rejects=f"{R}/rejects/dicom.parquet",
        log:
            f"{R}/logs/dicom2nifti.log",
        benchmark:
            f"{R}/benchmarks/dicom2nifti.tsv"
        conda:
            "../../envs/prep.yaml"
        threads: config["dicom"]["threads"]
        resources:
            # one decoded series per worker process (a 512 x 512 x 600 series: ~1.5 GB at its peak)
            mem_mb=lambda wc, threads: 2000 + 2000 * threads,
            runtime=grows_with_attempt(120, 2),
        params:
            code=script_digest("dicom2nifti.py"),
            split=config["dicom"]["split"],
            strict=config["prep"]["strict"],
            files=lambda wc: tree_digest(config["dicom"]["series_dir"]),  # files added to a series rerun it
        script:
            "../scripts/dicom2nifti.py"
