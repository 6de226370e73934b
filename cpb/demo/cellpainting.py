"""A synthetic Cell Painting-like plate with a known answer, seen through an uneven illumination.

Each site has three 16-bit channels, named as in Cell Painting:
  DNA   nuclei (Hoechst-like): bright, slightly elliptical blobs
  AGP   the cell body (actin/Golgi/plasma membrane-like): a soft irregular disc around each
        nucleus with a brighter rim, so IdentifySecondaryObjects finds one cell per nucleus
  Mito  mitochondria-like puncta in the cytoplasm (textured: what MeasureTexture and
        MeasureGranularity see); wells treated with `PHENOTYPE` get more and brighter puncta

Every channel is multiplied by the SAME smooth illumination field on every site (as one
microscope's vignetting is): bright near an off-centre optical axis, falling to about a
quarter at the far corner. Nuclei in the dim corner are then darker than the background
of the bright centre, so one global threshold over an uncorrected image misses them:
the illumination pipeline (`cpb/pipelines/illum.cppipe`) estimates the field from all
the plate's images and the analysis pipeline (`cpb/pipelines/cellpainting.cppipe`)
divides it out. The truth is the number of nuclei (= cells) placed per site.

    plate = make_cellpainting_plate("demo/plate", wells=("A01", "A02"), sites=2, seed=7)
    plate.truth[("A01", 1)]   # -> nuclei (and cells) in well A01, site 1
    plate.data_file           # LoadData CSV: Image_FileName_{DNA,AGP,Mito}, Metadata_Plate/Well/Site
    plate.platemap_file       # platemap CSV: well_position, treatment, control
    plate.illumination        # the true field (float, 1.0 at the optical axis)

Deterministic from the seed (numpy's PCG64 seeded per (seed, well, site)). Uses numpy and
tifffile only; the worker never imports this.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tifffile

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
ILLUM_PIPELINE = PIPELINES / "illum.cppipe"
ANALYSIS_PIPELINE = PIPELINES / "cellpainting.cppipe"
CHANNELS = ("DNA", "AGP", "Mito")
#: the file name's channel number per CellProfiler image name (ImageXpress-like `_w<n>`)
CHANNEL_NUMBERS = {"DNA": 1, "AGP": 2, "Mito": 3}
#: the illumination function file the illumination pipeline writes per channel
ILLUM_FILES = {name: f"Illum{name}.npy" for name in CHANNELS}
NEGATIVE_CONTROL = "DMSO"
PHENOTYPE = "compound-M"  # more and brighter mitochondria-like puncta
SCALE = 40000  # float 1.0 -> this many counts in the 16-bit TIFFs
#: diffuse background per channel (out-of-focus light, autofluorescence): lit by the field
AUTOFLUORESCENCE = {"DNA": 0.12, "AGP": 0.08, "Mito": 0.05}
CAMERA_OFFSET = 0.004  # not lit by the field
READ_NOISE = 0.006


@dataclass(frozen=True)
class CellPaintingPlate:
    """Where a generated plate lives and what it holds."""

    root: Path
    plate: str
    images_dir: Path
    data_file: Path
    truth_file: Path
    platemap_file: Path
    truth: Dict[Tuple[str, int], int]
    treatments: Dict[str, str]
    illumination: np.ndarray
    images: List[Path] = field(default_factory=list)

    @property
    def image_sets(self) -> int:
        return len(self.truth)

    @property
    def wells(self) -> List[str]:
        return sorted({well for well, _ in self.truth})

    def well_truth(self) -> Dict[str, int]:
        """Cells per well (all its sites)."""
        out: Dict[str, int] = {}
        for (well, _site), count in self.truth.items():
            out[well] = out.get(well, 0) + count
        return out


def illumination_field(size: int, strength: float = 0.75, centre: Tuple[float, float] = (0.3, 0.35)) -> np.ndarray:
    """A smooth vignetting field: 1.0 at the optical axis (`centre`, as fractions of the
    image), falling quadratically to 1 - strength at the farthest corner."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    cy, cx = centre
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    far = max((cy - a) ** 2 + (cx - b) ** 2 for a in (0, 1) for b in (0, 1))
    return 1.0 - strength * r2 / far


def _place(rng: np.random.Generator, size: int, count: int, gap: float, margin: float) -> List[Tuple[float, float]]:
    """Cell centres at least `gap` apart and `margin` from every edge (rejection sampling)."""
    centres: List[Tuple[float, float]] = []
    for _ in range(20000):
        if len(centres) == count:
            break
        y, x = rng.uniform(margin, size - margin, size=2)
        if all((y - cy) ** 2 + (x - cx) ** 2 >= gap ** 2 for cy, cx in centres):
            centres.append((float(y), float(x)))
    return centres


def render_site(rng: np.random.Generator, size: int, count: int, treated: bool,
                illumination: np.ndarray) -> Tuple[Dict[str, np.ndarray], int]:
    """({channel: uint16 image}, cells placed) for one site, seen through `illumination`."""
    cell_radius = (13.0, 17.0)
    centres = _place(rng, size, count, gap=2.0 * cell_radius[1] + 2, margin=cell_radius[1] + 6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dna, agp, mito = (np.zeros((size, size)) for _ in range(3))
    for cy, cx in centres:
        # nucleus: an elliptical Gaussian, never reaching the cell edge
        sigma = rng.uniform(2.6, 3.4)
        stretch = rng.uniform(0.8, 1.25)
        d2 = ((yy - cy) / stretch) ** 2 + ((xx - cx) * stretch) ** 2
        dna += rng.uniform(0.6, 0.95) * np.exp(-d2 / (2 * sigma ** 2))
        # cell body: an irregular soft disc (radius wobbles with the angle) with a brighter rim
        radius = rng.uniform(*cell_radius)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
        dist = np.hypot(yy - cy, xx - cx) / (radius * wobble)
        body = 1.0 / (1.0 + np.exp((dist - 1.0) / 0.06))
        rim = np.exp(-((dist - 0.93) / 0.07) ** 2)
        agp += rng.uniform(0.3, 0.45) * body + 0.12 * rim
        # mitochondria: puncta in the cytoplasm (between the nucleus and the cell edge)
        puncta = int(rng.integers(18, 26) * (1.8 if treated else 1.0))
        brightness = 0.3 if treated else 0.18
        for _ in range(puncta):
            r = radius * rng.uniform(0.45, 0.85)
            a = rng.uniform(0, 2 * np.pi)
            py, px = cy + r * np.sin(a), cx + r * np.cos(a)
            lo_y, hi_y, lo_x, hi_x = int(py) - 4, int(py) + 5, int(px) - 4, int(px) + 5
            patch = (yy[lo_y:hi_y, lo_x:hi_x] - py) ** 2 + (xx[lo_y:hi_y, lo_x:hi_x] - px) ** 2
            mito[lo_y:hi_y, lo_x:hi_x] += brightness * rng.uniform(0.6, 1.2) * np.exp(-patch / (2 * 1.3 ** 2))
        mito += 0.06 * body  # diffuse cytoplasmic signal
    images = {}
    for name, signal in (("DNA", dna), ("AGP", agp), ("Mito", mito)):
        # the light reaching the sample (and its autofluorescence) follows the field;
        # camera offset and read noise do not
        seen = (illumination * (signal + AUTOFLUORESCENCE[name]) + CAMERA_OFFSET
                + rng.normal(0.0, READ_NOISE, signal.shape))
        images[name] = (np.clip(seen, 0.0, 1.0) * SCALE).astype(np.uint16)
    return images, len(centres)


def make_cellpainting_plate(dest: "str | Path", wells: Sequence[str] = ("A01", "A02"), sites: int = 2,
                            seed: int = 0, size: int = 256, cells: Tuple[int, int] = (8, 14),
                            plate: str = "CP1", treatments: Optional[Dict[str, str]] = None,
                            illumination_strength: float = 0.8) -> CellPaintingPlate:
    """Write a plate of wells x sites image sets under `dest`; return what was written.

    Layout (ImageXpress-like names, as `cpb loaddata`'s preset reads them):
      dest/images/<plate>_<well>_s<site>_w<1|2|3>.tif   DNA, AGP, Mito
      dest/load_data.csv    (also copied into images/) Image_FileName_<channel> + Metadata_Plate/Well/Site
      dest/truth.csv        plate, well, site, nuclei, treatment
      dest/platemap.csv     well_position, treatment, control (negcon | trt)
    `treatments` maps well -> treatment; by default every other well is treated with PHENOTYPE
    (A01 DMSO, A02 compound-M, A03 DMSO, ...). `illumination_strength` 0 gives flat light."""
    if sites < 1 or not wells:
        raise ValueError("make_cellpainting_plate needs at least one well and one site")
    if not 1 <= cells[0] <= cells[1]:
        raise ValueError("cells must be a (min, max) range with 1 <= min <= max")
    if not 0 <= illumination_strength < 1:
        raise ValueError("illumination_strength must be in [0, 1): the dimmest corner gets 1 - strength")
    if len(set(wells)) != len(wells):
        raise ValueError("wells must not repeat")
    if treatments is None:
        treatments = {well: (NEGATIVE_CONTROL if i % 2 == 0 else PHENOTYPE) for i, well in enumerate(wells)}
    missing = [w for w in wells if w not in treatments]
    if missing:
        raise ValueError(f"treatments names no treatment for well(s) {', '.join(missing)}")
    root = Path(dest)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    light = illumination_field(size, illumination_strength)
    truth: Dict[Tuple[str, int], int] = {}
    written: List[Path] = []
    rows = []
    for w_index, well in enumerate(wells):
        for site in range(1, sites + 1):
            rng = np.random.default_rng([seed, w_index, site])
            wanted = int(rng.integers(cells[0], cells[1] + 1))
            images, placed = render_site(rng, size, wanted, treatments[well] != NEGATIVE_CONTROL, light)
            names = []
            for channel in CHANNELS:
                name = f"{plate}_{well}_s{site}_w{CHANNEL_NUMBERS[channel]}.tif"
                tifffile.imwrite(images_dir / name, images[channel])
                written.append(images_dir / name)
                names.append(name)
            truth[(well, site)] = placed
            rows.append(names + [plate, well, str(site)])
    header = [f"Image_FileName_{c}" for c in CHANNELS] + ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    data_file = root / "load_data.csv"
    for path in (data_file, images_dir / "load_data.csv"):
        _write_csv(path, header, rows)
    truth_file = root / "truth.csv"
    _write_csv(truth_file, ["plate", "well", "site", "nuclei", "treatment"],
               [[plate, well, site, count, treatments[well]] for (well, site), count in truth.items()])
    platemap_file = root / "platemap.csv"
    _write_csv(platemap_file, ["well_position", "treatment", "control"],
               [[well, treatments[well], "negcon" if treatments[well] == NEGATIVE_CONTROL else "trt"]
                for well in wells])
    return CellPaintingPlate(root=root, plate=plate, images_dir=images_dir, data_file=data_file,
                             truth_file=truth_file, platemap_file=platemap_file, truth=truth,
                             treatments={w: treatments[w] for w in wells}, illumination=light, images=written)


def analysis_data_file(plate: CellPaintingPlate, illum_dir: "str | Path", dest: "str | Path") -> Path:
    """The analysis pipeline's LoadData CSV: the plate's rows plus, per channel,
    `Image_FileName_Illum<Ch>` = `Illum<Ch>.npy` and `Image_PathName_Illum<Ch>` = `illum_dir`
    (what `cpb loaddata --illum` writes for a run on S3; this is for local runs and tests)."""
    with open(plate.data_file, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    extra = []
    for channel in CHANNELS:
        extra += [f"Image_FileName_Illum{channel}", f"Image_PathName_Illum{channel}"]
    values = []
    for channel in CHANNELS:
        values += [ILLUM_FILES[channel], str(Path(illum_dir).resolve())]
    dest = Path(dest)
    _write_csv(dest, header + extra, [row + values for row in rows])
    return dest


def read_truth(path: "str | Path") -> Dict[Tuple[str, int], int]:
    """The truth CSV written by make_cellpainting_plate, as {(well, site): nuclei}."""
    with open(path, newline="") as handle:
        return {(row["well"], int(row["site"])): int(row["nuclei"]) for row in csv.DictReader(handle)}


def _write_csv(path: Path, header: List[str], rows: List[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
