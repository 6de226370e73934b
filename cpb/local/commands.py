"""`cpb local ...`: the local stack's commands (added to `cpb` at the end of cpb/cli.py)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click


@click.group("local")
def local() -> None:
    """The whole stack on this machine (AWS emulated on 127.0.0.1), for the AWS CLI, boto3 and cpb."""


@local.command("up")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port on 127.0.0.1 (default 4747; 0 picks a free one).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="A Pulumi stack settings file to mirror (e.g. Pulumi.dev.yaml) instead of the Pulumi.yaml defaults.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one stack setting, as `pulumi config set` would (e.g. --set jobMaxVcpus=8). Repeatable.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the bucket here across restarts (queues and Batch jobs stay in memory).")
@click.option("--log-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where Lambda and job logs go (default: $CPB_HOME/local-logs/<start time>).")
@click.option("--cores", type=click.IntRange(1, 1024), default=None,
              help="Cores the local Batch may use at once (default: this machine's).")
@click.option("--redeliver-after", type=click.FloatRange(0, 43200), default=None, metavar="SECONDS",
              help="Bring messages the Lambda failed back after SECONDS instead of the queue's visibility "
                   "timeout (6 x lambdaTimeoutSeconds), to try retries and the dead-letter queue quickly.")
def up(port: Optional[int], config_file: Optional[Path], overrides: tuple[str, ...], state_dir: Optional[Path],
       log_dir: Optional[Path], cores: Optional[int], redeliver_after: Optional[float]) -> None:
    """Run the stack here in the foreground until Ctrl-C: moto's server with the stack's resources, the
    SQS -> Lambda mapping with the real handler, and Batch running the real worker."""
    from cpb.local.settings import SettingsError, load_settings
    from cpb.local.up import DEFAULT_PORT, LocalCloud, LocalStackError, serve

    try:
        settings = load_settings(config_file, overrides)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    cloud = LocalCloud(settings, port=DEFAULT_PORT if port is None else port, state_dir=state_dir,
                       log_dir=log_dir, cores=cores, redeliver_after=redeliver_after,
                       say=lambda text: click.echo(text))
    try:
        sys.exit(serve(cloud, out=lambda text: click.echo(text)))
    except LocalStackError as exc:
        raise click.ClickException(str(exc)) from None
