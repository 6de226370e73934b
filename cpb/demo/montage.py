"""A picture of the plate: every site as the microscope saw it, and as CellProfiler outlined it.

The analysis pipeline saves `<DNA image>_outlines.png` per image set (illumination-corrected
channels, nuclei outlined in yellow, cells in white). The montage lays the plate out well by
well; each well is a block with one column per site:

    A01 s1  13/13          A01 s2  14/14        <- label: counted / true nuclei
    [as imaged]            [as imaged]          <- the raw TIFFs, one brightness scale for the plate
    [corrected, outlined]  [corrected, outlined]

A legend below the plate says what the labels and colours mean. The "as imaged" row shows the uneven light the illumination step corrects (every site dims
towards the same corner); the row below shows what the analysis found after the correction.
Without `images` (no raw TIFFs at hand) only the outlined row is drawn.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageOps

TILE = 160
LABEL = 16
GAP = 8          # between well blocks
MAX_WIDTH = 1400  # well blocks wrap onto another line beyond this width
#: raw channels shown as RGB, the way the analysis pipeline colours its outline images
GAMMA = 0.5  # lifts the dim background, so the fall-off of the light shows
COMPOSITE = (("Mito", 0), ("AGP", 1), ("DNA", 2))
LEGEND = ("label: well site: nuclei counted / true (orange where they differ)",
          "colours: DNA blue, AGP green, Mito red; outlines (cellpainting.cppipe): nuclei yellow, cells white",
          "as imaged: one brightness scale for the whole plate, so the uneven light shows")
LINE = 14  # legend line height


def _find_outline(results: Path, well: str, site: int) -> Optional[Path]:
    """The outline PNG of one site (named after its DNA image)."""
    matches = sorted(results.rglob(f"*_{well}_s{site}_w1*outlines*.png"))
    return matches[0] if matches else None


def _raw_composites(images: Mapping[Tuple[str, int], Mapping[str, Path]]) -> Dict[Tuple[str, int], Image.Image]:
    """One RGB picture per site from its raw channel TIFFs, every site on the SAME scale per channel
    (the plate's brightest pixel), so a dim corner stays dim instead of being stretched away."""
    import numpy as np
    import tifffile

    pixels = {key: {name: tifffile.imread(path).astype(np.float32) for name, path in channels.items()}
              for key, channels in images.items()}
    names = {name for channels in pixels.values() for name in channels}
    top = {name: max(float(max(c[name].max() for c in pixels.values() if name in c)), 1.0) for name in names}
    out = {}
    for key, channels in pixels.items():
        shape = next(iter(channels.values())).shape
        rgb = np.zeros(shape + (3,), dtype=np.float32)
        for name, slot in COMPOSITE:
            if name in channels:
                rgb[..., slot] = np.clip(channels[name] / top[name], 0.0, 1.0) ** GAMMA
        out[key] = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    return out


def _caption(sheet: Image.Image, text: str, at: Tuple[int, int], size: Tuple[int, int]) -> None:
    """`text` written upwards, centred in the box of `size` at `at` (width, height as on the sheet)."""
    band = Image.new("RGB", (size[1], size[0]), (40, 40, 40))
    draw = ImageDraw.Draw(band)
    width = draw.textlength(text)
    draw.text(((size[1] - width) / 2, 3), text, fill="white")
    sheet.paste(band.rotate(90, expand=True), at)


def _legend_lines(draw: ImageDraw.ImageDraw, width: int, raw: bool) -> list:
    """The legend's lines, each wrapped at word boundaries to fit `width` pixels."""
    lines = []
    for entry in LEGEND if raw else LEGEND[:2]:
        line = ""
        for word in entry.split(" "):
            if line and draw.textlength(f"{line} {word}") > width:
                lines.append(line)
                line = "  " + word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def make_montage(results: Path, truth: dict, dest: Path, counted: Optional[dict] = None,
                 images: Optional[Mapping[Tuple[str, int], Mapping[str, Path]]] = None) -> Path:
    """Write the montage to `dest`; return its path. `truth` and `counted` map (well, site) to
    nuclei; `images` maps (well, site) to {channel name: raw TIFF} (optional)."""
    wells: Sequence[str] = sorted({w for w, _ in truth})
    sites: Sequence[int] = sorted({s for _, s in truth})
    counted = counted or {}
    raw = _raw_composites(images) if images else {}
    rows = 2 if raw else 1
    block_w, block_h = len(sites) * TILE, LABEL + rows * TILE
    per_line = max(1, min(len(wells), (MAX_WIDTH + GAP) // (block_w + GAP)))
    lines = math.ceil(len(wells) / per_line)
    margin = LABEL + 2  # the row captions, written upwards on the left
    width = margin + per_line * block_w + (per_line - 1) * GAP
    legend = _legend_lines(ImageDraw.Draw(Image.new("RGB", (1, 1))), width - 8, bool(raw))
    height = lines * block_h + (lines - 1) * GAP
    sheet = Image.new("RGB", (width, height + 6 + LINE * len(legend)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for n, text in enumerate(legend):
        draw.text((4, height + 4 + n * LINE), text, fill=(220, 220, 220))
    captions = (["as imaged", "corrected + outlines"] if raw else ["outlines"])
    for line in range(lines):
        for r, caption in enumerate(captions):
            _caption(sheet, caption, (0, line * (block_h + GAP) + LABEL + r * TILE), (margin, TILE))
    for w_index, well in enumerate(wells):
        bx = margin + (w_index % per_line) * (block_w + GAP)
        by = (w_index // per_line) * (block_h + GAP)
        draw.rectangle([bx, by, bx + block_w - 1, by + block_h - 1], fill="black")
        for s_index, site in enumerate(sites):
            if (well, site) not in truth:
                continue
            x = bx + s_index * TILE
            got, true = counted.get((well, site)), truth[(well, site)]
            draw.text((x + 4, by + 2), f"{well} s{site}: {'?' if got is None else got}/{true}",
                      fill="white" if got == true else "orange")
            y = by + LABEL
            if raw:
                tile = raw.get((well, site))
                if tile is not None:
                    sheet.paste(tile.resize((TILE, TILE)), (x, y))
                y += TILE
            path = _find_outline(results, well, site)
            if path is not None:
                with Image.open(path) as tile:
                    sheet.paste(ImageOps.autocontrast(tile.convert("RGB")).resize((TILE, TILE)), (x, y))
            else:
                draw.text((x + 8, y + TILE // 2), "no outline image", fill="red")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest
