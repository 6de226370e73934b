"""The Lambda functions: `handlers.ingress.handler` (SQS -> Batch) and `handlers.events.handler`
(Batch job state changes -> outcome files, out-of-memory retries, metrics).

The function asset holds this package, the stdlib-only `cpb_worker` modules below (the worker's own
rules: pipeline parsing and splittability, LoadData row ranges, file-rule image-set counting,
fingerprints) and the packages of `handlers/requirements.txt`, vendored.
"""

#: `image/cpb_worker/` modules the Lambda functions import (all stdlib-only); the asset must ship them.
WORKER_MODULES_FOR_LAMBDA = ("__init__.py", "errors.py", "pipeline.py", "datafile.py", "fingerprint.py",
                             "filerules.py")
