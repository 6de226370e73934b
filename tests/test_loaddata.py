"""`cpb loaddata` on generated plate folders: both microscope presets, broken folders, pipelines.

Folders are generated with each microscope's own file naming (PerkinElmer Opera Phenix / Operetta:
`r01c01f01p01-ch1sk1fk1fl1.tiff`; Molecular Devices ImageXpress: `<plate>_A01_s1_w1<GUID>.tif`,
with its thumbnails). The checks are the command's own output: the CSV it writes, or its one-line
refusal naming the first offending files.
"""
from __future__ import annotations

import csv
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cpb.cli import cli
from cpb.loaddata import LoadDataError, parse_channels, pattern_for, row_letter
from test_cli import BUCKET, aws, put  # noqa: F401 - `aws` is the moto fixture

DATA = Path(__file__).resolve().parent / "data"
NUCLEI = Path(__file__).resolve().parent.parent / "cpb" / "pipelines" / "nuclei.cppipe"


def phenix(folder: Path, wells=((1, 1), (1, 2), (2, 5)), fields=(1, 2), channels=(1, 2), planes=(1,)) -> Path:
    """An Opera Phenix export: Images/ with r<row>c<col>f<field>p<plane>-ch<ch>sk1fk1fl1.tiff and Index.idx.xml."""
    images = folder / "Images"
    images.mkdir(parents=True)
    for row, column in wells:
        for field in fields:
            for plane in planes:
                for channel in channels:
                    (images / f"r{row:02d}c{column:02d}f{field:02d}p{plane:02d}-ch{channel}sk1fk1fl1.tiff").write_bytes(
                        b"II*\x00" + bytes([row, column, field, channel]))
    (images / "Index.idx.xml").write_text("<EvaluationInputData/>")
    return images


def imagexpress(folder: Path, plate="PLATE7", wells=("A01", "B12"), sites=(1, 2), channels=(1, 2)) -> Path:
    """An ImageXpress export: TimePoint_1/<plate>_<well>_s<site>_w<ch><GUID>.tif, thumbnails beside them."""
    images = folder / "TimePoint_1"
    images.mkdir(parents=True)
    for well in wells:
        for site in sites:
            for channel in channels:
                guid = str(uuid.uuid4()).upper()
                (images / f"{plate}_{well}_s{site}_w{channel}{guid}.tif").write_bytes(b"II*\x00" + well.encode())
                (images / f"{plate}_{well}_s{site}_w{channel}_thumb{guid}.tif").write_bytes(b"II*\x00thumb")
    (folder / f"{plate}.HTD").write_text('"HTSInfoFile", Version 1.0\n')
    return folder


def rows_of(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path, newline="")))


def loaddata(*args: str):
    return CliRunner().invoke(cli, ["loaddata", *args])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("cpb: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ------------------------------------------------------------------------- presets

def test_phenix_folder_makes_one_row_per_site_with_metadata(tmp_path):
    images = phenix(tmp_path / "plate-7")
    out = tmp_path / "load_data.csv"
    result = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                      "--plate", "P7", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert list(rows[0]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Image_FileName_DNA",
                             "Image_PathName_DNA", "Image_FileName_ER", "Image_PathName_ER"]
    assert [(r["Metadata_Plate"], r["Metadata_Well"], r["Metadata_Site"]) for r in rows] == \
        [("P7", "A01", "1"), ("P7", "A01", "2"), ("P7", "A02", "1"), ("P7", "A02", "2"), ("P7", "B05", "1"),
         ("P7", "B05", "2")]
    assert rows[4]["Image_FileName_DNA"] == "r02c05f01p01-ch1sk1fk1fl1.tiff"
    assert rows[4]["Image_FileName_ER"] == "r02c05f01p01-ch2sk1fk1fl1.tiff"
    assert rows[4]["Image_PathName_DNA"] == ""  # relative to the folder: the run's input
    assert "6 image sets (1 plate(s), 3 well(s)), channels DNA, ER" in result.output
    assert "1 file(s) that are not images left out (e.g. Index.idx.xml)" in result.output


def test_phenix_planes_become_image_sets_and_rows_above_z_are_letters(tmp_path):
    images = phenix(tmp_path / "p", wells=((27, 48),), fields=(1,), planes=(1, 2))
    out = tmp_path / "ld.csv"
    result = loaddata(str(images), "--pattern", "opera", "--channel", "1=DNA", "--channel", "2=ER", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [(r["Metadata_Plate"], r["Metadata_Well"], r["Metadata_Plane"]) for r in rows] == \
        [("p", "AA48", "1"), ("p", "AA48", "2")]  # plate: the folder's (above a Phenix `Images`) when none is given
    assert row_letter("16") == "P" and row_letter("32") == "AF"


def test_imagexpress_folder_reads_the_plate_from_file_names_and_leaves_thumbnails_out(tmp_path):
    folder = imagexpress(tmp_path / "export")
    out = tmp_path / "ld.csv"
    result = loaddata(str(folder), "--pattern", "imagexpress", "--channel", "01=DNA", "--channel", "2=ER", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [(r["Metadata_Plate"], r["Metadata_Well"], r["Metadata_Site"]) for r in rows] == \
        [("PLATE7", "A01", "1"), ("PLATE7", "A01", "2"), ("PLATE7", "B12", "1"), ("PLATE7", "B12", "2")]
    assert rows[0]["Image_PathName_DNA"] == "TimePoint_1" and "_w1" in rows[0]["Image_FileName_DNA"]
    assert "_thumb" not in "".join(r["Image_FileName_DNA"] + r["Image_FileName_ER"] for r in rows)
    assert "8 thumbnail(s) left out" in result.output and "PLATE7.HTD" in result.output


def test_a_custom_regex_with_row_and_column_groups(tmp_path):
    images = tmp_path / "scope"
    images.mkdir()
    for row in (1, 2):
        for channel in ("DAPI", "FITC"):
            (images / f"scan_R{row}_C3_F1_{channel}.png").write_bytes(b"\x89PNG")
    out = tmp_path / "ld.csv"
    regex = r"^scan_R(?P<row>\d+)_C(?P<column>\d+)_F(?P<field>\d+)_(?P<channel>[A-Z]+)\.png$"
    result = loaddata(str(images), "--pattern", regex, "--channel", "DAPI=DNA", "--channel", "FITC=ER", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert [(r["Metadata_Well"], r["Image_FileName_ER"]) for r in rows_of(out)] == \
        [("A03", "scan_R1_C3_F1_FITC.png"), ("B03", "scan_R2_C3_F1_FITC.png")]
    with pytest.raises(LoadDataError, match="needs the named group"):
        pattern_for(r"^(?P<well>\w+)_(?P<channel>\d)\.tif$")


# ------------------------------------------------------------------------- broken folders

def test_a_site_missing_a_channel_is_named(tmp_path):
    images = phenix(tmp_path / "p")
    (images / "r01c02f02p01-ch2sk1fk1fl1.tiff").unlink()
    result = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                      "-o", str(tmp_path / "ld.csv"))
    assert result.exit_code == 1
    assert error_line(result) == (
        "cpb: 1 site(s) lack a channel: plate p well A02 site 2 plane 1 has no channel 2 (ER) beside "
        "r01c02f02p01-ch1sk1fk1fl1.tiff: re-export the missing images, or move that site's files out")
    assert not (tmp_path / "ld.csv").exists()


def test_a_duplicate_site_is_named_with_both_files(tmp_path):
    images = phenix(tmp_path / "p")
    (images / "r01c01f01p01-ch1sk2fk1fl1.tiff").write_bytes(b"II*\x00later")  # a second time point
    result = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                      "-o", str(tmp_path / "ld.csv"))
    assert result.exit_code == 1
    assert ("two files for plate p well A01 site 1 plane 1 channel 1: r01c01f01p01-ch1sk1fk1fl1.tiff and "
            "r01c01f01p01-ch1sk2fk1fl1.tiff; keep one") in error_line(result)


def test_stray_image_files_are_named(tmp_path):
    folder = imagexpress(tmp_path / "export")
    (folder / "TimePoint_1" / "PLATE7_A01_s1.tif").write_bytes(b"II*\x00")  # a merged overlay someone saved
    (folder / "TimePoint_1" / "overview.TIF").write_bytes(b"II*\x00")
    result = loaddata(str(folder), "--pattern", "imagexpress", "--channel", "1=DNA", "--channel", "2=ER",
                      "-o", str(tmp_path / "ld.csv"))
    assert result.exit_code == 1
    assert error_line(result) == (
        f"cpb: 2 image file(s) in {folder} do not match the imagexpress pattern (e.g. TimePoint_1/PLATE7_A01_s1.tif, "
        "TimePoint_1/overview.TIF); move them out of the folder, or fix --pattern (files look like P1_A01_s1_w1.tif)")


def test_imagexpress_channel_ids_given_with_their_w_are_read_as_the_ids_or_named_as_unmatched(tmp_path):
    """New-user review: `--channel w1=DNA --channel w2=AGP --channel w3=Mito` on CP1_A01_s1_w1.tif said
    `channel 1 (e.g. CP1_A01_s1_w1.tif) has no --channel 1=NAME`."""
    images = imagexpress(tmp_path / "p", channels=(1, 2, 3))
    taken = loaddata(str(images), "--pattern", "imagexpress", "--channel", "w1=DNA", "--channel", "w2=AGP",
                     "--channel", "w3=Mito", "-o", str(tmp_path / "ld.csv"))
    assert taken.exit_code == 0, taken.output
    assert "note: --channel w1 read as channel 1, w2 read as channel 2, w3 read as channel 3" in taken.output
    assert {"Image_FileName_DNA", "Image_FileName_AGP", "Image_FileName_Mito"} <= set(rows_of(tmp_path / "ld.csv")[0])
    ambiguous = loaddata(str(images), "--pattern", "imagexpress", "--channel", "w1=DNA", "--channel", "1=AGP",
                         "--channel", "3=Mito", "-o", str(tmp_path / "ld.csv"))
    assert error_line(ambiguous) == (f"cpb: --channel w1=DNA: no file of channel w1 in {images}: w1 matched no "
                                     "channel id in the file names (channel ids found: 1, 2, 3)")


def test_channels_must_all_be_named_and_present(tmp_path):
    images = phenix(tmp_path / "p", channels=(1, 2, 3))
    unnamed = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                       "-o", str(tmp_path / "ld.csv"))
    assert ("channel 3 (e.g. r01c01f01p01-ch3sk1fk1fl1.tiff) has no --channel 3=NAME: name it, or leave it out "
            "with --channel 3=-") in error_line(unnamed)
    left_out = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                        "--channel", "3=-", "-o", str(tmp_path / "ld.csv"))
    assert left_out.exit_code == 0, left_out.output
    assert "Image_FileName_" not in "".join(k for k in rows_of(tmp_path / "ld.csv")[0] if k.endswith(("3", "-")))
    absent = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER", "--channel",
                      "3=-", "--channel", "4=Mito", "-o", str(tmp_path / "ld.csv"))
    assert "--channel 4=Mito: no file of channel 4" in error_line(absent)
    none = loaddata(str(images), "--pattern", "phenix", "-o", str(tmp_path / "ld.csv"))
    assert "name the channels: give --channel ID=NAME for each of 1, 2, 3" in error_line(none)
    with pytest.raises(LoadDataError, match="is given to two channels"):
        parse_channels(["1=DNA", "2=DNA"])


# ------------------------------------------------------------------------- the pipeline's image names, --illum

def test_channels_must_be_the_image_names_the_pipeline_uses(tmp_path):
    images = phenix(tmp_path / "p")
    wrong = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                     "--pipeline", str(NUCLEI), "-o", str(tmp_path / "ld.csv"))
    assert error_line(wrong) == ("cpb: pipeline nuclei.cppipe uses image 'Cells' (MeasureObjectIntensity (module 3)), "
                                 "but the channels give DNA, ER: name a channel Cells (--channel ID=Cells), or fix "
                                 "the pipeline")
    right = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=Cells",
                     "--pipeline", str(NUCLEI), "-o", str(tmp_path / "ld.csv"))
    assert right.exit_code == 0, right.output


def test_an_analysis_pipeline_needs_illum_columns_and_gets_them(tmp_path):
    images = phenix(tmp_path / "p")
    analysis = DATA / "plate_analysis.cppipe"
    without = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                       "--pipeline", str(analysis), "-o", str(tmp_path / "ld.csv"))
    assert ("uses the illumination function IllumDNA (CorrectIlluminationApply (module 2)): pass --illum "
            "<illumination output>") in error_line(without)
    illum_dir = tmp_path / "illum-out"
    result = loaddata(str(images), "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER",
                      "--pipeline", str(analysis), "--illum", str(illum_dir), "-o", str(tmp_path / "ld.csv"))
    assert result.exit_code == 0, result.output
    row = rows_of(tmp_path / "ld.csv")[0]
    assert (row["Image_FileName_IllumDNA"], row["Image_PathName_IllumDNA"]) == ("IllumDNA.npy", str(illum_dir.resolve()))
    assert (row["Image_FileName_IllumER"], row["Image_PathName_IllumER"]) == ("IllumER.npy", str(illum_dir.resolve()))


def test_images_in_the_bucket_and_illum_as_an_s3_output(aws, tmp_path):
    """IMAGES as a bucket prefix or s3:// URL: the listing is the bucket's; --illum becomes the
    s3://<bucket>/<output> path the worker reads the functions from."""
    local = phenix(tmp_path / "p")
    for path in sorted(local.iterdir()):
        put(aws, f"plates/P9/images/{path.name}", path.read_bytes())
    out = tmp_path / "ld.csv"
    result = loaddata(f"s3://{BUCKET}/plates/P9/images/", "--pattern", "phenix", "--channel", "1=DNA", "--channel",
                      "2=ER", "--plate", "P9", "--illum", "plates/P9/illum", "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 6 and rows[0]["Image_PathName_IllumER"] == f"s3://{BUCKET}/plates/P9/illum"
    assert f"image paths are relative to s3://{BUCKET}/plates/P9/images/" in result.output
    same = loaddata("plates/P9/images", "--pattern", "phenix", "--channel", "1=DNA", "--channel", "2=ER", "--plate",
                    "P9", "--illum", f"s3://{BUCKET}/plates/P9/illum/", "-o", str(tmp_path / "again.csv"))
    assert same.exit_code == 0 and (tmp_path / "again.csv").read_text() == out.read_text()
    other = loaddata("s3://not-the-stack/plates/P9/images", "--pattern", "phenix", "-o", str(out))
    assert "is in bucket 'not-the-stack', but this stack's bucket is" in error_line(other)
