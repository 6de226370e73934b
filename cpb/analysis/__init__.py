"""Analysis-ready results: single-cell Parquet (CytoTable), a plate QC report, and
well-level profiles (pycytominer), all from a folder `cpb results` downloaded.

Layout under that folder (docs/CLI.md, "Analysis"):
  single_cell.parquet                 cpb results --parquet / cpb.analysis.parquet.to_parquet
  report/plate-qc.png, report/plate-qc.html     cpb report / cpb.analysis.report.write_report
  profiles/<plate>_<step>.parquet     cpb profile / cpb.analysis.profile.make_profiles
"""


class AnalysisError(ValueError):
    """Input the analysis cannot use; the message names what is wrong and how to fix it.
    (A ValueError, so `cpb` prints it as one line like its other expected errors.)"""
