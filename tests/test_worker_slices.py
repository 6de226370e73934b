"""Issue 15, the worker: an array child streams the data file, keeps only its rows and gives
CellProfiler a LoadData CSV of just those rows; image numbers (and Group_Index/Group_Length)
come back as one CellProfiler process over the whole data file writes them. Processes per job
are limited by memory (CPB_MEMORY_MIB / CPB_PROCESS_MEMORY_MIB), with a warning."""
from __future__ import annotations

import csv
import subprocess

import pytest

from cpb_worker import datafile as df
from cpb_worker.errors import BadInput
from cpb_worker.job import JobSpec, plan_job
from cpb_worker.ranges import DEFAULT_PROCESS_MEMORY_MIB, process_count
from cpb_worker.runner import cellprofiler_argv

from test_worker_support import NUCLEI, read_rows


def test_streamed_rows_match_the_csv_module_on_awkward_files(tmp_path):
    """Quoted commas and newlines, doubled quotes, blank and all-empty lines, a byte-order mark and
    CRLF: the byte-level reader keeps exactly the rows csv.reader finds (blank ones are not image sets)."""
    path = tmp_path / "ld.csv"
    path.write_bytes(b'\xef\xbb\xbfImage_FileName_DNA,Metadata_Note\r\n'
                     b'a.tif,"two\r\nlines, ""quoted"""\r\n\r\n,,\r\n"",""\r\nb.tif,plain\r\nc.tif,"q"')
    whole = df.read_rows(path)
    assert whole.header == ["Image_FileName_DNA", "Metadata_Note"] and whole.total == 3
    assert whole.rows == [["a.tif", 'two\r\nlines, "quoted"'], ["b.tif", "plain"], ["c.tif", "q"]]
    middle = df.read_rows(path, 2, 2, count_all=False)
    assert (middle.rows, middle.row_offset, middle.total) == ([["b.tif", "plain"]], 1, None)
    assert middle.row(2) == ["b.tif", "plain"]
    with pytest.raises(IndexError):
        middle.row(1)
    tail = df.read_rows(path, 3, 3, count_all=False)  # the file ends right after: the count is known
    assert (tail.rows, tail.total) == ([["c.tif", "q"]], 3)


def test_a_broken_row_outside_the_childs_range_is_not_its_concern(tmp_path):
    path = tmp_path / "ld.csv"
    path.write_text("Image_FileName_DNA,Metadata_Site\na.tif,1\nb.tif\nc.tif,3\n")
    assert df.read_rows(path, 3, 3).rows == [["c.tif", "3"]]
    with pytest.raises(BadInput, match="line 3 has 1 fields, the header has 2"):
        df.read_rows(path, 2, 2)


def test_an_array_child_plans_only_its_rows_and_checks_the_count(tmp_path):
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01", "A02"), sites=3, seed=1, size=64, nuclei=(1, 1))
    spec = dict(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, sets_per_job=4,
                expected_count=6, workers=2)
    plan = plan_job(JobSpec(array_index=1, **spec))
    assert (plan.first, plan.last, plan.sliced, plan.total) == (5, 6, True, 6)
    assert [row[-2:] for row in plan.data.rows] == [["A02", "2"], ["A02", "3"]]  # only its own rows held
    assert [(p.first, p.last, p.offset) for p in plan.procs] == [(1, 1, 4), (2, 2, 4)]  # of a 2-row CSV
    assert plan.ranges == [(5, 5), (6, 6)]
    first = plan_job(JobSpec(array_index=0, **spec))
    assert first.data.total is None  # child 0 stopped reading after its rows
    with pytest.raises(BadInput, match="CPB_IMAGE_SET_COUNT is 8 but the data file gives 6 image sets"):
        plan_job(JobSpec(array_index=1, **dict(spec, expected_count=8)))
    with pytest.raises(BadInput, match="CPB_IMAGE_SET_COUNT is 5 but the data file gives 6 image sets"):
        plan_job(JobSpec(array_index=1, **dict(spec, expected_count=5)))  # the last child reads to the end


def test_processes_are_limited_by_memory_with_a_warning():
    assert process_count({}, 8) == (8, None)  # a laptop run: CPUs only
    assert process_count({"CPB_MEMORY_MIB": str(8 * DEFAULT_PROCESS_MEMORY_MIB)}, 8) == (8, None)
    count, warning = process_count({"CPB_MEMORY_MIB": "8192", "CPB_PROCESS_MEMORY_MIB": "2500"}, 12)
    assert count == 3
    assert warning == ("memory limits the split: 3 CellProfiler process(es) for 12 vCPUs, because 8192 MiB holds "
                       "3 of 2500 MiB each (CPB_PROCESS_MEMORY_MIB); give the job 30000 MiB (job_memory) to use "
                       "every vCPU")
    count, warning = process_count({"CPB_MEMORY_MIB": "1000", "CPB_PROCESS_MEMORY_MIB": "2500"}, 4)
    assert count == 1 and "less than one CellProfiler process needs" in warning
    with pytest.raises(BadInput, match="CPB_PROCESS_MEMORY_MIB must be a whole number of MiB"):
        process_count({"CPB_MEMORY_MIB": "8192", "CPB_PROCESS_MEMORY_MIB": "lots"}, 4)


def test_the_memory_warning_reaches_the_plan(tmp_path):
    from cpb.demo.synthetic import make_plate
    plate = make_plate(tmp_path / "plate", wells=("A01",), sites=4, seed=1, size=64, nuclei=(1, 1))
    env = {"CPB_VCPUS": "4", "CPB_MEMORY_MIB": "4096", "CPB_PROCESS_MEMORY_MIB": "2048"}
    plan = plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, env=env))
    assert len(plan.procs) == 2 and plan.warnings[0].startswith("memory limits the split: 2 CellProfiler process(es)")


@pytest.mark.cellprofiler
def test_a_sliced_child_writes_what_one_process_over_the_whole_file_writes(tmp_path, cellprofiler_env):
    """Child 1 (image sets 4-6 of 6) with its 3-row CSV, in 2 processes, against one plain CellProfiler
    `-f 4 -l 6` over the whole CSV: same ImageNumbers, Group_Index, Group_Length and measurements."""
    from cpb.demo.synthetic import make_plate
    from cpb_worker.job import run_plan
    from cpb_worker.record import RunRecord
    plate = make_plate(tmp_path / "plate", wells=("A01", "A02"), sites=3, seed=9, size=96, nuclei=(2, 4))
    plan = plan_job(JobSpec(pipeline=NUCLEI, input_dir=plate.images_dir, data_file=plate.data_file, array_index=1,
                            sets_per_job=3, expected_count=6, workers=2, env=cellprofiler_env))
    record = run_plan(plan, plate.images_dir, tmp_path / "child", RunRecord(), cellprofiler_env)
    assert (record.first, record.last, record.processes) == (4, 6, 2)
    single = tmp_path / "single"
    argv = cellprofiler_argv(cellprofiler_env) + ["-c", "-r", "-p", str(NUCLEI), "-i", str(plate.images_dir), "-o",
                                                  str(single), "--data-file", str(plate.data_file), "-f", "4", "-l", "6"]
    assert subprocess.run(argv, env=cellprofiler_env, capture_output=True, timeout=600).returncode == 0
    for table in ("Image.csv", "Nuclei.csv"):
        ours, theirs = read_rows(tmp_path / "child" / table), read_rows(single / table)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            for column, value in b.items():
                if not column.startswith(("ExecutionTime_", "PathName_", "URL_", "ImageSet_")):
                    assert a[column] == value, (table, column, a[column], value)
    assert {r["Group_Length"] for r in read_rows(tmp_path / "child" / "Image.csv")} == {"6"}


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
def test_fast_skimming_agrees_with_the_csv_module_at_every_block_boundary(tmp_path, monkeypatch, block):
    """Random files mixing plain rows, quoted commas and newlines, blank and all-empty lines, CRLF:
    every slice the streaming reader keeps is exactly csv.reader's rows (blank ones dropped)."""
    import random
    monkeypatch.setattr(df, "_BLOCK", block)
    rng = random.Random(block)
    for trial in range(20):
        eol = rng.choice(["\n", "\r\n"])
        lines = ["Image_FileName_DNA,Metadata_Note,Metadata_Site"]
        for n in range(rng.randint(1, 60)):
            kind = rng.random()
            if kind < 0.08:
                lines.append(rng.choice(["", ",,", " , ,"]))
            elif kind < 0.2:
                lines.append(f'img{n}.tif,"note {n}{eol}second, line ""q""",{n}')
            else:
                lines.append(f"img{n}.tif,plain {n},{n}")
        path = tmp_path / f"t{trial}.csv"
        path.write_bytes((eol.join(lines) + rng.choice(["", eol])).encode())
        with open(path, newline="", encoding="utf-8") as handle:
            reference = [r for r in list(csv.reader(handle))[1:] if any(c.strip() for c in r)]
        total = len(reference)
        assert df.read_rows(path).rows == reference and df.read_rows(path).total == total
        for _ in range(5):
            a = rng.randint(1, total)
            b = rng.randint(a, total)
            sliced = df.read_rows(path, a, b, count_all=rng.random() < 0.5)
            assert sliced.rows == reference[a - 1:b], (trial, a, b)
            assert sliced.total in (None, total)


@pytest.mark.parametrize("block", [5, 64, 1 << 20])
def test_count_rows_from_a_stream_is_the_workers_count(tmp_path, monkeypatch, block):
    """What the ingress Lambda can count an S3 body with (constant memory): the same number the
    worker's reader finds, quoted newlines, blank lines and a byte-order mark included."""
    import io
    import random
    monkeypatch.setattr(df, "_BLOCK", block)
    rng = random.Random(7 + block)
    for trial in range(10):
        lines = ["Image_FileName_DNA,Metadata_Note"]
        for n in range(rng.randint(0, 80)):
            lines.append(rng.choice([f"a{n}.tif,x", f'b{n}.tif,"two\nlines"', "", ",", f"c{n}.tif," + "y" * 200]))
        raw = ("\ufeff" if trial % 2 else "") + "\n".join(lines) + "\n"
        path = tmp_path / f"c{trial}.csv"
        path.write_text(raw)
        expected = len([r for r in lines[1:] if r.strip(", ")])
        assert df.count_rows(io.BytesIO(raw.encode())) == expected
        if expected:
            assert df.read_rows(path).total == expected
    assert df.count_rows(io.BytesIO(b"")) == 0
