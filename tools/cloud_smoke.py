"""`make cloud-smoke STACK=name`: deploy a throw-away stack, run the demo plate on it, destroy it.

For someone with an AWS account who wants to know the whole system works there (it cannot run in
this project's CI: no account). In order:

 1. checks what it needs (the Pulumi CLI and a backend login, Docker, AWS credentials) and that the
    stack name is new (it never touches an existing stack or Pulumi.<name>.yaml);
 2. says what it will cost and how long it takes, and asks (``--yes`` skips the question);
 3. ``pulumi stack init`` + the ``dev`` stack's settings (Pulumi.dev.yaml: FSx off, forceDestroy on),
    ``pulumi up --policy-pack policy``;
 4. runs the plate ``make demo`` runs, the same way: generates the synthetic Cell Painting plate (three
    channels under uneven light, a known nucleus count per site: ``cpb.demo.cellpainting``), sends it
    with ``cpb plate`` (LoadData from the file names, upload, ONE message: the illumination job, then
    the analysis array job after it, chained with ``after``/Batch ``dependsOn``), waits for both steps
    with ``cpb status --watch``, downloads both with ``cpb results``, checks the illumination step
    saved one function per channel and every well's nucleus count against the truth (right only
    with the illumination correction applied);
 5. ALWAYS ``pulumi destroy`` and ``pulumi stack rm``: after success, after any failure, and after
    Ctrl-C / SIGTERM / SIGHUP (the running ``pulumi up`` is told to stop first; while destroying, further
    interrupts are ignored, because stopping a destroy half-way leaves billed resources behind).

The Pulumi and cpb steps sit behind two small classes (``PulumiCli``, ``CpbClient``) so the
orchestration, including the destroy-on-failure and destroy-on-signal paths, is tested with fakes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence

REPO = Path(__file__).resolve().parent.parent
PROJECT = "cellpainting-batch"

#: Said before anything is created. Estimated, not measured: this project has no AWS account.
EXPECTED = """\
cloud smoke test of stack {stack} in {region} (estimated; never measured here, there is no AWS account):
  duration  about 35-55 minutes: pulumi up 10-20 min (building and pushing the ~3 GB CellProfiler image,
            NAT gateway, Batch), the demo plate 15-20 min (hosts start from 0 vCPU and pull the image; the
            illumination job over all {sets} image sets, then the analysis array job after it), pulumi
            destroy 5-10 min
  cost      under US$1, typically US$0.20-0.50: a NAT gateway (~$0.05/h), a few spot instance-minutes
            (c6i/m6i), ECR storage of the image for an hour, and cents of S3, Lambda, SQS, EventBridge and
            CloudWatch. FSx is off in the dev settings (it would bill ~$0.23/h).
  cleanup   the stack is destroyed and removed at the end, also when a step fails or you press Ctrl-C"""

#: `cpb status` exit codes (cpb/cli.py): 0 all succeeded, 1 something failed, 3 still running.
STATUS_OK, STATUS_FAILED, STATUS_RUNNING = 0, 1, 3


class SmokeFailure(Exception):
    """A step failed; the message says which and why."""


class Interrupted(BaseException):
    """Ctrl-C, SIGTERM or SIGHUP arrived (a BaseException, like KeyboardInterrupt, so no step swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------- running commands

class Commands:
    """Runs one external command at a time in its own process group, so a terminal's Ctrl-C reaches
    only this program; an interrupt is then passed on to the command deliberately (``forward``) or not
    at all (``protected``)."""

    def __init__(self, say: Callable[[str], None], grace_seconds: float = 120.0) -> None:
        self.say, self.grace_seconds = say, grace_seconds
        self.current: Optional[subprocess.Popen] = None

    def run(self, argv: Sequence[str], *, cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None,
            capture: bool = False, protected: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv``; on an interrupt (raised in this thread by the signal handler) tell the command to
        stop (SIGINT, as Ctrl-C would), give it ``grace_seconds`` to stop cleanly, and re-raise.
        ``protected`` commands (the destroy) are never interrupted."""
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env) if env is not None else None,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.PIPE if capture else None, text=True, start_new_session=True)
        self.current = proc
        try:
            while True:
                try:
                    out, err = proc.communicate()
                    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
                except Interrupted:
                    if protected:
                        continue  # the handler already said why it is ignored; keep waiting
                    self._stop(proc, argv)
                    raise
        finally:
            self.current = None

    def _stop(self, proc: subprocess.Popen, argv: Sequence[str]) -> None:
        self.say(f"cloud-smoke: asking `{' '.join(argv[:3])}` to stop (it finishes what it is doing; up to "
                 f"{self.grace_seconds:.0f} s)")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=self.grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[dict]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise Interrupted in the main thread, unless
    ``state["protected"]`` is true: then they are reported and ignored."""
    state = {"protected": False, "say": print, "received": []}

    def handler(signum: int, frame: object) -> None:
        state["received"].append(signum)
        if state["protected"]:
            state["say"](f"cloud-smoke: {signal.Signals(signum).name} ignored: destroying the stack; stopping now "
                         "would leave billed resources behind (kill -9 "
                         f"{os.getpid()} if you must, then run `pulumi destroy` yourself)")
            return
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- the two services

class Pulumi(Protocol):
    def check(self) -> None: ...
    def exists(self, stack: str) -> bool: ...
    def create(self, stack: str, settings: Mapping[str, str]) -> None: ...
    def up(self, stack: str) -> None: ...
    def outputs(self, stack: str) -> dict: ...
    def destroy(self, stack: str) -> None: ...
    def remove(self, stack: str) -> None: ...


class Client(Protocol):
    def check(self, region: str) -> str: ...
    def submit(self, stack: str, plate: "Plate", root: str) -> None: ...
    def wait(self, stack: str, outputs: Sequence[str], timeout_seconds: float) -> int: ...
    def results(self, stack: str, output: str, dest: Path) -> Path: ...


class PulumiCli:
    """The Pulumi CLI, run in the project folder."""

    def __init__(self, commands: Commands, repo: Path = REPO, exe: str = "pulumi") -> None:
        self.commands, self.repo, self.exe = commands, repo, exe

    def _run(self, *args: str, capture: bool = False, protected: bool = False) -> subprocess.CompletedProcess:
        return self.commands.run([self.exe, *args], cwd=self.repo, capture=capture, protected=protected)

    def check(self) -> None:
        if shutil.which(self.exe) is None:
            raise SmokeFailure("the Pulumi CLI is not on PATH: install it (https://www.pulumi.com/docs/install/)")
        who = self._run("whoami", "--non-interactive", capture=True)
        if who.returncode != 0:
            raise SmokeFailure("not logged in to a Pulumi backend: run `pulumi login` (or `pulumi login --local`; "
                               "then set PULUMI_CONFIG_PASSPHRASE)")

    def exists(self, stack: str) -> bool:
        listed = self._run("stack", "ls", "--json", "--non-interactive", capture=True)
        if listed.returncode != 0:
            raise SmokeFailure(f"`pulumi stack ls` failed: {_last_line(listed)}")
        return any(entry.get("name", "").split("/")[-1] == stack for entry in json.loads(listed.stdout or "[]"))

    def create(self, stack: str, settings: Mapping[str, str]) -> None:
        made = self._run("stack", "init", stack, "--non-interactive", capture=True)
        if made.returncode != 0:
            raise SmokeFailure(f"`pulumi stack init {stack}` failed: {_last_line(made)}")
        for key, value in settings.items():
            done = self._run("config", "set", "--stack", stack, key, value, "--non-interactive", capture=True)
            if done.returncode != 0:
                raise SmokeFailure(f"`pulumi config set {key}` failed: {_last_line(done)}")

    def up(self, stack: str) -> None:
        done = self._run("up", "--stack", stack, "--yes", "--skip-preview", "--non-interactive",
                         "--policy-pack", "policy")
        if done.returncode != 0:
            raise SmokeFailure(f"`pulumi up` failed (exit {done.returncode}); its messages are above")

    def outputs(self, stack: str) -> dict:
        done = self._run("stack", "output", "--stack", stack, "--json", "--non-interactive", capture=True)
        if done.returncode != 0:
            raise SmokeFailure(f"`pulumi stack output` failed: {_last_line(done)}")
        return json.loads(done.stdout or "{}")

    def destroy(self, stack: str) -> None:
        """Destroy, protected from interrupts; once more after a refresh when the first attempt fails (an
        interrupted `up` can leave operations the first destroy trips over)."""
        for attempt in (1, 2):
            done = self._run("destroy", "--stack", stack, "--yes", "--skip-preview", "--non-interactive",
                             "--continue-on-error", protected=True)
            if done.returncode == 0:
                return
            if attempt == 1:
                self._run("refresh", "--stack", stack, "--yes", "--skip-preview", "--non-interactive",
                          protected=True)
        raise SmokeFailure(f"`pulumi destroy --stack {stack}` failed twice: resources may be left in your account; "
                           f"run `pulumi destroy --stack {stack}` again and check the AWS console")

    def remove(self, stack: str) -> None:
        # Never --force: that would forget resources that still exist.
        done = self._run("stack", "rm", stack, "--yes", "--non-interactive", capture=True, protected=True)
        if done.returncode != 0:
            raise SmokeFailure(f"`pulumi stack rm {stack}` failed: {_last_line(done)}")


@dataclass
class Plate:
    """The generated demo plate (cpb.demo.cellpainting.make_cellpainting_plate) and how `cpb plate` runs it."""

    name: str  # the plate name in its file names: its outputs are <root>/<name>/illum and <root>/<name>/analysis
    images_dir: Path
    truth: dict
    illum_pipeline: Path
    analysis_pipeline: Path
    channels: dict  # CellProfiler image name -> channel number in the file names (w1, w2, ...)
    illum_files: tuple = ()  # what the illumination step must save (one function per channel)

    def outputs(self, root: str) -> tuple[str, str]:
        """(illumination output, analysis output) under `root`, as `cpb plate` lays them out."""
        return f"{root}/{self.name}/illum", f"{root}/{self.name}/analysis"


class CpbClient:
    """The scientist's side: the real `cpb` commands, pointed at the stack with --stack."""

    def __init__(self, invoke: Optional[Callable[[list[str]], int]] = None, poll_seconds: int = 30) -> None:
        self.invoke, self.poll_seconds = invoke or _cpb, poll_seconds

    def check(self, region: str) -> str:
        """The AWS account the credentials belong to (and Docker, which `pulumi up` builds the image with)."""
        if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True,
                                                            timeout=60).returncode != 0:
            raise SmokeFailure("Docker is not running: `pulumi up` builds the worker image with it")
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return boto3.client("sts", region_name=region).get_caller_identity()["Account"]
        except (BotoCoreError, ClientError) as error:
            raise SmokeFailure(f"no usable AWS credentials ({error}): `aws sso login`, `aws configure` or "
                               "AWS_PROFILE") from None

    def submit(self, stack: str, plate: Plate, root: str) -> None:
        """`cpb plate`, as `make demo` sends its plate: illumination, then the analysis array after it."""
        channels = [a for name, number in plate.channels.items() for a in ("--channel", f"{number}={name}")]
        code = self.invoke(["plate", "--stack", stack, str(plate.images_dir),
                            "--illum-pipeline", str(plate.illum_pipeline),
                            "--analysis-pipeline", str(plate.analysis_pipeline), "--pattern", "imagexpress",
                            *channels, "--root", root,
                            "--image-sets-per-job", "2", "--vcpus", "1", "--memory", "4096"])
        if code != 0:
            raise SmokeFailure(f"`cpb plate` failed (exit {code})")

    def wait(self, stack: str, outputs: Sequence[str], timeout_seconds: float) -> int:
        return self.invoke(["status", "--stack", stack, *outputs, "--watch", "--interval", str(self.poll_seconds),
                            "--timeout", str(timeout_seconds), "--logs", "20"])

    def results(self, stack: str, output: str, dest: Path) -> Path:
        """Download `output`'s current run into `dest` (returned)."""
        code = self.invoke(["results", "--stack", stack, output, "--to", str(dest)])
        if code != 0:
            raise SmokeFailure(f"`cpb results` refused {output} (exit {code})")
        return dest


def _cpb(args: list[str]) -> int:
    """Run a cpb command in this process, as typed; its exit code."""
    import click

    from cpb.cli import cli
    try:
        cli.main(args=args, prog_name="cpb", standalone_mode=False)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return 0


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = ((done.stderr or "") + (done.stdout or "")).strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


# ---------------------------------------------------------------- the smoke test

@dataclass
class SmokeSettings:
    stack: str
    region: Optional[str] = None  # default: Pulumi.dev.yaml's aws:region
    yes: bool = False
    wait_minutes: float = 45.0
    wells: tuple[str, ...] = ("A01", "A02")  # A01 a negative control, A02 treated (the demo's platemap)
    sites: int = 4
    seed: int = 7
    tolerance: float = 0.1
    work_dir: Optional[Path] = None
    repo: Path = REPO
    confirm: Callable[[str], bool] = field(default=lambda prompt: input(prompt).strip().lower() in ("y", "yes"))


def dev_settings(repo: Path, region: Optional[str]) -> dict[str, str]:
    """The dev stack's settings (Pulumi.dev.yaml) as `pulumi config set` takes them, FSx off and the
    bucket and repository destroyable whatever the file says."""
    import yaml

    config = yaml.safe_load((repo / "Pulumi.dev.yaml").read_text())["config"]
    settings = {key: (str(value).lower() if isinstance(value, bool) else str(value)) for key, value in config.items()}
    settings[f"{PROJECT}:forceDestroy"] = "true"  # a throw-away stack must take its data with it
    settings[f"{PROJECT}:fsxEnabled"] = "false"
    if region:
        settings["aws:region"] = region
    return settings


def check_counts(image_csv: Path, truth: dict, tolerance: float) -> list[str]:
    """Problems (one line each) comparing the results' nucleus counts with the plate's truth."""
    from cpb.demo.run import compare_counts

    return [f"well {row['well']}: counted {row['counted']}, true {row['true']}"
            + (f", sites {row['missing']} missing" if row["missing"] else "")
            for row in compare_counts(image_csv, truth, tolerance) if not row["ok"]]


#: The plate's name in its file names (and so in its outputs, plates/SMOKE1/illum and .../analysis).
PLATE_NAME = "SMOKE1"


def make_demo_plate(dest: Path, settings: SmokeSettings) -> Plate:
    """The Cell Painting plate `make demo` runs (cpb.demo.cellpainting), with its two pipelines."""
    from cpb.demo.cellpainting import (ANALYSIS_PIPELINE, CHANNEL_NUMBERS, ILLUM_FILES, ILLUM_PIPELINE,
                                       make_cellpainting_plate)

    plate = make_cellpainting_plate(dest, wells=settings.wells, sites=settings.sites, seed=settings.seed,
                                    plate=PLATE_NAME)
    return Plate(name=plate.plate, images_dir=plate.images_dir, truth=plate.truth, illum_pipeline=ILLUM_PIPELINE,
                 analysis_pipeline=ANALYSIS_PIPELINE, channels=dict(CHANNEL_NUMBERS),
                 illum_files=tuple(sorted(ILLUM_FILES.values())))


def check_illumination(folder: Path, plate: Plate) -> list[str]:
    """Problems (one line each) with the illumination step's results: a function per channel."""
    return [f"the illumination step saved no {name} (its results: {sorted(p.name for p in folder.glob('*'))})"
            for name in plate.illum_files if not (folder / name).is_file()]


def run_smoke(settings: SmokeSettings, pulumi: Pulumi, client: Client, say: Callable[[str], None] = print,
              make_plate: Callable[[Path, SmokeSettings], Plate] = make_demo_plate) -> int:
    """The smoke test; 0 when the plate came back right and the stack is gone, 1 on a failure, 130 when
    interrupted. The stack is destroyed in every case once it may exist."""
    settings_for_stack = dev_settings(settings.repo, settings.region)
    region = settings_for_stack.get("aws:region", "")
    config_file = settings.repo / f"Pulumi.{settings.stack}.yaml"
    created = False
    outcome, problems = 1, []
    with interrupts_raise() as signals:
        signals["say"] = say
        try:
            if settings.stack in ("dev", "prod") or config_file.exists():
                raise SmokeFailure(f"stack {settings.stack!r} has settings here ({config_file.name}): cloud-smoke "
                                   "creates and destroys its own stack; choose a new name, e.g. STACK=smoke-$USER")
            pulumi.check()
            account = client.check(region)
            if pulumi.exists(settings.stack):
                raise SmokeFailure(f"stack {settings.stack} already exists in your Pulumi backend: cloud-smoke "
                                   "destroys what it creates, so it only uses a new stack; choose another name")
            sets = len(settings.wells) * settings.sites
            say(EXPECTED.format(stack=settings.stack, region=region, sets=sets) + f"\n  account   {account}")
            if not settings.yes and not settings.confirm("go ahead? [y/N] "):
                say("cloud-smoke: nothing created")
                return 1
            started = time.monotonic()
            say(f"[1/5] pulumi stack init {settings.stack} with the dev settings")
            created = True  # from here on the stack may exist: always destroy
            pulumi.create(settings.stack, settings_for_stack)
            say("[2/5] pulumi up --policy-pack policy")
            pulumi.up(settings.stack)
            outputs = pulumi.outputs(settings.stack)
            missing = {"bucketName", "queueUrl", "jobQueueArn", "jobDefinitionArn"} - set(outputs)
            if missing:
                raise SmokeFailure(f"the stack has no outputs {sorted(missing)}")
            work = Path(tempfile.mkdtemp(prefix="cpb-cloud-smoke-", dir=settings.work_dir))
            root = f"smoke-{time.strftime('%Y%m%dT%H%M%S')}"
            plate = make_plate(work / "plate", settings)
            illum, analysis = plate.outputs(root)
            say(f"[3/5] the demo's Cell Painting plate ({len(settings.wells)} wells x {settings.sites} sites x "
                f"{len(plate.channels)} channels) -> cpb plate: illumination s3://{outputs['bucketName']}/{illum}/, "
                f"then the analysis array after it -> s3://{outputs['bucketName']}/{analysis}/")
            client.submit(settings.stack, plate, root)
            say(f"[4/5] cpb status --watch of both steps (at most {settings.wait_minutes:.0f} min)")
            verdict = client.wait(settings.stack, (illum, analysis), settings.wait_minutes * 60)
            if verdict != STATUS_OK:
                raise SmokeFailure("the jobs " + ("failed" if verdict == STATUS_FAILED else
                                                  f"did not finish within {settings.wait_minutes:.0f} min")
                                   + " (cpb status above)")
            problems = check_illumination(client.results(settings.stack, illum, work / "illum"), plate)
            if problems:
                raise SmokeFailure("; ".join(problems))
            image_csv = client.results(settings.stack, analysis, work / "results") / "Image.csv"
            problems = check_counts(image_csv, plate.truth, settings.tolerance)
            if problems:
                raise SmokeFailure("counts differ from the plate's truth: " + "; ".join(problems))
            say(f"      every well within {settings.tolerance:.0%} of the true nucleus count "
                f"({time.monotonic() - started:.0f} s so far)")
            outcome = 0
        except SmokeFailure as failure:
            say(f"cloud-smoke FAILED: {failure}")
            outcome = 1
        except Interrupted as interrupt:
            say(f"cloud-smoke: interrupted ({interrupt})")
            outcome = 130
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the stack must still go
            say(f"cloud-smoke FAILED: unexpected {type(error).__name__}: {error}")
            outcome = 1
        finally:
            if created:
                outcome = _clean_up(settings.stack, pulumi, signals, say, outcome)
    if outcome == 0:
        say("cloud-smoke succeeded: deployed, ran the demo plate through the chain (illumination -> analysis), "
            "counts right, destroyed")
    return outcome


def _clean_up(stack: str, pulumi: Pulumi, signals: dict, say: Callable[[str], None], outcome: int) -> int:
    """Destroy and remove the stack, with interrupts ignored (an interrupt landing before they are
    switched off only restarts the clean-up)."""
    while True:
        try:
            signals["protected"] = True
            say(f"[5/5] pulumi destroy + stack rm {stack} (interrupts are ignored until it is gone)")
            try:
                pulumi.destroy(stack)
                pulumi.remove(stack)
            except Exception as failure:  # noqa: BLE001 - say it, loudly, and fail the run
                say(f"cloud-smoke: CLEANUP FAILED: {failure}")
                return outcome or 1
            say(f"      stack {stack} destroyed and removed")
            return outcome
        except Interrupted:
            continue


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make cloud-smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", required=True, help="a NEW stack name (created and destroyed)")
    parser.add_argument("--region", help="AWS region (default: Pulumi.dev.yaml's aws:region)")
    parser.add_argument("--yes", action="store_true", help="do not ask before creating billed resources")
    parser.add_argument("--wait-minutes", type=float, default=45.0, help="how long to wait for the jobs")
    args = parser.parse_args(argv)
    commands = Commands(say=lambda text: print(text, file=sys.stderr, flush=True))
    settings = SmokeSettings(stack=args.stack, region=args.region, yes=args.yes, wait_minutes=args.wait_minutes)
    return run_smoke(settings, PulumiCli(commands), CpbClient(), say=lambda text: print(text, flush=True))


if __name__ == "__main__":
    sys.exit(main())
