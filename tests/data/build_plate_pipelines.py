"""Write tests/data/plate_illum.cppipe and plate_analysis.cppipe with CellProfiler 4.2.8.1's own code.

The plate tests (cpb loaddata, cpb plate, cpb run --local over an illumination-corrected plate)
need an illumination pipeline and an analysis pipeline whose every setting line is what
CellProfiler writes. They are committed as text; this is how they were made:

    .venv-cp/bin/python tests/data/build_plate_pipelines.py

Channels (CellProfiler image names): DNA and ER. The illumination pipeline computes one function
per channel over all image sets and saves `Illum<Name>.npy` into the Default Output Folder (the
layout `cpb loaddata --illum` and `cpb plate` expect); the analysis pipeline loads them through
LoadData (`Image_FileName_Illum<Name>`), divides each channel by its function and counts nuclei.
"""
import io
from pathlib import Path

from cellprofiler_core.preferences import set_headless

set_headless()

from cellprofiler_core.modules.loaddata import LoadData  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402
from cellprofiler_core.setting.subscriber import ListSubscriber  # noqa: E402
from cellprofiler.modules.correctilluminationapply import CorrectIlluminationApply  # noqa: E402
from cellprofiler.modules.correctilluminationcalculate import CorrectIlluminationCalculate  # noqa: E402
from cellprofiler.modules.exporttospreadsheet import ExportToSpreadsheet  # noqa: E402
from cellprofiler.modules.identifyprimaryobjects import IdentifyPrimaryObjects  # noqa: E402
from cellprofiler.modules.measureobjectintensity import MeasureObjectIntensity  # noqa: E402
from cellprofiler.modules.saveimages import SaveImages  # noqa: E402

CHANNELS = ("DNA", "ER")
HERE = Path(__file__).resolve().parent


def setting(module, label, value):
    matches = [s for s in module.settings() if s.text == label]
    if not matches:
        raise KeyError(f"{module.module_name}: no setting {label!r}")
    if isinstance(matches[0], ListSubscriber):
        matches[0].value = str(value)
    else:
        matches[0].set_value_text(str(value))


def loaddata():
    module = LoadData()
    setting(module, "Input data file location", "Default Input Folder|")
    setting(module, "Name of the file", "load_data.csv")
    return module


def export():
    module = ExportToSpreadsheet()
    setting(module, "Output file location", "Default Output Folder|")
    setting(module, "Add a prefix to file names?", "No")  # the worker checks Image.csv
    return module


def illum_pipeline() -> Pipeline:
    pipeline = Pipeline()
    modules = [loaddata()]
    for name in CHANNELS:
        calc = CorrectIlluminationCalculate()
        setting(calc, "Select the input image", name)
        setting(calc, "Name the output image", f"Illum{name}")
        setting(calc, "Calculate function for each image individually, or based on all images?", "All: Across cycles")
        setting(calc, "Smoothing method", "Fit Polynomial")
        setting(calc, "Rescale the illumination function?", "Yes")
        modules.append(calc)
    for name in CHANNELS:
        save = SaveImages()
        setting(save, "Select the image to save", f"Illum{name}")
        setting(save, "Select method for constructing file names", "Single name")
        setting(save, "Enter single file name", f"Illum{name}")
        setting(save, "Saved file format", "npy")
        setting(save, "Output file location", "Default Output Folder|")
        setting(save, "When to save", "Last cycle")
        setting(save, "Overwrite existing files without warning?", "Yes")
        modules.append(save)
    modules.append(export())
    for number, module in enumerate(modules, start=1):
        module.set_module_num(number)
        pipeline.add_module(module)
    return pipeline


def analysis_pipeline() -> Pipeline:
    pipeline = Pipeline()
    modules = [loaddata()]
    for name in CHANNELS:
        apply = CorrectIlluminationApply()
        setting(apply, "Select the input image", name)
        setting(apply, "Name the output image", f"Corr{name}")
        setting(apply, "Select the illumination function", f"Illum{name}")
        setting(apply, "Select how the illumination function is applied", "Divide")
        modules.append(apply)
    nuclei = IdentifyPrimaryObjects()
    setting(nuclei, "Select the input image", "CorrDNA")
    setting(nuclei, "Name the primary objects to be identified", "Nuclei")
    setting(nuclei, "Typical diameter of objects, in pixel units (Min,Max)", "6,40")
    modules.append(nuclei)
    measure = MeasureObjectIntensity()
    setting(measure, "Select images to measure", ", ".join(f"Corr{n}" for n in CHANNELS))
    setting(measure, "Select objects to measure", "Nuclei")
    modules.append(measure)
    modules.append(export())
    for number, module in enumerate(modules, start=1):
        module.set_module_num(number)
        pipeline.add_module(module)
    return pipeline


def write(pipeline: Pipeline, name: str) -> None:
    buffer = io.StringIO()
    pipeline.dump(buffer)
    (HERE / name).write_text(buffer.getvalue())
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
    write(illum_pipeline(), "plate_illum.cppipe")
    write(analysis_pipeline(), "plate_analysis.cppipe")
