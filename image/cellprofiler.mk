# The one CellProfiler version this project runs, named once. Read by the Makefile (the
# local .venv-cp), checked by tests/test_cellprofiler_version.py against the Dockerfile's
# default CELLPROFILER_TAG, the Pulumi config default `cellprofilerImageTag`, the pins in
# requirements-cellprofiler.txt and the docs: change them together.
#
# CELLPROFILER_TAG   tag of the official cellprofiler/cellprofiler image the worker is built FROM
# CELLPROFILER_PYPI  the same release on PyPI (4.2.8 was re-released there as 4.2.8.1), for laptops and CI
CELLPROFILER_TAG = 4.2.8
CELLPROFILER_PYPI = 4.2.8.1
