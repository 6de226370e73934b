"""`cpb demo` (`make demo`): a generated Cell Painting plate with a known answer, run end to end on the local cloud.

- `run`: the demo itself (DemoSettings, run_demo): cpb plate (illumination -> analysis), status,
  results --parquet, report, profile, the truth check, and a second cpb plate that sends nothing;
- `cellpainting`: the demo's plate (DNA, AGP, Mito under uneven light, known cells per site, platemap);
- `synthetic`: nuclei-only plates with known counts (the worker and CLI tests' oracle);
- `montage`: the plate picture (each site as imaged, and corrected with its outlines).
"""
