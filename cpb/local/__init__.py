"""The local cloud: the stack on this machine, AWS emulated on 127.0.0.1, for `cpb local up`,
`cpb demo` and the tests. Nothing here is used against a deployed stack.

- `up`: `LocalCloud`, every part below started and stopped together (`cpb local up` serves it);
- `settings`: what it mirrors (the stack's config schema: Pulumi.yaml defaults, a stack file, `--set`);
- `emulator`: moto's server and the stack's resources in it (bucket, queues, job queue and definition);
- `mapping`: the SQS -> Lambda event source mapping, delivering batches to the real ingress handler;
- `lambdas`: a Lambda runtime (context, timeout, logs to a folder and CloudWatch Logs);
- `batch`: the Batch compute, running the real worker for each job and array child (`motobatch`:
  the one module that touches moto's internals);
- `events`: the EventBridge rule delivering job state changes to the job-events Lambda;
- `persist`: `--state-dir` (the bucket across restarts); `state`: the state file `--stack local` reads;
- `commands`: the `cpb local` click group.
"""
