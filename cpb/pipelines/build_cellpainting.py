"""Write illum.cppipe and cellpainting.cppipe with CellProfiler's own code (4.2.8.1).

The two pipelines are committed as text; this script is how they were made, so every
setting line is exactly what CellProfiler 4.2.8 writes (no hand-typed setting names).
Run it with the project's CellProfiler environment, then review the diff:

    .venv-cp/bin/python cpb/pipelines/build_cellpainting.py

Channels (CellProfiler image names) and file names are those of cpb/demo/cellpainting.py:
DNA, AGP, Mito; the illumination functions are Illum<Ch>.npy.
"""
import io
import sys
from pathlib import Path

from cellprofiler_core.preferences import set_headless

set_headless()

from cellprofiler_core.modules.loaddata import LoadData  # noqa: E402
from cellprofiler_core.pipeline import Pipeline  # noqa: E402
from cellprofiler_core.setting.subscriber import ListSubscriber  # noqa: E402
from cellprofiler.modules.correctilluminationapply import CorrectIlluminationApply  # noqa: E402
from cellprofiler.modules.correctilluminationcalculate import CorrectIlluminationCalculate  # noqa: E402
from cellprofiler.modules.exporttospreadsheet import ExportToSpreadsheet  # noqa: E402
from cellprofiler.modules.graytocolor import GrayToColor  # noqa: E402
from cellprofiler.modules.identifyprimaryobjects import IdentifyPrimaryObjects  # noqa: E402
from cellprofiler.modules.identifysecondaryobjects import IdentifySecondaryObjects  # noqa: E402
from cellprofiler.modules.identifytertiaryobjects import IdentifyTertiaryObjects  # noqa: E402
from cellprofiler.modules.measureobjectintensity import MeasureObjectIntensity  # noqa: E402
from cellprofiler.modules.measureobjectsizeshape import MeasureObjectSizeShape  # noqa: E402
from cellprofiler.modules.measuretexture import MeasureTexture  # noqa: E402
from cellprofiler.modules.overlayoutlines import OverlayOutlines  # noqa: E402
from cellprofiler.modules.saveimages import SaveImages  # noqa: E402

CHANNELS = ("DNA", "AGP", "Mito")
HERE = Path(__file__).resolve().parent


def put(module, label, value, occurrence=0):
    """Set the `occurrence`-th setting whose label is `label` (as the .cppipe shows it)."""
    found = [s for s in module.settings() if s.text == label]
    if len(found) <= occurrence:
        raise KeyError(f"{module.module_name} has no setting {label!r} #{occurrence}")
    setting = found[occurrence]
    if isinstance(setting, ListSubscriber):
        setting.value = str(value)  # list settings parse "A, B" from their value, not their text
    else:
        setting.set_value_text(str(value))


def notes(module, *lines):
    module.notes = list(lines)
    return module


def loaddata(what):
    module = LoadData()
    put(module, "Input data file location", "Default Input Folder|")
    put(module, "Name of the file", "load_data.csv")
    put(module, "Load images based on this data?", "Yes")
    put(module, "Base image location", "Default Input Folder|")
    put(module, "Rescale intensities?", "Yes")
    return notes(module, what)


def export(what):
    module = ExportToSpreadsheet()
    put(module, "Add image metadata columns to your object data file?", "No")
    put(module, "Export all measurement types?", "Yes")
    put(module, "Add a prefix to file names?", "No")
    put(module, "Overwrite existing files without warning?", "Yes")
    put(module, "Use the object name for the file name?", "Yes")
    return notes(module, what)


def illumination_pipeline():
    modules = [loaddata("Reads load_data.csv (Image_FileName_DNA/AGP/Mito, Metadata_Plate/Well/Site): every "
                        "image of the plate; the worker passes the job's data file instead.")]
    for channel in CHANNELS:
        calc = CorrectIlluminationCalculate()
        put(calc, "Select the input image", channel)
        put(calc, "Name the output image", f"Illum{channel}")
        put(calc, "Select how the illumination function is calculated", "Regular")
        put(calc, "Rescale the illumination function?", "Yes")
        put(calc, "Calculate function for each image individually, or based on all images?", "All: Across cycles")
        put(calc, "Smoothing method", "Fit Polynomial")
        modules.append(notes(calc, f"The {channel} channel's illumination function: the mean of every {channel} "
                                   "image of the plate, fitted with a smooth polynomial surface (robust with the few "
                                   "images of a small plate; over a full plate a median filter about half the image "
                                   "wide is the common choice), rescaled so its robust minimum is 1."))
    for channel in CHANNELS:
        save = SaveImages()
        put(save, "Select the type of image to save", "Image")
        put(save, "Select the image to save", f"Illum{channel}")
        put(save, "Select method for constructing file names", "Single name")
        put(save, "Enter single file name", f"Illum{channel}")
        put(save, "Saved file format", "npy")
        put(save, "Output file location", "Default Output Folder|")
        put(save, "Overwrite existing files without warning?", "Yes")
        put(save, "When to save", "Last cycle")
        put(save, "Record the file and path information to the saved image?", "No")
        modules.append(notes(save, f"Illum{channel}.npy in the output: the analysis LoadData names it in "
                                   f"Image_FileName_Illum{channel} / Image_PathName_Illum{channel}."))
    modules.append(export("Image.csv: one row per image set (the worker checks every set ran)."))
    return modules


def analysis_pipeline():
    modules = [loaddata("Reads load_data.csv: Image_FileName_DNA/AGP/Mito, Metadata_Plate/Well/Site and "
                        "Image_FileName_IllumDNA/AGP/Mito + Image_PathName_Illum* naming the illumination "
                        "run's Illum<Ch>.npy (cpb loaddata --illum writes them).")]
    apply = CorrectIlluminationApply()
    for index, channel in enumerate(CHANNELS):
        if index:
            apply.add_image()
        put(apply, "Select the input image", channel, index)
        put(apply, "Name the output image", f"Corr{channel}", index)
        put(apply, "Select the illumination function", f"Illum{channel}", index)
        put(apply, "Select how the illumination function is applied", "Divide", index)
    modules.append(notes(apply, "Divides each channel by its plate's illumination function."))

    nuclei = IdentifyPrimaryObjects()
    put(nuclei, "Select the input image", "CorrDNA")
    put(nuclei, "Name the primary objects to be identified", "Nuclei")
    put(nuclei, "Typical diameter of objects, in pixel units (Min,Max)", "6,40")
    put(nuclei, "Discard objects outside the diameter range?", "Yes")
    put(nuclei, "Discard objects touching the border of the image?", "Yes")
    put(nuclei, "Threshold strategy", "Global")
    put(nuclei, "Thresholding method", "Otsu")
    modules.append(notes(nuclei, "Nuclei from the corrected DNA channel (one global Otsu threshold: it works only "
                                 "when the illumination is even)."))

    cells = IdentifySecondaryObjects()
    put(cells, "Select the input objects", "Nuclei")
    put(cells, "Name the objects to be identified", "Cells")
    put(cells, "Select the method to identify the secondary objects", "Propagation")
    put(cells, "Select the input image", "CorrAGP")
    put(cells, "Threshold strategy", "Global")
    put(cells, "Thresholding method", "Otsu")
    put(cells, "Fill holes in identified objects?", "Yes")
    modules.append(notes(cells, "Cells grown from each nucleus over the corrected AGP (cell body) channel."))

    cytoplasm = IdentifyTertiaryObjects()
    put(cytoplasm, "Select the larger identified objects", "Cells")
    put(cytoplasm, "Select the smaller identified objects", "Nuclei")
    put(cytoplasm, "Name the tertiary objects to be identified", "Cytoplasm")
    put(cytoplasm, "Shrink smaller object prior to subtraction?", "Yes")
    modules.append(notes(cytoplasm, "Cytoplasm = cell minus nucleus (Parent_Cells, Parent_Nuclei link them)."))

    corrected = ", ".join(f"Corr{c}" for c in CHANNELS)
    objects = "Nuclei, Cells, Cytoplasm"
    intensity = MeasureObjectIntensity()
    put(intensity, "Select images to measure", corrected)
    put(intensity, "Select objects to measure", objects)
    modules.append(notes(intensity, "Intensity of every corrected channel in every compartment."))

    shape = MeasureObjectSizeShape()
    put(shape, "Select object sets to measure", objects)
    put(shape, "Calculate the Zernike features?", "No")
    put(shape, "Calculate the advanced features?", "No")
    modules.append(notes(shape, "Area and shape per compartment (Zernike off: they cost more than the rest)."))

    texture = MeasureTexture()
    put(texture, "Select images to measure", "CorrDNA, CorrMito")
    put(texture, "Select objects to measure", "Nuclei, Cytoplasm")
    put(texture, "Enter how many gray levels to measure the texture at", 64)
    put(texture, "Measure whole images or objects?", "Objects")
    put(texture, "Texture scale to measure", 3)
    modules.append(notes(texture, "Haralick texture at scale 3: DNA in nuclei, mitochondria in the cytoplasm."))

    color = GrayToColor()
    put(color, "Select a color scheme", "RGB")
    put(color, "Select the image to be colored red", "CorrMito")
    put(color, "Select the image to be colored green", "CorrAGP")
    put(color, "Select the image to be colored blue", "CorrDNA")
    put(color, "Name the output image", "CellsColor")
    modules.append(notes(color, "Mito red, AGP green, DNA blue: the picture the outlines are drawn on."))

    overlay = OverlayOutlines()
    put(overlay, "Select image on which to display outlines", "CellsColor")
    put(overlay, "Name the output image", "CellOutlines")
    put(overlay, "Outline display mode", "Color")
    put(overlay, "How to outline", "Inner")
    put(overlay, "Select objects to display", "Nuclei")
    put(overlay, "Select outline color", "yellow")
    overlay.add_outline()
    put(overlay, "Select objects to display", "Cells", 1)
    put(overlay, "Select outline color", "white", 1)
    modules.append(notes(overlay, "Nuclei in yellow, cells in white."))

    save = SaveImages()
    put(save, "Select the type of image to save", "Image")
    put(save, "Select the image to save", "CellOutlines")
    put(save, "Select method for constructing file names", "From image filename")
    put(save, "Select image name for file prefix", "DNA")
    put(save, "Append a suffix to the image file name?", "Yes")
    put(save, "Text to append to the image name", "_outlines")
    put(save, "Saved file format", "png")
    put(save, "Output file location", "Default Output Folder|")
    put(save, "Image bit depth", "8-bit integer")
    put(save, "Overwrite existing files without warning?", "Yes")
    put(save, "When to save", "Every cycle")
    put(save, "Record the file and path information to the saved image?", "Yes")
    modules.append(notes(save, "One PNG per image set, <DNA file name>_outlines.png (the demo's montage)."))

    modules.append(export("Image.csv (Metadata_Plate/Well/Site, Count_*, ExecutionTime_*), Nuclei.csv, "
                          "Cells.csv, Cytoplasm.csv, Experiment.csv."))
    return modules


def write(modules, path):
    pipeline = Pipeline()
    for number, module in enumerate(modules, start=1):
        module.set_module_num(number)
        pipeline.add_module(module)
    text = io.StringIO()
    pipeline.dump(text)
    path.write_text(text.getvalue())
    print(f"wrote {path} ({len(modules)} modules)")


if __name__ == "__main__":
    write(illumination_pipeline(), HERE / "illum.cppipe")
    write(analysis_pipeline(), HERE / "cellpainting.cppipe")
    sys.exit(0)
