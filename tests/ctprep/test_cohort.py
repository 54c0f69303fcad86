import pandas as pd
import pytest

from ctprep import ctrate
from ctprep.cohort import assemble_cohort, build_cohort, chunk_of, parse_age, write_cohort
from ctprep.demo import write_demo_cohort
from ctprep.rejects import RejectedInput

FAULTS = ["truncated_gzip", "missing_metadata", "missing_report", "empty_impression", "bad_list", "path_escape"]
CFG = {"seed": 1, "n_train_patients": 3, "n_valid_patients": 2, "max_scans_per_patient": 2, "max_recons_per_scan": 1,
       "matrix": 48, "slices": [20, 24], "z_spacing_mm": [6.0, 8.0], "faults": FAULTS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("c") / "dataset"
    truth = write_demo_cohort(root, CFG)
    return root, truth


def test_cohort_joins_tables_and_names_rejects(dataset):
    root, truth = dataset
    cohort, rejects = build_cohort(root, n_chunks=3)
    clean = truth[truth["fault"] == ""]
    # a truncated file is only found out when read (prep stage); every other fault is caught here
    expected = set(clean["VolumeName"]) | set(truth.loc[truth["fault"] == "truncated_gzip", "VolumeName"])
    assert set(cohort["VolumeName"]) == expected
    reasons = dict(zip(rejects["VolumeName"], rejects["reason"]))
    by_fault = dict(zip(truth["fault"], truth["VolumeName"]))
    assert reasons[by_fault["missing_metadata"]] == "missing metadata row"
    assert reasons[by_fault["missing_report"]] == "missing report row"
    assert reasons[by_fault["empty_impression"]] == "empty impression"
    assert "ImagePositionPatient" in reasons[by_fault["bad_list"]]
    assert "not a bare file name" in reasons[by_fault["path_escape"]]
    # labels equal the labels CSV, report sections the report CSV
    labels = pd.read_csv(ctrate.labels_csv(root, "train")).set_index("VolumeName")
    for rec in cohort[cohort["split"] == "train"].to_dict("records"):
        assert [rec[lab] for lab in ctrate.LABELS] == labels.loc[rec["VolumeName"], list(ctrate.LABELS)].tolist()
    reports = pd.read_csv(ctrate.report_csv(root, "valid")).set_index("VolumeName")
    for rec in cohort[cohort["split"] == "valid"].to_dict("records"):
        assert rec["impression"] == reports.loc[rec["VolumeName"], "Impressions_EN"].strip()
    # patients stay in one split and one chunk
    assert cohort.groupby("patient")["split"].nunique().max() == 1
    assert cohort.groupby("patient")["chunk"].nunique().max() == 1
    assert set(cohort["chunk"]) <= {0, 1, 2}


def test_original_layout_summary(dataset):
    root, truth = dataset
    built = assemble_cohort(root, n_chunks=3)
    assert set(built.table["layout"]) == {"original"} and set(built.table["layouts"]) == {"original"}
    train = built.summary["splits"]["train"]
    # the escaping name is listed in every table but is no CT-RATE name: a reject, never "not downloaded"
    assert train["not_downloaded"] == 0
    assert train["on_disk_by_layout"] == {"fixed": 0, "original": train["on_disk"], "both": 0}
    assert train["in_cohort"] + train["rejected"] == train["listed"] == (truth["split"] == "train").sum()
    assert train["rejected_by_reason"]["invalid VolumeName"] == 1 and train["no_chest_list"]["file"] is None
    assert built.summary["total"]["in_cohort"] == len(built.table)


def test_strict_mode_raises_with_every_reject(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(RejectedInput, match="missing metadata row"):
        write_cohort(root, tmp_path / "c.parquet", tmp_path / "r.parquet", strict=True)


def test_chunk_is_stable_and_age_parsed():
    assert chunk_of("train_1", 500) == chunk_of("train_1", 500) == 323  # crc32, the same on every machine
    assert parse_age("036Y") == 36 and parse_age("018M") == 1 and parse_age("") is None and parse_age("abc") is None


def test_missing_tables_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata table not found"):
        build_cohort(tmp_path)


def test_duplicate_table_rows_give_one_reject_and_listed_only_volumes_count_as_not_downloaded(dataset, tmp_path):
    import shutil

    root = tmp_path / "dataset"
    shutil.copytree(dataset[0], root)
    meta = pd.read_csv(ctrate.metadata_csv(root, "train"), dtype=str, keep_default_na=False)
    cohort, _ = build_cohort(dataset[0])
    on_disk = sorted(cohort.loc[cohort["split"] == "train", "VolumeName"])[0]
    ghost = meta[meta["VolumeName"] == on_disk].assign(VolumeName="train_99_a_1.nii.gz")  # listed, not downloaded
    other = meta[meta["VolumeName"] == on_disk].assign(PatientAge="099Y")  # a second row that disagrees
    meta = pd.concat([meta, other, ghost, ghost.assign(PatientAge="099Y")])
    meta.to_csv(ctrate.metadata_csv(root, "train"), index=False)
    built = assemble_cohort(root, splits=["train"])
    rej = built.rejects[built.rejects["VolumeName"].isin([on_disk, "train_99_a_1.nii.gz"])]
    assert rej[["VolumeName", "reason"]].values.tolist() == [[on_disk, "duplicate metadata rows that differ"]]
    s = built.summary["splits"]["train"]
    assert s["not_downloaded"] == 1 and on_disk not in set(built.table["VolumeName"])
    assert s["in_cohort"] + s["rejected"] == len(set(built.table["VolumeName"]) | set(built.rejects["VolumeName"]))


def test_cohort_rejects_name_the_layout_of_the_rejected_copy(dataset):
    _, rejects = build_cohort(dataset[0])
    assert "layout" in rejects.columns
    assert rejects.loc[rejects["reason"] == "empty impression", "layout"].notna().all()


def test_strict_mode_on_the_command_line_is_one_line_naming_the_rejects(dataset, tmp_path, capsys):
    from ctprep.cli import main

    code = main(["cohort", str(dataset[0]), str(tmp_path / "c.parquet"), str(tmp_path / "r.parquet"), "--n-chunks", "1",
                 "--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "strict mode:" in err[0] and "rejected during cohort building" in err[0]


def test_a_blank_metadata_number_names_its_column(tmp_path):
    """float('') says only "could not convert string to float: ''": the reject names the column instead."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = ctrate.metadata_csv(root, "train")
    meta = pd.read_csv(path)
    name = meta["VolumeName"].iloc[0]
    meta.loc[0, "RescaleIntercept"] = None
    meta.to_csv(path, index=False)
    cohort, rejects = build_cohort(root)
    assert name not in set(cohort["VolumeName"])
    assert rejects.set_index("VolumeName").loc[name, "reason"] == "bad metadata: RescaleIntercept '' is not a number"


def test_volume_names_are_matched_whatever_their_spelling(tmp_path):
    """A table re-saved without extensions or with padded cells, and a decompressed ``.nii`` on disk, name the same
    volumes as the release's ``train_1_a_1.nii.gz`` (each spelling rejected every row and every file)."""
    import gzip

    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    expected = set(build_cohort(root)[0]["VolumeName"])
    labels, meta = ctrate.labels_csv(root, "train"), ctrate.metadata_csv(root, "train")
    df = pd.read_csv(labels, dtype=str, keep_default_na=False)
    df["VolumeName"] = df["VolumeName"].map(ctrate.volume_key)
    df.to_csv(labels, index=False)
    df = pd.read_csv(meta, dtype=str, keep_default_na=False)
    df["VolumeName"] = df["VolumeName"] + " "
    df.to_csv(meta, index=False)
    name = sorted(n for n in expected if n.startswith("train_"))[0]
    gz = root / ctrate.volume_relpath(name)
    gz.with_name(gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    cohort, rejects = build_cohort(root)
    assert rejects.empty and set(cohort["VolumeName"]) == expected
    assert cohort.set_index("VolumeName").loc[name, "path"].endswith(name[:-3])


def test_no_usable_volume_names_the_reasons_and_writes_the_rejects(tmp_path, caplog):
    """The error said "6 rejected" with no reason, and the rejects table it pointed to was never written."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    for split in ("train", "valid"):
        df = pd.read_csv(ctrate.labels_csv(root, split), dtype=str, keep_default_na=False)
        df.iloc[:0].to_csv(ctrate.labels_csv(root, split), index=False)  # a header, no rows
    out = tmp_path / "out"
    # the log, not the rejects table: Snakemake removes a failed job's outputs
    with caplog.at_level("WARNING"), pytest.raises(
            ValueError, match=r"no usable volume .* rejected \(\d+ missing labels row; the log lists each reject\)"):
        write_cohort(root, out / "c.parquet", out / "r.parquet", out_summary=out / "summary.json")
    assert "missing labels row" in caplog.text
    rej = pd.read_parquet(out / "r.parquet")
    assert len(rej) and set(rej["reason"]) == {"missing labels row"}
    assert (out / "summary.json").is_file() and not (out / "c.parquet").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text(p.read_text() + 'train_9_a_1.nii.gz,"unterminated\n'), "EOF inside string"),
    (lambda p: p.write_bytes(p.read_bytes() + "Öksürük\n".encode("cp1254")), "not UTF-8 text"),
    (lambda p: p.write_bytes(b""), "No columns to parse"),
    (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n"), "no VolumeName column"),
], ids=["unterminated-quote", "cp1254", "zero-bytes", "lfs-pointer"])
def test_an_unreadable_table_is_one_line_naming_the_file(tmp_path, capsys, damage, message):
    """pandas' and the codec's errors named no file (and were tracebacks): the command says which table and why."""
    from ctprep.cli import main

    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = ctrate.report_csv(root, "valid")
    damage(path)
    code = main(["cohort", str(root), str(tmp_path / "c.parquet"), str(tmp_path / "r.parquet"), "--n-chunks", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"report table {path}: " in err[0] and message in err[0]


def test_a_no_chest_list_that_is_not_utf8_is_named(tmp_path):
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = ctrate.no_chest_txt(root, "train")
    path.write_bytes("train_1_a_1.nii.gz # göğüs değil\n".encode("cp1254"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        build_cohort(root)


def test_a_number_of_slices_that_is_no_count_is_a_reject(tmp_path):
    """int(float('inf')) raised OverflowError and stopped the whole cohort; 0 and 2.5 passed as counts."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = ctrate.metadata_csv(root, "train")
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    bad = {meta.loc[i, "VolumeName"]: v for i, v in zip(range(3), ("inf", "0", "2.5"))}
    meta.loc[:2, "NumberofSlices"] = list(bad.values())
    meta.to_csv(path, index=False)
    cohort, rejects = build_cohort(root)
    reasons = rejects.set_index("VolumeName")["reason"]
    assert {n: reasons[n] for n in bad} == {
        n: f"bad metadata: NumberofSlices {v!r} is not a positive whole number" for n, v in bad.items()}
    assert len(cohort) and not set(bad) & set(cohort["VolumeName"])


def test_no_chest_scan_ids_are_matched_in_linear_time(tmp_path):
    """Each scan id was compared with every volume name: 30 s at 50k rows and 2,000 ids."""
    import time

    from ctprep.cohort import _split_summary

    path = tmp_path / "no_chest_train.txt"
    path.write_text("")
    listed = {f"train_{i}_a_{r}.nii.gz" for i in range(20000) for r in (1, 2)}
    scans = {f"train_{i}_a" for i in range(19000, 21000)}  # half name listed volumes, half none
    start = time.perf_counter()
    s = _split_summary({}, listed, [], [], 0, ({"train_5_a_1.nii.gz", "train_5_b_1.nii.gz"}, scans, path))
    assert time.perf_counter() - start < 2.0
    assert s["no_chest_list"] == {"file": "no_chest_train.txt", "entries": 2002, "unmatched": 1001}


def test_an_exact_duplicate_row_is_kept_once_and_a_no_chest_volume_is_excluded_before_duplicates(tmp_path):
    """A row repeated exactly rejected its volume; a no-chest volume with repeated rows failed strict mode as bad
    input, where its exclusion alone is deliberate."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    expected = build_cohort(root)[0]
    names = sorted(expected.loc[expected["split"] == "train", "VolumeName"])
    path = ctrate.metadata_csv(root, "train")
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    twice = meta[meta["VolumeName"] == names[0]]
    differs = meta[meta["VolumeName"] == names[1]].assign(PatientAge="099Y")
    pd.concat([meta, twice, twice, differs]).to_csv(path, index=False)
    cohort, rejects = build_cohort(root)
    assert rejects[["VolumeName", "reason"]].values.tolist() == [[names[1], "duplicate metadata rows that differ"]]
    assert cohort.equals(expected[expected["VolumeName"] != names[1]].reset_index(drop=True))
    ctrate.no_chest_txt(root, "train").write_text(names[1] + "\n")
    out = tmp_path / "out"
    cohort = write_cohort(root, out / "c.parquet", out / "r.parquet", strict=True)
    rejects = pd.read_parquet(out / "r.parquet")
    assert rejects[["VolumeName", "reason"]].values.tolist() == [
        [names[1], "not a chest CT (listed in metadata/no_chest_train.txt)"]]
    assert names[0] in set(cohort["VolumeName"])


def test_spacing_lists_in_other_spellings(tmp_path):
    """numpy's print form ("[0.75 0.75]") is the same spacing; a decimal comma ("0,7", a European-locale sheet) is
    not two numbers (it read as [0.0, 7.0]), nor is a zero spacing a geometry: both are rejects naming the value."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = ctrate.metadata_csv(root, "train")
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    names = list(meta["VolumeName"][:3])
    xy = [float(v) for v in meta.loc[0, "XYSpacing"].strip("[]").split(",")]
    meta.loc[0, "XYSpacing"] = f"[{xy[0]} {xy[1]}]"
    meta.loc[1, "XYSpacing"] = "0,7"
    meta.loc[2, "XYSpacing"] = "[0.0, 0.7]"
    meta.to_csv(path, index=False)
    cohort, rejects = build_cohort(root)
    reasons = rejects.set_index("VolumeName")["reason"]
    assert names[0] in set(cohort["VolumeName"]) and names[0] not in reasons
    assert reasons[names[1]] == "bad metadata: unparsable XYSpacing: '0,7'"
    assert reasons[names[2]] == "bad metadata: XYSpacing '[0.0, 0.7]' is not positive"


@pytest.mark.parametrize("table, column, renamed", [
    ("report", "Findings_EN", "Findings"),
    ("report", "Impressions_EN", None),
    ("labels", "Cardiomegaly", "Cardiomegally"),
    ("metadata", "XYSpacing", "XY_Spacing"),
])
def test_a_missing_required_column_is_one_line_naming_the_table_and_column(tmp_path, capsys, table, column, renamed):
    """A renamed findings column left every volume's findings empty without a word; a misspelt label or metadata
    column, or a missing impression column, rejected every volume of the split one by one and exited 0."""
    from ctprep.cli import main

    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    path = {"report": ctrate.report_csv, "labels": ctrate.labels_csv, "metadata": ctrate.metadata_csv}[table](root, "valid")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = df.rename(columns={column: renamed}) if renamed else df.drop(columns=column)
    df.to_csv(path, index=False)
    code = main(["cohort", str(root), str(tmp_path / "c.parquet"), str(tmp_path / "r.parquet"), "--n-chunks", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{table} table {path}: no column {column!r}" in err[0]
    assert (f"found {renamed!r} for {column!r}" in err[0]) if renamed else "found" not in err[0]
    assert not (tmp_path / "c.parquet").exists()


def test_report_sections_the_cohort_can_do_without_may_be_absent(tmp_path, caplog):
    """No clinical information or technique column: those sections are blank, the volumes kept, and the log says so."""
    root = tmp_path / "dataset"
    write_demo_cohort(root, {**CFG, "faults": []})
    expected = build_cohort(root)[0]
    for split in ("train", "valid"):
        path = ctrate.report_csv(root, split)
        pd.read_csv(path, dtype=str, keep_default_na=False).drop(
            columns=["ClinicalInformation_EN", "Technique_EN"]).to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        cohort, rejects = build_cohort(root)
    assert rejects.empty and list(cohort["VolumeName"]) == list(expected["VolumeName"])
    assert (cohort["clinical_information"] == "").all() and (cohort["technique"] == "").all()
    assert list(cohort["findings"]) == list(expected["findings"])
    assert "no column 'ClinicalInformation_EN', 'Technique_EN'" in caplog.text
