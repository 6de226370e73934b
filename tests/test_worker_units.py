"""Worker logic that needs no CellProfiler run: pipeline reading, planning,
image-set counting from file rules, LoadData rewriting, range maths, merging."""
from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest

from cpb_worker import datafile as df
from cpb_worker.errors import BadInput, PipelineFailed
from cpb_worker.filerules import count_image_sets, parse_rule
from cpb_worker.job import JobSpec, plan_job
from cpb_worker.merge import merge
from cpb_worker.pipeline import load_pipeline, parse_modules, unsplittable_reasons
from cpb_worker.ranges import array_child_range, available_cpus, split_range
from cpb_worker.runner import RangeResult

REPO = Path(__file__).resolve().parent.parent
NUCLEI = REPO / "cpb" / "pipelines" / "nuclei.cppipe"


def _variant(tmp_path: Path, old: str, new: str, name: str = "variant.cppipe") -> Path:
    text = NUCLEI.read_text()
    assert old in text, f"{old!r} not in nuclei.cppipe"
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


# --- ranges -----------------------------------------------------------------

@pytest.mark.parametrize("first,last,parts,expected", [
    (1, 8, 2, [(1, 4), (5, 8)]),
    (1, 7, 3, [(1, 3), (4, 5), (6, 7)]),
    (5, 6, 4, [(5, 5), (6, 6)]),  # never more processes than image sets
    (3, 3, 1, [(3, 3)]),
])
def test_split_range_is_contiguous_and_balanced(first, last, parts, expected):
    assert split_range(first, last, parts) == expected


def test_array_child_ranges_cover_every_set_once_and_reject_bad_index():
    covered = [n for i in range(4) for n in range(array_child_range(i, 3, 10)[0], array_child_range(i, 3, 10)[1] + 1)]
    assert covered == list(range(1, 11))
    with pytest.raises(BadInput, match="AWS_BATCH_JOB_ARRAY_INDEX 4 is out of range.*indexes 0..3"):
        array_child_range(4, 3, 10)
    with pytest.raises(BadInput, match="out of range"):
        array_child_range(-1, 3, 10)


def test_cpus_come_from_cpb_vcpus_else_the_machine():
    assert available_cpus({"CPB_VCPUS": "6"}) == 6
    assert available_cpus({}) >= 1
    with pytest.raises(BadInput, match="CPB_VCPUS"):
        available_cpus({"CPB_VCPUS": "lots"})


# --- pipeline reading -------------------------------------------------------

def test_nuclei_pipeline_parses_and_is_splittable():
    pipeline = load_pipeline(NUCLEI)
    assert [m.name for m in pipeline.modules][:2] == ["LoadData", "IdentifyPrimaryObjects"]
    assert unsplittable_reasons(pipeline) == []
    assert len(pipeline.sha256) == 64


@pytest.mark.parametrize("mutation,match", [
    (lambda t: t.replace("ModuleCount:7", "ModuleCount:9"), "ModuleCount:9 but 7 modules"),
    (lambda t: t[: len(t) // 2].rsplit("\n", 3)[0] + "\nIdentifyPrimaryObjects:[module_num:9", "cannot read module line"),
    (lambda t: "<html>not a pipeline</html>", "not a CellProfiler .cppipe"),
    (lambda t: t.replace("Version:5", "Version:1"), "Version:1"),
])
def test_corrupt_pipelines_are_bad_input_with_a_reason(tmp_path, mutation, match):
    path = tmp_path / "broken.cppipe"
    path.write_text(mutation(NUCLEI.read_text()))
    with pytest.raises(BadInput, match=match):
        load_pipeline(path)


def test_project_files_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "p.cpproj"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(BadInput, match="save it with File > Export > Pipeline"):
        load_pipeline(path)


@pytest.mark.parametrize("old,new,why", [
    ("When to save:Every cycle", "When to save:Last cycle", "saves only on the last cycle"),
    ("Group images by metadata?:No", "Group images by metadata?:Yes", "groups image sets"),
    ("MeasureObjectSizeShape:[", "TrackObjects:[", "tracks across image sets"),
    ("Select the type of image to save:Image", "Select the type of image to save:Movie/Stack", "movie/stack"),
])
def test_unsplittable_pipelines_are_detected(tmp_path, old, new, why):
    reasons = unsplittable_reasons(load_pipeline(_variant(tmp_path, old, new)))
    assert any(why in r for r in reasons), reasons


def test_unsplittable_pipeline_plans_one_process_and_refuses_a_partial_range(tmp_path):
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=4, seed=1, size=96, nuclei=(1, 2))
    pipeline = _variant(tmp_path, "When to save:Every cycle", "When to save:Last cycle")
    plan = plan_job(JobSpec(pipeline=pipeline, input_dir=plate.images_dir, data_file=plate.data_file, workers=4))
    assert plan.ranges == [None] and (plan.first, plan.last) == (1, 4)
    with pytest.raises(BadInput, match="cannot be split.*without image_sets_per_job"):
        plan_job(JobSpec(pipeline=pipeline, input_dir=plate.images_dir, data_file=plate.data_file,
                         array_index=1, sets_per_job=2))
    forced = plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file,
                              workers=4, force_unsplittable=True))
    assert forced.ranges == [None] and forced.unsplittable == ["CPB_UNSPLITTABLE=1"]
    split = plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, workers=4))
    assert split.ranges == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_pipeline_without_export_is_refused_before_running(tmp_path):
    pipeline = _variant(tmp_path, "|enabled:True|wants_pause:False]\n    Select the column delimiter",
                        "|enabled:False|wants_pause:False]\n    Select the column delimiter")
    with pytest.raises(BadInput, match="no enabled ExportToSpreadsheet"):
        plan_job(JobSpec(pipeline=pipeline, input_dir=tmp_path, data_file=None))


def test_expected_count_mismatch_and_stray_data_file_are_bad_input(tmp_path):
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=3, seed=1, size=96, nuclei=(1, 2))
    with pytest.raises(BadInput, match="CPB_IMAGE_SET_COUNT is 5 but the data file gives 3"):
        plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, expected_count=5))
    with pytest.raises(BadInput, match="range 2-9 is outside the 3 image sets"):
        plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, first=2, last=9))
    no_loaddata = _variant(tmp_path, "|enabled:True|wants_pause:False]\n    Input data file location",
                           "|enabled:False|wants_pause:False]\n    Input data file location")
    with pytest.raises(BadInput, match=r"data file load_data\.csv was given but pipeline variant\.cppipe has no "
                                       r"LoadData module: add LoadData, or drop the data file \(--data-file, "):
        plan_job(JobSpec(pipeline=no_loaddata, input_dir=plate.images_dir, data_file=plate.data_file))


# --- counting image sets without a data file ---------------------------------

def test_file_rules_count_example_human_like_cellprofiler(shared_examples, tmp_path):
    """ExampleHuman's NamesAndTypes rules (order matching) give 1 set; duplicating
    the three channel files under new names gives 2, which CellProfiler would make too."""
    pipeline = load_pipeline(shared_examples / "ExampleHuman" / "ExampleHuman.cppipe")
    images = tmp_path / "images"
    shutil.copytree(shared_examples / "ExampleHuman" / "images", images)
    assert count_image_sets(pipeline, images) == 1
    for f in list(images.iterdir()):
        shutil.copy(f, images / f.name.replace("AS_09125", "ZZ_09125"))
    (images / "notes.txt").write_text("not an image")
    (images / ".hidden").mkdir()
    assert count_image_sets(pipeline, images) == 2


def test_filter_rule_grammar():
    rule = parse_rule('or (file does contain "d0") (and (extension does istif) (file doesnot startwith "x"))')
    assert rule("", "a_d0.png") and rule("", "b.tif") and not rule("", "x.tif") and not rule("", "b.png")
    regex = parse_rule('and (directory doesnot containregexp "[\\\\\\\\/]\\\\.")')
    assert regex("plate1", "a.tif") and not regex("plate1/.snap", "a.tif")


def test_metadata_matching_counts_sites_present_in_every_channel(tmp_path):
    text = """CellProfiler Pipeline: http://www.cellprofiler.org
Version:5
DateRevision:400
GitHash:
ModuleCount:3
HasImagePlaneDetails:False

Images:[module_num:1|svn_version:'Unknown'|variable_revision_number:2|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    :
    Filter images?:Images only
    Select the rule criteria:and (extension does isimage)

Metadata:[module_num:2|svn_version:'Unknown'|variable_revision_number:6|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Extract metadata?:Yes
    Metadata data type:Text
    Metadata types:{}
    Extraction method count:1
    Metadata extraction method:Extract from file/folder names
    Metadata source:File name
    Regular expression to extract from file name:^(?P<Well>[A-P][0-9]{2})_s(?P<Site>[0-9])_w(?P<Channel>[12])
    Regular expression to extract from folder name:(?P<Date>.*)
    Extract metadata from:All images
    Select the filtering criteria:and (file does contain "")
    Metadata file location:Elsewhere...|
    Match file and image metadata:[]
    Use case insensitive matching?:No
    Metadata file name:
    Does cached metadata exist?:No

NamesAndTypes:[module_num:3|svn_version:'Unknown'|variable_revision_number:8|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]
    Assign a name to:Images matching rules
    Select the image type:Grayscale image
    Name to assign these images:DNA
    Match metadata:[{'DNA': 'Well', 'GFP': 'Well'}, {'DNA': 'Site', 'GFP': 'Site'}]
    Image set matching method:Metadata
    Set intensity range from:Image metadata
    Assignments count:2
    Single images count:0
    Maximum intensity:255.0
    Process as 3D?:No
    Relative pixel spacing in X:1.0
    Relative pixel spacing in Y:1.0
    Relative pixel spacing in Z:1.0
    Select the rule criteria:and (file does contain "_w1")
    Name to assign these images:DNA
    Name to assign these objects:Cell
    Select the image type:Grayscale image
    Set intensity range from:Image metadata
    Maximum intensity:255.0
    Select the rule criteria:and (file does contain "_w2")
    Name to assign these images:GFP
    Name to assign these objects:Cell
    Select the image type:Grayscale image
    Set intensity range from:Image metadata
    Maximum intensity:255.0
"""
    path = tmp_path / "meta.cppipe"
    path.write_text(text)
    images = tmp_path / "images"
    images.mkdir()
    for name in ["A01_s1_w1.tif", "A01_s1_w2.tif", "A01_s2_w1.tif", "A01_s2_w2.tif", "B02_s1_w2.tif",
                 "B02_s1_w1.tif", "C03_s1_w1.tif"]:  # C03 lacks w2: no image set
        (images / name).write_bytes(b"x")
    pipeline = type(load_pipeline(NUCLEI))(path=path, sha256="", modules=parse_modules(text))
    assert count_image_sets(pipeline, images) == 3


# --- LoadData CSVs ----------------------------------------------------------

def test_data_file_errors_name_the_row_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Image_FileName_DNA,Metadata_Well\na.tif,A01\nb.tif\n")
    with pytest.raises(BadInput, match="line 3 has 1 fields, the header has 2"):
        df.read_data_file(bad)
    bad.write_text("Metadata_Well\nA01\n")
    with pytest.raises(BadInput, match="no Image_FileName_<name> or Image_URL_<name> column"):
        df.read_data_file(bad)
    bad.write_text("Image_FileName_DNA\n")
    with pytest.raises(BadInput, match="lists no image sets"):
        df.read_data_file(bad)
    for separator in (";", "\t"):  # European Excel's "CSV" and a tab-separated export
        bad.write_text(f"Image_FileName_DNA{separator}Image_FileName_Cells\na.tif{separator}b.tif\n")
        with pytest.raises(BadInput, match=f"separates its columns with {re.escape(repr(separator))}, LoadData needs commas: "
                                           r"save it as CSV \(comma delimited\)"):
            df.read_data_file(bad)
    with pytest.raises(BadInput, match=r"data file not found: .*absent\.csv \(check --data-file, or the job "
                                       r"message's 'data_file' key\)"):  # local runs have a flag, not a message
        df.read_data_file(tmp_path / "absent.csv")


def test_rewrite_points_every_location_at_staged_files(tmp_path):
    src = tmp_path / "ld.csv"
    src.write_text("Image_FileName_DNA,Image_PathName_DNA,Image_URL_GFP,Metadata_Well\n"
                   "a.tif,sub,s3://bkt/x/g1.tif,A01\n"
                   "b.tif,,s3://bkt/x/g2.tif,A02\n")
    data = df.read_data_file(src)
    assert [loc for _, _, loc in df.image_locations(data, 1, 2)] == ["sub/a.tif", "s3://bkt/x/g1.tif",
                                                                      "b.tif", "s3://bkt/x/g2.tif"]
    out = df.rewrite(data, lambda loc: "/stage/" + loc.replace("s3://", ""), tmp_path / "out.csv")
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["Image_PathName_DNA"] == "/stage/sub" and rows[0]["Image_FileName_DNA"] == "a.tif"
    assert rows[1]["Image_PathName_GFP"] == "/stage/bkt/x" and rows[1]["Image_FileName_GFP"] == "g2.tif"
    assert "Image_URL_GFP" not in rows[0] and rows[1]["Metadata_Well"] == "A02"


# --- merging ----------------------------------------------------------------

def _range_dir(root: Path, first: int, last: int, numbers, objects_per_image: int = 2, header_extra: str = "") -> RangeResult:
    out = root / f"r{first}"
    out.mkdir(parents=True)
    with open(out / "Image.csv", "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["ImageNumber", "Count_Nuclei", "PathName_Overlay" + header_extra])
        for n in numbers:
            w.writerow([n, objects_per_image, str(out)])
    with open(out / "Nuclei.csv", "w", newline="") as h:
        w = csv.writer(h)
        w.writerow(["ImageNumber", "ObjectNumber", "AreaShape_Area"])
        for n in numbers:
            for o in range(1, objects_per_image + 1):
                w.writerow([n, o, 10 * n + o])
    (out / "Experiment.csv").write_text(f"Key,Value\nCellProfiler_Version,4.2.8\nRun_Timestamp,{first}\n")
    (out / f"overlay_{first}.png").write_bytes(b"png" * first)
    return RangeResult(first=first, last=last, out_dir=out, log=out / "log", exit_code=0, seconds=1.0)


@pytest.mark.parametrize("local_numbering", [False, True], ids=["global-ImageNumber", "per-range-ImageNumber"])
def test_merge_makes_image_numbers_global_either_way(tmp_path, local_numbering):
    a = _range_dir(tmp_path, 1, 2, [1, 2])
    b = _range_dir(tmp_path, 3, 5, [1, 2, 3] if local_numbering else [3, 4, 5])
    result = merge([a, b], tmp_path / "out")
    image = list(csv.DictReader((tmp_path / "out" / "Image.csv").open()))
    nuclei = list(csv.DictReader((tmp_path / "out" / "Nuclei.csv").open()))
    assert [int(r["ImageNumber"]) for r in image] == [1, 2, 3, 4, 5]
    assert [int(r["ImageNumber"]) for r in nuclei] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(r["PathName_Overlay"] == str(tmp_path / "out") for r in image)
    assert (tmp_path / "out" / "Experiment.csv").read_text().endswith("Run_Timestamp,1\n")  # the first range's
    assert result.cellprofiler_version == "4.2.8" and result.renumbered == local_numbering
    assert sorted(result.files) == ["Experiment.csv", "Image.csv", "Nuclei.csv", "overlay_1.png", "overlay_3.png"]


def test_merge_copies_rows_exactly_even_without_a_final_newline(tmp_path):
    a = _range_dir(tmp_path, 1, 1, [1])
    b = _range_dir(tmp_path, 2, 2, [2])
    nuclei = a.out_dir / "Nuclei.csv"
    nuclei.write_text(nuclei.read_text().rstrip("\r\n"))  # a table cut off without its last newline
    merge([a, b], tmp_path / "out")
    rows = list(csv.reader((tmp_path / "out" / "Nuclei.csv").open()))
    assert rows[0] == ["ImageNumber", "ObjectNumber", "AreaShape_Area"]
    assert [r[:2] for r in rows[1:]] == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]]


def test_merge_refuses_different_headers(tmp_path):
    a = _range_dir(tmp_path, 1, 1, [1])
    b = _range_dir(tmp_path, 2, 2, [2], header_extra="X")
    with pytest.raises(PipelineFailed, match="Image.csv has different columns in image sets 2-2"):
        merge([a, b], tmp_path / "out")


# --- the container ----------------------------------------------------------

def test_worker_imports_only_stdlib_and_boto3():
    """The container adds nothing but boto3 to CellProfiler's Python. cpsets.py runs IN CellProfiler's
    interpreter (never imported by the worker) and may use what CellProfiler brings."""
    import ast
    import sys
    allowed = set(sys.stdlib_module_names) | {"boto3", "botocore", "cpb_worker"}
    for path in sorted((REPO / "image" / "cpb_worker").glob("*.py")):
        if path.name == "cpsets.py":
            allowed_here = allowed | {"numpy", "cellprofiler", "cellprofiler_core"}
        else:
            allowed_here = allowed
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed_here, f"{path.name} imports {name}"
        assert "from __future__ import annotations" in path.read_text(), path.name


def test_dockerfile_builds_from_the_configured_cellprofiler_tag_as_non_root():
    text = (REPO / "image" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("ARG CELLPROFILER_TAG=4.2.")  # the build arg components/image.py passes
    assert "FROM cellprofiler/cellprofiler:${CELLPROFILER_TAG}" in lines
    users = [line for line in lines if line.startswith("USER ")]
    assert users[-1] not in ("USER root", "USER 0") and users[-1].startswith("USER 10001")
    assert lines[-2] == 'ENTRYPOINT ["/usr/local/bin/cpb-python", "-m", "cpb_worker"]'
    assert "requirements.txt" in text and "boto3==1.37.38" in (REPO / "image" / "requirements.txt").read_text()
    ignore = (REPO / "image" / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!Dockerfile", "!requirements.txt", "!cpb_worker/"]


def test_loaddata_row_range_setting_shifts_image_sets_to_csv_rows(tmp_path):
    """'Process just a range of rows' 2-3: image set 1 is CSV row 2, and only rows 2-3 need images."""
    from cpb.demo.synthetic import make_plate
    from cpb_worker.job import check_images
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=4, seed=1, size=64, nuclei=(1, 1))
    pipeline = _variant(tmp_path, "Process just a range of rows?:No\n    Rows to process:1,100000",
                        "Process just a range of rows?:Yes\n    Rows to process:2,3")
    plan = plan_job(JobSpec(pipeline=pipeline, input_dir=plate.images_dir, data_file=plate.data_file, workers=2))
    assert (plan.total, plan.rows_skipped, plan.ranges) == (2, 1, [(1, 1), (2, 2)])
    (plate.images_dir / "SYN1_A01_s1_w1.tif").unlink()  # CSV row 1: outside LoadData's rows
    check_images(plan, plate.data_file, plate.images_dir, tmp_path / "out")
    (plate.images_dir / "SYN1_A01_s2_w1.tif").unlink()  # CSV row 2 = image set 1
    with pytest.raises(BadInput, match=r"image set 1 \(data file line 3\) Image_FileName_DNA"):
        check_images(plan, plate.data_file, plate.images_dir, tmp_path / "out")


@pytest.mark.cellprofiler
def test_a_local_run_with_a_row_range_runs_the_rows_the_worker_planned(tmp_path, cellprofiler_env):
    """Adversary: LoadData's "Process just a range of rows" counts a blank line as a row (it skips it
    only after the range test); the worker does not. A local run handed CellProfiler the data file as
    is, so with a blank line after the header, rows 2-3 were sites 1-2 for CellProfiler and sites 2-3
    for the worker: sites 1-2 were processed, recorded as rows 2-3, checked, and succeeded (the cloud,
    which gives CellProfiler the worker's rows, processes sites 2-3)."""
    from cpb.demo.synthetic import make_plate
    from cpb_worker.local import run_local
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=4, seed=1, size=64, nuclei=(1, 1))
    lines = plate.data_file.read_text().splitlines(keepends=True)
    blank = tmp_path / "with_blank_line.csv"
    blank.write_text(lines[0] + "\n" + "".join(lines[1:]))
    pipeline = _variant(tmp_path, "Process just a range of rows?:No\n    Rows to process:1,100000",
                        "Process just a range of rows?:Yes\n    Rows to process:2,3")
    record = run_local(pipeline, plate.images_dir, tmp_path / "out", data_file=blank, workers=1, env=cellprofiler_env)
    assert (record.first, record.last) == (1, 2)
    with open(tmp_path / "out" / "Image.csv", newline="") as handle:
        names = [row["FileName_DNA"] for row in csv.DictReader(handle)]
    assert names == ["SYN1_A01_s2_w1.tif", "SYN1_A01_s3_w1.tif"]


# --- AWS-mode environment and key mapping -----------------------------------

def _job_env(**extra):
    env = {"CPB_BUCKET": "bkt", "CPB_PIPELINE": "p/x.cppipe", "CPB_INPUT": "in/plate1/", "CPB_OUTPUT": "/out/run1"}
    env.update(extra)
    return env


def test_job_environment_is_validated_and_normalised():
    from cpb_worker.aws import JobEnv
    job = JobEnv.from_env(_job_env(CPB_IMAGE_SETS_PER_JOB="4", AWS_BATCH_JOB_ARRAY_INDEX="3"))
    assert (job.input, job.output, job.prefix, job.array_index) == ("in/plate1", "out/run1", "out/run1/part-00003", 3)
    requeued = JobEnv.from_env(_job_env(CPB_IMAGE_SETS_PER_JOB="4", CPB_ARRAY_INDEX="2"))  # cpb requeue
    assert requeued.prefix == "out/run1/part-00002"
    assert JobEnv.from_env(_job_env()).prefix == "out/run1"
    with pytest.raises(BadInput, match="array child without CPB_IMAGE_SETS_PER_JOB"):
        JobEnv.from_env(_job_env(AWS_BATCH_JOB_ARRAY_INDEX="1"))
    with pytest.raises(BadInput, match="CPB_IMAGE_SET_COUNT must be a whole number"):
        JobEnv.from_env(_job_env(CPB_IMAGE_SET_COUNT="many"))
    with pytest.raises(BadInput, match="lacks CPB_INPUT, CPB_OUTPUT"):
        JobEnv.from_env({"CPB_BUCKET": "b", "CPB_PIPELINE": "p"})


def test_data_file_locations_map_to_keys_in_the_job_bucket(tmp_path):
    from cpb_worker.aws import JobEnv, Stager
    fsx = tmp_path / "fsx"
    fsx.mkdir()
    stager = Stager(JobEnv.from_env(_job_env(CPB_FSX_ROOT=str(fsx))), s3=None, root=tmp_path / "s3")
    assert stager.key_for("a.tif", "in/plate1") == "in/plate1/a.tif"
    assert stager.key_for("sub/a.tif", "in/plate1") == "in/plate1/sub/a.tif"
    assert stager.key_for("s3://bkt/other/a.tif", "in/plate1") == "other/a.tif"
    assert stager.key_for(f"{fsx}/shared/a.tif", "in/plate1") == "shared/a.tif"
    assert stager.local("in/plate1/a.tif") == fsx / "in" / "plate1" / "a.tif"
    with pytest.raises(BadInput, match="images must be in the job's bucket s3://bkt"):
        stager.key_for("s3://someone-else/a.tif", "in")
    with pytest.raises(BadInput, match="absolute path outside the bucket"):
        stager.key_for("/home/me/a.tif", "in")
    with pytest.raises(BadInput, match="not a plain relative key"):
        stager.local("in/../../etc/passwd")


def test_loaddata_pipeline_without_data_file_says_to_pass_one(tmp_path):
    """Forgetting --data-file is the usual LoadData mistake: the error must name the flag, not a message key."""
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=2, seed=1, size=96, nuclei=(1, 2))
    (plate.images_dir / "load_data.csv").unlink()  # only the copy outside the images folder is left
    with pytest.raises(BadInput, match=r"LoadData but no data file was given.*load_data\.csv.*--data-file"):
        plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=None))
    # the CSV LoadData names, where it names it, still works without the flag
    shutil.copy(plate.data_file, plate.images_dir / "load_data.csv")
    assert plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=None, workers=1)).total == 2


def test_empty_input_folder_is_bad_input_before_cellprofiler_starts(shared_examples, tmp_path):
    """An empty --input once reached CellProfiler and came back as "wrote no Image.csv" (exit 3)."""
    empty = tmp_path / "images"
    empty.mkdir()
    with pytest.raises(BadInput, match=r"input folder .*images has no files: point the input at the images"):
        plan_job(JobSpec(pipeline=shared_examples / "ExampleHuman" / "ExampleHuman.cppipe", input_dir=empty))


@pytest.mark.parametrize("location", ["Default Input Folder|", "Elsewhere...|/Users/me/outlines",
                                      "Same folder as image|"])
def test_saveimages_outside_the_output_folder_is_refused(tmp_path, location):
    """Such images landed in the scientist's input folder (locally) or the container's scratch (AWS),
    never in the results, while the run said succeeded."""
    text = NUCLEI.read_text()
    saving = text.index("SaveImages:[")
    setting = "Output file location:Default Output Folder|"
    at = text.index(setting, saving)  # SaveImages' own, not ExportToSpreadsheet's
    pipeline = tmp_path / "saves-elsewhere.cppipe"
    pipeline.write_text(text[:at] + "Output file location:" + location + text[at + len(setting):])
    kind = location.split("|")[0]
    with pytest.raises(BadInput, match=rf"SaveImages \(module 6\) saves to '{re.escape(kind)}', so its images "
                                       r"would not be in the results: set its 'Output file location' to Default"):
        plan_job(JobSpec(pipeline=pipeline, input_dir=tmp_path, data_file=None))
    sub = tmp_path / "saves-in-subfolder.cppipe"
    sub.write_text(text[:at] + "Output file location:Default Output Folder sub-folder|outlines"
                   + text[at + len(setting):])
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=1, seed=1, size=96, nuclei=(1, 2))
    assert plan_job(JobSpec(pipeline=sub, input_dir=plate.images_dir, data_file=plate.data_file)).total == 1


def test_missing_images_say_when_the_csv_was_written_for_another_machine(tmp_path):
    """A CSV with the author's absolute Image_PathName_ folders: the file names are right, the folders
    are not; the error points at the columns to fix instead of only listing absent paths."""
    from cpb.demo.synthetic import make_plate
    from cpb_worker.job import check_images
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=2, seed=1, size=96, nuclei=(1, 2))
    rows = list(csv.reader(open(plate.data_file)))
    moved = tmp_path / "from_alice.csv"
    with open(moved, "w", newline="") as handle:
        csv.writer(handle).writerows([rows[0] + ["Image_PathName_DNA", "Image_PathName_Cells"]]
                                     + [r + ["/Users/alice/plate1", "/Users/alice/plate1"] for r in rows[1:]])
    plan = plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=moved))
    with pytest.raises(BadInput, match=r"image not found: image set 1 .*/Users/alice/plate1/SYN1_A01_s1_w1\.tif.*"
                                       rf"; files of those names are in {re.escape(str(plate.images_dir))}: drop "
                                       r"the data file's Image_PathName_ columns or make them relative to it"):
        check_images(plan, moved, plate.images_dir, tmp_path / "out")
    (plate.images_dir / "SYN1_A01_s1_w1.tif").unlink()  # absent everywhere: the general advice
    with pytest.raises(BadInput, match=r"SYN1_A01_s1_w1\.tif; check the data file's paths and the input folder"):
        check_images(plan, plate.data_file, plate.images_dir, tmp_path / "out")


# --- who counts the image sets of a pipeline without LoadData ----------------

def test_cellprofilers_python_is_found_from_the_cellprofiler_script(tmp_path):
    from cpb_worker.runner import cellprofiler_python
    script = tmp_path / "cellprofiler"
    script.write_text("#!/opt/venv/bin/python3.8\nfrom cellprofiler.__main__ import main\n")
    assert cellprofiler_python({"CPB_CELLPROFILER": str(script)}) == ("/opt/venv/bin/python3.8", "")
    script.write_text("#!/usr/bin/env python3\n")
    found, _ = cellprofiler_python({"CPB_CELLPROFILER": str(script), "PATH": "/usr/bin:/bin"})
    assert Path(found).name.startswith("python3")
    script.write_text("#!/bin/sh\nexec real-cellprofiler \"$@\"\n")
    assert cellprofiler_python({"CPB_CELLPROFILER": str(script)}) == (None, f"{script} runs /bin/sh, not Python")
    assert cellprofiler_python({"CPB_CELLPROFILER": str(script), "CPB_CELLPROFILER_PYTHON": "/usr/local/bin/cpb-python"}) \
        == ("/usr/local/bin/cpb-python", "")
    assert cellprofiler_python({"CPB_CELLPROFILER": "no-such-cellprofiler", "PATH": str(tmp_path)})[0] is None


def test_without_a_python_cellprofiler_a_names_and_types_pipeline_runs_as_one_process(tmp_path):
    from cpb.demo.synthetic import METADATA_PIPELINE, make_metadata_plate
    plate = make_metadata_plate(tmp_path / "plate", wells=("B03",), sites=2, seed=1, size=96, nuclei=(1, 1))
    wrapper = tmp_path / "cellprofiler"
    wrapper.write_text("#!/bin/sh\nexec cellprofiler \"$@\"\n")
    plan = plan_job(JobSpec(pipeline=METADATA_PIPELINE, input_dir=plate.images_dir, workers=4,
                            env={"CPB_CELLPROFILER": str(wrapper)}))
    assert plan.ranges == [None] and plan.counting.startswith("nobody: CellProfiler cannot be asked to count")
    assert plan.warnings == [f"one CellProfiler process over every image set: {plan.counting}"]
    python_plan = plan_job(JobSpec(pipeline=METADATA_PIPELINE, input_dir=plate.images_dir, workers=4,
                                   env={"CPB_CELLPROFILER_PYTHON": "/usr/bin/python3"}))
    assert python_plan.counting == "CellProfiler"
    assert [(p.part, p.parts) for p in python_plan.procs] == [(0, 2), (1, 2)]  # 2 sets: 2 parts, not 4
    child = plan_job(JobSpec(pipeline=METADATA_PIPELINE, input_dir=plate.images_dir, workers=4, array_index=0,
                             sets_per_job=1, expected_count=2, env={"CPB_CELLPROFILER_PYTHON": "/usr/bin/python3"}))
    assert [(p.part, p.parts, p.window, p.expect) for p in child.procs] == [(0, 1, (1, 1), 2)]


def test_cpsets_refuses_a_cellprofiler_whose_pipeline_lacks_the_hooks():
    from cpb_worker.cpsets import _unsupported, split_range as cp_split

    class Other:
        def prepare_run(self, workspace):  # noqa: ANN001, ANN201
            return True

        def group(self, grouping, start, end):  # noqa: ANN001, ANN201 - renamed parameters
            return []

    assert "group" in _unsupported(Other) and _unsupported(type("Empty", (), {})) == \
        "cellprofiler_core Pipeline has no prepare_run()"
    assert cp_split(3, 9, 2) == split_range(3, 9, 2)  # cpsets cuts exactly as the worker


def test_cellprofiler_counted_parts_must_agree_and_tile_the_range(tmp_path):
    from cpb_worker.errors import PipelineFailed
    from cpb_worker.job import Plan, _check_reports
    from cpb_worker.record import RunRecord
    from cpb_worker.runner import Proc

    def plan(window=None):
        return Plan(pipeline=None, data=None, data_file=None, total=None, first=None, last=None,
                    procs=[Proc(part=i, parts=3, window=window) for i in range(3)], unsplittable=[], grouped=False,
                    counting="CellProfiler")

    def result(report, first=None, last=None):
        r = RangeResult(first=first, last=last, out_dir=tmp_path, log=tmp_path / "log", exit_code=0, seconds=1,
                        report=report, counted=True)
        return r

    record = RunRecord()
    ok = plan()
    _check_reports(ok, [result({"status": "running", "count": 2}, 1, 1), result({"status": "running", "count": 2}, 2, 2),
                        result({"status": "idle", "count": 2})], record)
    assert (ok.first, ok.last, ok.total, record.processes) == (1, 2, 2, 2)
    assert record.warnings == ["1 of 3 CellProfiler processes had no image set to run (CellProfiler made 2)"]
    with pytest.raises(PipelineFailed, match=r"made different image-set lists \(\[5, 6\] sets\)"):
        _check_reports(plan(), [result({"status": "running", "count": 5}, 1, 3),
                                result({"status": "running", "count": 6}, 4, 6)], RunRecord())
    with pytest.raises(BadInput, match="CPB_IMAGE_SET_COUNT is 5 but CellProfiler makes 6"):
        _check_reports(plan(), [result({"status": "refused", "count": 6,
                                        "reason": "CPB_IMAGE_SET_COUNT is 5 but CellProfiler makes 6 image sets"})],
                       RunRecord())
    with pytest.raises(PipelineFailed, match=r"do not tile image sets 3-6"):
        _check_reports(plan(window=(3, 6)), [result({"status": "running", "count": 9}, 3, 4),
                                             result({"status": "running", "count": 9}, 6, 6)], RunRecord())
    with pytest.raises(PipelineFailed, match="CellProfiler found no image sets in the input folder"):
        _check_reports(plan(), [result({"status": "no-image-sets"})], RunRecord())
    with pytest.raises(PipelineFailed, match=r"stopped before making its image-set list \(exit 0\)"):
        _check_reports(plan(), [result(None)], RunRecord())


def test_the_lambdas_listing_count_equals_the_folder_count(tmp_path):
    """The ingress Lambda has S3 keys, not a folder: count_image_sets_in_listing on the keys (input
    prefix removed) must equal count_image_sets on the same files, '(None)' illumination channels too."""
    from cpb.demo.synthetic import METADATA_PIPELINE, make_metadata_plate
    from cpb_worker.filerules import count_image_sets_in_listing
    plate = make_metadata_plate(tmp_path / "plate", wells=("B03", "C04"), sites=3, seed=1, size=96, nuclei=(1, 1))
    pipeline = load_pipeline(METADATA_PIPELINE)
    keys = [p.relative_to(plate.images_dir).as_posix() for p in plate.images]
    assert count_image_sets(pipeline, plate.images_dir) == count_image_sets_in_listing(pipeline, keys) == 6
    assert count_image_sets_in_listing(pipeline, keys + ["illum/SYN2_IllumDNA_old.npy"]) == 6  # not "_IllumDNA.npy"
    assert count_image_sets_in_listing(pipeline, keys + ["illum/other_IllumDNA.npy"]) is None  # 2 files for one
    assert count_image_sets_in_listing(pipeline, [k for k in keys if "r03c04f03p01-ch2" not in k]) == 5


def test_cellprofiler_processes_get_one_thread_and_a_jvm_without_its_optimising_compiler():
    """The C2 compiler spent ~2.5 s CPU per process on its own threads (bench/bench_worker.py), which N
    processes on N vCPUs pay; a JIT choice the environment already makes is left alone."""
    from cpb_worker.runner import child_env
    env = child_env({"PATH": "/bin", "OMP_NUM_THREADS": "4"})
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    assert env["JAVA_TOOL_OPTIONS"] == "-XX:TieredStopAtLevel=1"
    assert child_env({"JAVA_TOOL_OPTIONS": "-Xmx4g"})["JAVA_TOOL_OPTIONS"] == "-Xmx4g -XX:TieredStopAtLevel=1"
    assert child_env({"JAVA_TOOL_OPTIONS": "-XX:-TieredCompilation"})["JAVA_TOOL_OPTIONS"] == "-XX:-TieredCompilation"
