"""Issue 11.3 and 11.4: success means complete. Every per-image table holds exactly the job's
image sets, every per-object table exactly Count_<Object> rows per image set; relationship
tables and .gct files are merged, not taken from one range; any other file whose copies
differ between ranges is refused by name; a nonzero CellProfiler exit fails the job unless
every range wrote the same tables and every table is complete.

Unit cases build CellProfiler-shaped range folders; the partial failure is real CellProfiler
behind a wrapper that deletes a table and exits 1 (a full disk), through AWS mode on moto."""
from __future__ import annotations

import csv
import json
import stat
import sys
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from cpb_worker import aws as worker_aws
from cpb_worker.errors import PipelineFailed
from cpb_worker.local import run_local
from cpb_worker.merge import merge
from cpb_worker.record import read_local
from cpb_worker.runner import RangeResult
from cpb_worker.verify import check_exit_codes, range_tables, tables_lacking, verify_tables

from test_worker_support import NUCLEI, read_rows

pytestmark = pytest.mark.race


def _write(path: Path, rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)


def _range(root: Path, first: int, last: int, counts, numbering_from_1=False, relationships=True,
           exit_code=0, drop_rows=0) -> RangeResult:
    """A CellProfiler-shaped range folder: Image.csv with Count_Nuclei, Nuclei.csv with that many rows
    per image (minus `drop_rows` of the last image), Object relationships.csv (Nuclei -> Cells)."""
    out = root / f"range-{first}-{last}"
    numbers = list(range(first, last + 1))
    local = [n - first + 1 for n in numbers] if numbering_from_1 else numbers
    _write(out / "Image.csv", [["ImageNumber", "Count_Nuclei", "Count_Cells", "Group_Index", "Group_Length"]]
           + [[n, float(c), float(c), n, 8] for n, c in zip(local, counts)])
    nuclei = [["ImageNumber", "ObjectNumber", "AreaShape_Area"]]
    for i, (n, c) in enumerate(zip(local, counts)):
        keep = c - (drop_rows if i == len(counts) - 1 else 0)
        nuclei += [[n, o, 100 + o] for o in range(1, keep + 1)]
    _write(out / "Nuclei.csv", nuclei)
    _write(out / "Cells.csv", [["ImageNumber", "ObjectNumber"]] + [[n, o] for n, c in zip(local, counts)
                                                                     for o in range(1, c + 1)])
    if relationships:
        _write(out / "Object relationships.csv",
               [["Module", "Module Number", "Relationship", "First Object Name", "First Image Number",
                 "First Object Number", "Second Object Name", "Second Image Number", "Second Object Number"]]
               + [["IdentifySecondaryObjects", 7, "Parent", "Nuclei", n, o, "Cells", n, o]
                  for n, c in zip(local, counts) for o in range(1, c + 1)])
    _write(out / "Experiment.csv", [["Key", "Value"], ["CellProfiler_Version", "4.2.8.1"],
                                    ["Run_Timestamp", f"2026-11-30T0{first}:00"]])
    return RangeResult(first=first, last=last, out_dir=out, log=root / f"log-{first}", exit_code=exit_code,
                       seconds=1.0)


def _merge_and_verify(ranges, out: Path, first=1, last=8):
    merged = merge(ranges, out, total=last)
    return verify_tables(out, merged, (first, last), ranges, {})


@pytest.mark.parametrize("numbering_from_1", [False, True], ids=["global-numbers", "numbered-from-1"])
def test_relationship_tables_are_renumbered_and_concatenated(tmp_path, numbering_from_1):
    """Issue 11.4: the worker failed a 2-process job on 'Object relationships.csv differs between ranges'."""
    a = _range(tmp_path, 1, 4, [2, 1, 3, 2])
    b = _range(tmp_path, 5, 8, [1, 2, 2, 1], numbering_from_1=numbering_from_1)
    first, last, count, rows = _merge_and_verify([a, b], tmp_path / "out")
    relations = read_rows(tmp_path / "out" / "Object relationships.csv")
    assert len(relations) == 14 == rows["Object relationships.csv"]
    assert [r["First Image Number"] for r in relations][-6:] == ["5", "6", "6", "7", "7", "8"]
    assert all(r["First Image Number"] == r["Second Image Number"] for r in relations)
    assert rows == {"Image.csv": 8, "Nuclei.csv": 14, "Cells.csv": 14, "Object relationships.csv": 14}


def test_an_object_table_missing_rows_of_one_image_set_fails_naming_it(tmp_path):
    a = _range(tmp_path, 1, 4, [2, 1, 3, 2])
    b = _range(tmp_path, 5, 8, [1, 2, 2, 3], drop_rows=2)
    with pytest.raises(PipelineFailed, match=r"Nuclei.csv is incomplete: image set 8 has 1 rows but Image.csv "
                                             r"counts 3 Nuclei"):
        _merge_and_verify([a, b], tmp_path / "out")


def test_an_object_table_absent_from_one_range_fails(tmp_path):
    """Only Image.csv used to be checked: a range without Nuclei.csv passed."""
    a = _range(tmp_path, 1, 4, [2, 1, 3, 2])
    b = _range(tmp_path, 5, 8, [1, 2, 2, 1])
    (b.out_dir / "Nuclei.csv").unlink()
    with pytest.raises(PipelineFailed, match=r"Nuclei.csv is incomplete: image set 5 has 0 rows but Image.csv "
                                             r"counts 1 Nuclei \(and 3 more image sets differ\)"):
        _merge_and_verify([a, b], tmp_path / "out")


def test_a_per_image_table_must_hold_every_image_set_once(tmp_path):
    a = _range(tmp_path, 1, 4, [1, 1, 1, 1])
    b = _range(tmp_path, 5, 8, [1, 1, 1, 1])
    for r in (a, b):
        _write(r.out_dir / "PerWell.csv", [["ImageNumber", "Mean"]] + [[n, 1.0] for n in range(r.first, r.last + 1)])
    lines = (b.out_dir / "PerWell.csv").read_text().splitlines()
    (b.out_dir / "PerWell.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(PipelineFailed, match=r"PerWell.csv lacks image sets 8"):
        _merge_and_verify([a, b], tmp_path / "out")


def test_object_tables_named_by_the_pipeline_are_checked_against_their_object(tmp_path):
    a = _range(tmp_path, 1, 2, [2, 1], relationships=False)
    (a.out_dir / "Nuclei.csv").rename(a.out_dir / "MyNuclei.csv")
    merged = merge([a], tmp_path / "out", total=2)
    with pytest.raises(PipelineFailed, match=r"cannot check MyNuclei.csv: Image.csv has no Count_MyNuclei column"):
        verify_tables(tmp_path / "out", merged, (1, 2), [a], {})
    assert verify_tables(tmp_path / "out", merged, (1, 2), [a], {"MyNuclei.csv": ["Nuclei"]})[3]["MyNuclei.csv"] == 3


def test_combined_object_files_with_two_header_rows_are_merged_and_checked(tmp_path):
    """ExportToSpreadsheet combining Nuclei and Cells in one file writes object names, then features."""
    ranges = []
    for first, counts in ((1, [2, 1]), (3, [3, 0])):
        r = _range(tmp_path, first, first + 1, counts, relationships=False)
        rows = [["Image", "Nuclei", "Nuclei", "Cells"], ["ImageNumber", "ObjectNumber", "AreaShape_Area", "Area"]]
        rows += [[n, o, 1, 2] for n, c in zip(range(first, first + 2), counts) for o in range(1, c + 1)]
        _write(r.out_dir / "Both.csv", rows)
        ranges.append(r)
    merged = merge(ranges, tmp_path / "out", total=4)
    assert verify_tables(tmp_path / "out", merged, (1, 4), ranges, {})[3]["Both.csv"] == 6
    lines = (tmp_path / "out" / "Both.csv").read_text().splitlines()
    assert lines[:2] == ["Image,Nuclei,Nuclei,Cells", "ImageNumber,ObjectNumber,AreaShape_Area,Area"]
    assert len(lines) == 8


def test_gct_files_are_merged_not_taken_from_one_range(tmp_path):
    """Issue 11.4: a .gct kept only the last range's rows."""
    ranges = []
    for first in (1, 3):
        r = _range(tmp_path, first, first + 1, [1, 1], relationships=False)
        _write(r.out_dir / "Image.gct", [["#1.2"], [2, 2], ["NAME", "Description", "Count_Nuclei", "Mean"],
                                         [f"site{first}", "/in", 1, 0.5], [f"site{first + 1}", "/in", 1, 0.6]],
               delimiter="\t")
        ranges.append(r)
    merged = merge(ranges, tmp_path / "out", total=4)
    assert verify_tables(tmp_path / "out", merged, (1, 4), ranges, {})[3]["Image.gct"] == 4
    lines = (tmp_path / "out" / "Image.gct").read_text().splitlines()
    assert lines[:3] == ["#1.2", "4\t2", "NAME\tDescription\tCount_Nuclei\tMean"]
    assert [line.split("\t")[0] for line in lines[3:]] == ["site1", "site2", "site3", "site4"]


def test_a_file_whose_copies_differ_between_ranges_is_refused_by_name(tmp_path):
    """A SaveImages with one fixed name: each range wrote its own; none may silently stand for all."""
    a = _range(tmp_path, 1, 4, [1, 1, 1, 1])
    b = _range(tmp_path, 5, 8, [1, 1, 1, 1])
    (a.out_dir / "overlay.png").write_bytes(b"first range")
    (b.out_dir / "overlay.png").write_bytes(b"second range")
    with pytest.raises(PipelineFailed, match=r"overlay.png is written by several image-set ranges and differs "
                                             r"between image sets 1-4 and image sets 5-8"):
        _merge_and_verify([a, b], tmp_path / "out")
    (b.out_dir / "overlay.png").write_bytes(b"first range")  # identical copies are one file
    _merge_and_verify([a, b], tmp_path / "out2")
    assert (tmp_path / "out2" / "overlay.png").read_bytes() == b"first range"


def test_experiment_tables_may_differ_only_in_their_timestamps(tmp_path):
    a = _range(tmp_path, 1, 4, [1, 1, 1, 1])
    b = _range(tmp_path, 5, 8, [1, 1, 1, 1])
    _merge_and_verify([a, b], tmp_path / "ok")
    with open(b.out_dir / "Experiment.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["Metadata_Tags", '["Metadata_Well"]'])
    with pytest.raises(PipelineFailed, match=r"Experiment.csv differs between image sets 1-4 and image sets 5-8 "
                                             r"\(key Metadata_Tags\)"):
        _merge_and_verify([a, b], tmp_path / "out")


def test_a_nonzero_exit_is_forgiven_only_when_every_range_wrote_the_same_complete_tables(tmp_path):
    a = _range(tmp_path, 1, 4, [1, 1, 1, 1])
    b = _range(tmp_path, 5, 8, [0, 0, 0, 0], exit_code=1)
    (b.out_dir / "Nuclei.csv").unlink()  # no nucleus anywhere in 5-8: complete, but not the same tables
    tables = {id(r): range_tables(r) for r in (a, b)}
    _merge_and_verify([a, b], tmp_path / "out")  # every table is complete...
    with pytest.raises(PipelineFailed, match=r"CellProfiler for image sets 5-8 exited 1 and its tables differ from "
                                             r"image sets 1-4's \(Nuclei.csv\)"):
        check_exit_codes([a, b], tables)  # ...but range 5-8 stopped before writing Nuclei.csv
    c = _range(tmp_path / "c", 5, 8, [1, 1, 1, 1], exit_code=1)
    warning = check_exit_codes([a, c], {id(r): range_tables(r) for r in (a, c)})
    assert "exit codes [0, 1] but every range wrote the same tables and every table is complete" in warning


# --- real CellProfiler, AWS mode on moto -------------------------------------------------------

BUCKET = "cpb-verify-test"


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    from cpb.demo.synthetic import make_plate
    return make_plate(tmp_path_factory.mktemp("plate"), wells=("E05",), sites=4, seed=4, size=128, nuclei=(3, 6))


def _disk_full_wrapper(tmp_path: Path, real: str) -> str:
    """A `cellprofiler` that runs the real one; the range starting at image set 3 then loses its
    Nuclei.csv and exits 1, as 'No space left on device' while ExportToSpreadsheet writes."""
    path = tmp_path / "cellprofiler-disk-full"
    path.write_text(f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
code = subprocess.call([{real!r}] + args)
if "-f" in args and args[args.index("-f") + 1] == "3":
    out = args[args.index("-o") + 1]
    os.remove(os.path.join(out, "Nuclei.csv"))
    print("OSError: [Errno 28] No space left on device: 'Nuclei.csv'", file=sys.stderr)
    sys.exit(1)
sys.exit(code)
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_second_process_exits_1_before_writing_nuclei_csv_is_a_failure(plate, cellprofiler_env, tmp_path,
                                                                       monkeypatch, capsys):
    """Issue 11.3: recorded as succeeded before, with Nuclei.csv lacking image sets 3-4."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    env = dict(cellprofiler_env, CPB_BUCKET=BUCKET, CPB_PIPELINE="p/nuclei.cppipe", CPB_INPUT="in",
               CPB_OUTPUT="out", CPB_DATA_FILE="in/load_data.csv", CPB_VCPUS="2", CPB_WORK_DIR=str(tmp_path),
               CPB_CELLPROFILER=_disk_full_wrapper(tmp_path, cellprofiler_env["CPB_CELLPROFILER"]))
    env.pop("AWS_ENDPOINT_URL", None)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        for image in plate.images:
            s3.upload_file(str(image), BUCKET, f"in/{image.name}")
        s3.upload_file(str(plate.data_file), BUCKET, "in/load_data.csv")
        s3.upload_file(str(NUCLEI), BUCKET, "p/nuclei.cppipe")
        assert worker_aws.main_aws(env) == 3
        record = json.loads(s3.get_object(Bucket=BUCKET, Key="out/_cpb/run.json")["Body"].read())
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="out/").get("Contents", [])]
    assert record["status"] == "failed" and record["exit_codes"] == [0, 1]
    assert record["reason"].startswith("Nuclei.csv is incomplete: image set 3 has 0 rows but Image.csv counts ")
    assert "No space left on device" in record["reason"]
    assert keys == ["out/_cpb/run.json"]  # nothing of the incomplete run uploaded
    assert "cpb_worker: failed: Nuclei.csv is incomplete" in capsys.readouterr().err


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_same_partial_failure_in_a_local_run(plate, cellprofiler_env, tmp_path):
    env = dict(cellprofiler_env, CPB_CELLPROFILER=_disk_full_wrapper(tmp_path, cellprofiler_env["CPB_CELLPROFILER"]))
    with pytest.raises(PipelineFailed, match="Nuclei.csv is incomplete: image set 3"):
        run_local(NUCLEI, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=2, env=env)
    assert read_local(tmp_path / "out")["status"] == "failed"


# --- one process, or every process, stopped before an object table ------------------------------

def test_the_only_range_exiting_1_without_an_object_table_is_a_failure(tmp_path):
    """Adversary: the 'every range wrote the same tables' rule proves nothing with ONE range (an
    array child of image_sets_per_job 1 always runs one process): its Image.csv counts Nuclei,
    no Nuclei.csv was written, it exited 1, and the job was recorded as succeeded with a warning."""
    only = _range(tmp_path, 1, 4, [2, 1, 3, 2], exit_code=1, relationships=False)
    (only.out_dir / "Nuclei.csv").unlink()
    tables = {id(only): range_tables(only)}
    merged = merge([only], tmp_path / "out", total=4)
    verify_tables(tmp_path / "out", merged, (1, 4), [only], {})  # what is there is complete...
    with pytest.raises(PipelineFailed, match=r"CellProfiler for image sets 1-4 exited 1 and wrote no Nuclei.csv, "
                                             r"which the pipeline's ExportToSpreadsheet writes"):
        check_exit_codes([only], tables, tables_lacking(tmp_path / "out", merged, True, {}))
    # both ranges stopped the same way: 'the same tables' everywhere, still not complete
    a = _range(tmp_path / "a", 1, 4, [2, 1, 3, 2], exit_code=1, relationships=False)
    b = _range(tmp_path / "b", 5, 8, [1, 2, 2, 1], exit_code=1, relationships=False)
    for r in (a, b):
        (r.out_dir / "Nuclei.csv").unlink()
    merged = merge([a, b], tmp_path / "out2", total=8)
    with pytest.raises(PipelineFailed, match=r"wrote no Nuclei.csv"):
        check_exit_codes([a, b], {id(r): range_tables(r) for r in (a, b)},
                         tables_lacking(tmp_path / "out2", merged, True, {}))
    # a pipeline exporting only the tables it names needs only those
    assert tables_lacking(tmp_path / "out2", merged, False, {"Cells.csv": ["Cells"]}) == []
    assert tables_lacking(tmp_path / "out2", merged, False, {"Nuclei.csv": ["Nuclei"]}) == ["Nuclei.csv"]
    # a full disk more often leaves the file empty than absent: 0 bytes is no table either
    empty = _range(tmp_path / "e", 1, 4, [2, 1, 3, 2], exit_code=1, relationships=False)
    (empty.out_dir / "Nuclei.csv").write_bytes(b"")
    merged = merge([empty], tmp_path / "out3", total=4)
    verify_tables(tmp_path / "out3", merged, (1, 4), [empty], {})
    with pytest.raises(PipelineFailed, match=r"exited 1 and wrote no Nuclei.csv"):
        check_exit_codes([empty], {id(empty): range_tables(empty)}, tables_lacking(tmp_path / "out3", merged, True, {}))
    # exit 0: CellProfiler finished, no table is demanded beyond what verify_tables checks
    assert check_exit_codes([_range(tmp_path / "c", 1, 4, [1, 1, 1, 1])], {}, ["Nuclei.csv"]) is None


def _disk_full_everywhere(tmp_path: Path, real: str) -> str:
    """A `cellprofiler` that runs the real one, then loses Nuclei.csv and exits 1 (a full disk)."""
    path = tmp_path / "cellprofiler-disk-full-everywhere"
    path.write_text(f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
subprocess.call([{real!r}] + args)
os.remove(os.path.join(args[args.index("-o") + 1], "Nuclei.csv"))
print("OSError: [Errno 28] No space left on device: 'Nuclei.csv'", file=sys.stderr)
sys.exit(1)
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.cellprofiler
@pytest.mark.fault
def test_one_process_exiting_1_before_writing_nuclei_csv_is_a_failure(plate, cellprofiler_env, tmp_path):
    """Issue 11.3 one level down: with one CellProfiler process (CPB_VCPUS=1, or any array child of
    image_sets_per_job 1) the lost Nuclei.csv was recorded as `succeeded` with a warning."""
    env = dict(cellprofiler_env, CPB_CELLPROFILER=_disk_full_everywhere(tmp_path, cellprofiler_env["CPB_CELLPROFILER"]))
    with pytest.raises(PipelineFailed, match=r"exited 1 and wrote no Nuclei.csv, which the pipeline's ExportToSpreadsheet writes; "
                                                   r"CellProfiler exited 1: OSError: \[Errno 28\] No space left"):
        run_local(NUCLEI, plate.images_dir, tmp_path / "out", data_file=plate.data_file, workers=1, env=env)
    assert read_local(tmp_path / "out")["status"] == "failed"
