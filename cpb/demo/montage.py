"""A picture of the plate: every site's outline image on one labelled PNG.

The pipeline saves `<DNA image>_outlines.png` per image set (OverlayOutlines
+ SaveImages). Laying them out as wells x sites with the counted and true
numbers shows at a glance what CellProfiler found.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageOps

TILE = 192
LABEL = 18


def _find_outline(results: Path, well: str, site: int) -> Optional[Path]:
    """The outline PNG of one site (named after its DNA image)."""
    matches = sorted(results.rglob(f"*_{well}_s{site}_w1*outlines*.png"))
    return matches[0] if matches else None


def make_montage(results: Path, truth: dict, dest: Path, counted: Optional[dict] = None) -> Path:
    """Write the montage to `dest` (rows = wells, columns = sites); return its path."""
    wells = sorted({w for w, _ in truth})
    sites = sorted({s for _, s in truth})
    counted = counted or {}
    sheet = Image.new("RGB", (len(sites) * TILE, len(wells) * (TILE + LABEL)), "black")
    draw = ImageDraw.Draw(sheet)
    for r, well in enumerate(wells):
        for c, site in enumerate(sites):
            x, y = c * TILE, r * (TILE + LABEL)
            path = _find_outline(results, well, site)
            if path is not None:
                with Image.open(path) as tile:
                    tile = ImageOps.autocontrast(tile.convert("RGB"))
                    sheet.paste(tile.resize((TILE, TILE)), (x, y + LABEL))
            else:
                draw.text((x + 8, y + LABEL + TILE // 2), "no outline image", fill="red")
            got = counted.get((well, site))
            text = f"{well} s{site}: {'?' if got is None else got}/{truth[(well, site)]}"
            draw.text((x + 4, y + 3), text, fill="white" if got == truth[(well, site)] else "orange")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest
