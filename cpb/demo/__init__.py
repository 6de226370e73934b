"""`cpb demo` (`make demo`): a generated plate with a known answer, run end to end on the local cloud.

- `run`: the demo itself (DemoSettings, run_demo);
- `synthetic`: synthetic plates whose true nucleus counts are known (also the tests' oracle);
- `montage`: the plate picture.
"""
