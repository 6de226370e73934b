"""Synthetic nuclei plates with a known nucleus count: a test oracle and demo data.

Each site is two 16-bit TIFFs: DNA (bright, well separated Gaussian nuclei on
a dim noisy background) and Cells (a broader, dimmer halo around each
nucleus). Nuclei never overlap and keep clear of the image border, so a
segmentation such as `cpb/pipelines/nuclei.cppipe` should find exactly the
number written to the truth CSV. Everything is deterministic from the seed.

    plate = make_plate("demo-data", wells=("A01", "A02"), sites=2, seed=7)
    plate.truth[("A01", 1)]   # -> nuclei in well A01, site 1
    plate.data_file           # LoadData CSV (file names relative to plate.images_dir)

`make_metadata_plate` writes the same kind of sites for a pipeline WITHOUT LoadData
(`cpb/pipelines/metadata_illum.cppipe`): Phenix/Opera-style file names
(`r02c03f01p01-ch1sk1fk1fl1.tiff`: row, column, field/site, channel) that the pipeline's
Metadata module reads, an uneven illumination field multiplied into every image, and that
field saved as `.npy` illumination functions which NamesAndTypes loads beside them.

Uses numpy and tifffile (in the project's .venv); the worker never imports this.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import tifffile

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "nuclei.cppipe"
#: Images -> Metadata -> NamesAndTypes (metadata matching, illumination functions) -> analysis.
METADATA_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "metadata_illum.cppipe"
CHANNELS = ("DNA", "Cells")


@dataclass(frozen=True)
class Plate:
    """Where a generated plate lives and what it holds."""

    root: Path
    images_dir: Path
    data_file: Path
    truth_file: Path
    truth: Dict[Tuple[str, int], int]
    images: List[Path] = field(default_factory=list)

    @property
    def image_sets(self) -> int:
        return len(self.truth)


def _place_nuclei(rng: np.random.Generator, size: int, count: int, radius_max: float,
                  margin: int) -> List[Tuple[float, float]]:
    """Centres at least 3.5 radii apart and `margin` px from every edge (rejection sampling)."""
    min_gap = 3.5 * radius_max
    centres: List[Tuple[float, float]] = []
    tries = 0
    while len(centres) < count and tries < 20000:
        tries += 1
        y, x = rng.uniform(margin, size - margin, size=2)
        if all((y - cy) ** 2 + (x - cx) ** 2 >= min_gap ** 2 for cy, cx in centres):
            centres.append((float(y), float(x)))
    return centres


def render_site(rng: np.random.Generator, size: int, count: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """(DNA, Cells, nuclei placed) for one site."""
    sigma_lo, sigma_hi = 2.5, 4.0
    centres = _place_nuclei(rng, size, count, radius_max=2.5 * sigma_hi, margin=int(4 * sigma_hi) + 4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dna = np.zeros((size, size))
    cells = np.zeros((size, size))
    for cy, cx in centres:
        sigma = rng.uniform(sigma_lo, sigma_hi)
        stretch = rng.uniform(0.8, 1.25)  # slightly elliptical nuclei
        d2 = ((yy - cy) / stretch) ** 2 + ((xx - cx) * stretch) ** 2
        dna += rng.uniform(0.55, 0.95) * np.exp(-d2 / (2 * sigma ** 2))
        cells += rng.uniform(0.2, 0.4) * np.exp(-d2 / (2 * (2.2 * sigma) ** 2))
    dna += 0.04 + rng.normal(0.0, 0.01, dna.shape)
    cells += 0.05 + rng.normal(0.0, 0.01, cells.shape)
    to16 = lambda a: (np.clip(a, 0.0, 1.0) * 40000).astype(np.uint16)  # noqa: E731
    return to16(dna), to16(cells), len(centres)


def make_plate(dest: "str | Path", wells: Sequence[str] = ("A01", "A02"), sites: int = 2, seed: int = 0,
               size: int = 256, nuclei: Tuple[int, int] = (6, 18), plate: str = "SYN1") -> Plate:
    """Write a plate of wells x sites image sets under dest; return what was written.

    Layout: dest/images/<plate>_<well>_s<site>_w<1|2>.tif, dest/load_data.csv
    (also copied into images/ as the pipeline's default data file),
    dest/truth.csv (plate, well, site, nuclei)."""
    if sites < 1 or not wells:
        raise ValueError("make_plate needs at least one well and one site")
    if not nuclei[0] >= 1 or nuclei[1] < nuclei[0]:
        raise ValueError("nuclei must be a (min, max) range with 1 <= min <= max")
    root = Path(dest)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    truth: Dict[Tuple[str, int], int] = {}
    images: List[Path] = []
    rows = []
    for w_index, well in enumerate(wells):
        for site in range(1, sites + 1):
            rng = np.random.default_rng([seed, w_index, site])
            wanted = int(rng.integers(nuclei[0], nuclei[1] + 1))
            dna, cells, placed = render_site(rng, size, wanted)
            names = []
            for channel, pixels in zip((1, 2), (dna, cells)):
                name = f"{plate}_{well}_s{site}_w{channel}.tif"
                tifffile.imwrite(images_dir / name, pixels)
                images.append(images_dir / name)
                names.append(name)
            truth[(well, site)] = placed
            rows.append([names[0], names[1], plate, well, str(site)])
    header = ["Image_FileName_DNA", "Image_FileName_Cells", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    data_file = root / "load_data.csv"
    for path in (data_file, images_dir / "load_data.csv"):
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    truth_file = root / "truth.csv"
    with open(truth_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["plate", "well", "site", "nuclei"])
        for (well, site), count in truth.items():
            writer.writerow([plate, well, site, count])
    return Plate(root=root, images_dir=images_dir, data_file=data_file, truth_file=truth_file, truth=truth,
                 images=images)


def read_truth(path: "str | Path") -> Dict[Tuple[str, int], int]:
    """The truth CSV written by make_plate, as {(well, site): nuclei}."""
    with open(path, newline="") as handle:
        return {(row["well"], int(row["site"])): int(row["nuclei"]) for row in csv.DictReader(handle)}


def illumination_field(size: int, strength: float = 0.45) -> np.ndarray:
    """A smooth multiplicative field: 1.0 at an off-centre peak, falling to about 1 - strength in
    the far corner (the vignetting of a widefield objective). Float64, shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    d2 = (yy - 0.4) ** 2 + (xx - 0.35) ** 2
    return 1.0 - strength * np.clip(d2 / 0.85, 0.0, 1.0)


def phenix_name(well: str, site: int, channel: int) -> str:
    """`r02c03f01p01-ch1sk1fk1fl1.tiff` for well B03, site 1, channel 1 (PerkinElmer Phenix/Opera)."""
    row, column = ord(well[0].upper()) - ord("A") + 1, int(well[1:])
    return f"r{row:02d}c{column:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff"


def metadata_well(well: str) -> str:
    """The `Well` metadata the metadata pipeline builds from row and column: B03 -> r02c03."""
    return phenix_name(well, 1, 1)[:6]


def make_metadata_plate(dest: "str | Path", wells: Sequence[str] = ("B03", "B04"), sites: int = 2,
                        seed: int = 0, size: int = 256, nuclei: Tuple[int, int] = (6, 18),
                        plate: str = "SYN2", illumination: float = 0.45) -> Plate:
    """A plate for `METADATA_PIPELINE`: no LoadData, the pipeline finds its image sets from names.

    Layout: dest/images/<phenix names>.tiff (ch1 DNA, ch2 Cells, each multiplied by the
    illumination field), dest/images/illum/<plate>_Illum{DNA,Cells}.npy (that field, which
    CorrectIlluminationApply divides out), dest/truth.csv. `truth` is keyed by
    (Well metadata as the pipeline extracts it, e.g. "r02c03", site). `data_file` is a LoadData
    CSV of the same image sets in the order CellProfiler makes them (sorted by file name), for
    comparisons only: the metadata pipeline does not read it."""
    if sites < 1 or not wells:
        raise ValueError("make_metadata_plate needs at least one well and one site")
    if not nuclei[0] >= 1 or nuclei[1] < nuclei[0]:
        raise ValueError("nuclei must be a (min, max) range with 1 <= min <= max")
    root = Path(dest)
    images_dir = root / "images"
    (images_dir / "illum").mkdir(parents=True, exist_ok=True)
    field_ = illumination_field(size, illumination)
    truth: Dict[Tuple[str, int], int] = {}
    images: List[Path] = []
    rows = []
    for w_index, well in enumerate(wells):
        for site in range(1, sites + 1):
            rng = np.random.default_rng([seed, w_index, site])
            wanted = int(rng.integers(nuclei[0], nuclei[1] + 1))
            dna, cells, placed = render_site(rng, size, wanted)
            names = []
            for channel, pixels in zip((1, 2), (dna, cells)):
                name = phenix_name(well, site, channel)
                shaded = np.clip(np.rint(pixels.astype(np.float64) * field_), 0, 65535).astype(np.uint16)
                tifffile.imwrite(images_dir / name, shaded)
                images.append(images_dir / name)
                names.append(name)
            truth[(metadata_well(well), site)] = placed
            rows.append((names[0], names[1], plate, metadata_well(well), str(site)))
    for channel in CHANNELS:
        path = images_dir / "illum" / f"{plate}_Illum{channel}.npy"
        np.save(path, field_)
        images.append(path)
    rows.sort()
    data_file = root / "load_data.csv"
    with open(data_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image_FileName_OrigDNA", "Image_FileName_OrigCells", "Metadata_Plate", "Metadata_Well",
                         "Metadata_Site"])
        writer.writerows(rows)
    truth_file = root / "truth.csv"
    with open(truth_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["plate", "well", "site", "nuclei"])
        for (well, site), count in sorted(truth.items()):
            writer.writerow([plate, well, site, count])
    return Plate(root=root, images_dir=images_dir, data_file=data_file, truth_file=truth_file, truth=truth,
                 images=images)
