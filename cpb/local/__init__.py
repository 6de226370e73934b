"""The local cloud: AWS emulated on 127.0.0.1 with the stack's resources, for `cpb demo`,
`cpb local up` and the tests. Nothing here is used against a deployed stack.

- `emulator`: moto's server and the stack's bucket, queues, job queue and job definition;
- `mapping`: the SQS -> Lambda event source mapping, delivering batches to the real handler;
- `batch`: the Batch compute, running the real worker for each job and array child.
"""
