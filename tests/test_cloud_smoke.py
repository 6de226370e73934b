"""`make cloud-smoke`: its orchestration with Pulumi and the cpb steps faked (no AWS account here).

In-process fakes prove the order of steps and that the stack is destroyed after every failure; a
real subprocess with a fake `pulumi` executable proves the signal handling: Ctrl-C (SIGINT) or SIGTERM
during `pulumi up` stops the up, then destroys, and an interrupt during the destroy is ignored. The
smoke's own cpb steps (`CpbClient`: cpb plate, cpb status --watch, cpb results, the checks) run once
for real against the local stack, with real CellProfiler, Pulumi still faked: the plate `make demo`
runs, through the chain."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools import cloud_smoke as smoke

REPO = Path(__file__).resolve().parent.parent
TRUTH = {("A01", 1): 5, ("A01", 2): 7, ("A02", 1): 6, ("A02", 2): 4}


class FakePulumi:
    def __init__(self, fail_at: str = "", existing: bool = False, on_up=None, on_destroy=None) -> None:
        self.calls: list[tuple] = []
        self.fail_at, self.existing, self.on_up, self.on_destroy = fail_at, existing, on_up, on_destroy

    def _call(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if self.fail_at == name:
            raise smoke.SmokeFailure(f"{name} broke")

    def check(self) -> None:
        self._call("check")

    def exists(self, stack: str) -> bool:
        self._call("exists", stack)
        return self.existing

    def create(self, stack: str, settings) -> None:
        self._call("create", stack, dict(settings))

    def up(self, stack: str) -> None:
        self._call("up", stack)
        if self.on_up:
            self.on_up()

    def outputs(self, stack: str) -> dict:
        self._call("outputs", stack)
        return {"bucketName": "b", "queueUrl": "q", "jobQueueArn": "jq", "jobDefinitionArn": "jd"}

    def destroy(self, stack: str) -> None:
        if self.on_destroy:
            self.on_destroy()
        self._call("destroy", stack)

    def remove(self, stack: str) -> None:
        self._call("remove", stack)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeClient:
    def __init__(self, verdict: int = 0, counts: dict | None = None, fail_submit: Exception | None = None,
                 illum: tuple = ("IllumAGP.npy", "IllumDNA.npy", "IllumMito.npy")) -> None:
        self.calls: list[tuple] = []
        self.verdict, self.counts, self.fail_submit, self.illum = verdict, counts or TRUTH, fail_submit, illum

    def check(self, region: str) -> str:
        self.calls.append(("check", region))
        return "123456789012"

    def submit(self, stack, plate, root) -> None:
        self.calls.append(("submit", stack, root))
        if self.fail_submit:
            raise self.fail_submit

    def wait(self, stack, outputs, timeout_seconds) -> int:
        self.calls.append(("wait", stack, tuple(outputs), timeout_seconds))
        return self.verdict

    def results(self, stack, output, dest: Path) -> Path:
        self.calls.append(("results", stack, output))
        dest.mkdir(parents=True, exist_ok=True)
        if output.endswith("/illum"):
            for name in self.illum:
                (dest / name).write_bytes(b"\x93NUMPY")
            return dest
        rows = ["Metadata_Well,Metadata_Site,Count_Nuclei"] + [f"{w},{s},{n}" for (w, s), n in self.counts.items()]
        (dest / "Image.csv").write_text("\n".join(rows) + "\n")
        return dest


ILLUM_FILES = ("IllumAGP.npy", "IllumDNA.npy", "IllumMito.npy")


def fake_plate(dest: Path, settings) -> smoke.Plate:
    return smoke.Plate(name="SMOKE1", images_dir=dest, truth=TRUTH, illum_pipeline=Path("illum.cppipe"),
                       analysis_pipeline=Path("analysis.cppipe"), channels={"DNA": 1, "AGP": 2, "Mito": 3},
                       illum_files=ILLUM_FILES)


def run(tmp_path: Path, pulumi: FakePulumi, client: FakeClient, **overrides) -> tuple[int, list[str]]:
    said: list[str] = []
    settings = smoke.SmokeSettings(**{"stack": "smoke-t", "yes": True, "work_dir": tmp_path, **overrides})
    code = smoke.run_smoke(settings, pulumi, client, say=said.append, make_plate=fake_plate)
    return code, said


def test_success_deploys_runs_checks_and_destroys_in_order(tmp_path: Path) -> None:
    pulumi, client = FakePulumi(), FakeClient()
    code, said = run(tmp_path, pulumi, client)
    assert code == 0
    assert pulumi.names() == ["check", "exists", "create", "up", "outputs", "destroy", "remove"]
    assert [c[0] for c in client.calls] == ["check", "submit", "wait", "results", "results"]
    settings = pulumi.calls[2][2]
    assert settings["aws:region"] == "eu-west-1"  # Pulumi.dev.yaml's
    assert settings["cellpainting-batch:forceDestroy"] == "true" and settings["cellpainting-batch:fsxEnabled"] == "false"
    root = client.calls[1][2]
    # both steps of the chain are waited for, and both are downloaded: the illumination first
    assert client.calls[2][2:] == ((f"{root}/SMOKE1/illum", f"{root}/SMOKE1/analysis"), 45 * 60)
    assert [c[2] for c in client.calls[3:]] == [f"{root}/SMOKE1/illum", f"{root}/SMOKE1/analysis"]
    assert said[-1].startswith("cloud-smoke succeeded")


def test_cost_and_duration_are_stated_before_anything_is_created(tmp_path: Path) -> None:
    pulumi = FakePulumi()
    code, said = run(tmp_path, pulumi, FakeClient(), region="us-east-1")
    expected = next(i for i, line in enumerate(said) if "cost      under US$1" in line)
    created = next(i for i, line in enumerate(said) if "pulumi stack init" in line)
    assert expected < created and "duration  about 35-55 minutes" in said[expected]
    assert "the illumination job over all 8 image sets, then the analysis array job after it" in " ".join(
        said[expected].split())
    assert "in us-east-1" in said[expected] and "account   123456789012" in said[expected]
    assert pulumi.calls[2][2]["aws:region"] == "us-east-1"


def test_declining_creates_nothing(tmp_path: Path) -> None:
    pulumi = FakePulumi()
    code, said = run(tmp_path, pulumi, FakeClient(), yes=False, confirm=lambda prompt: False)
    assert code == 1 and pulumi.names() == ["check", "exists"] and said[-1] == "cloud-smoke: nothing created"


@pytest.mark.fault
@pytest.mark.parametrize("fail_at", ["create", "up", "outputs"])
def test_a_failing_pulumi_step_still_destroys(tmp_path: Path, fail_at: str) -> None:
    pulumi = FakePulumi(fail_at=fail_at)
    code, said = run(tmp_path, pulumi, FakeClient())
    assert code == 1
    assert pulumi.names()[-2:] == ["destroy", "remove"]
    assert any(f"cloud-smoke FAILED: {fail_at} broke" in line for line in said)


@pytest.mark.fault
@pytest.mark.parametrize("client,words", [
    (FakeClient(verdict=1), "the jobs failed"),
    (FakeClient(verdict=3), "did not finish within 45 min"),
    (FakeClient(counts={**TRUTH, ("A02", 2): 9}), "well A02: counted 15, true 10"),
    (FakeClient(illum=("IllumDNA.npy",)), "the illumination step saved no IllumAGP.npy"),
    (FakeClient(fail_submit=RuntimeError("network down")), "unexpected RuntimeError: network down"),
])
def test_a_failing_plate_still_destroys(tmp_path: Path, client: FakeClient, words: str) -> None:
    pulumi = FakePulumi()
    code, said = run(tmp_path, pulumi, client)
    assert code == 1 and pulumi.names()[-2:] == ["destroy", "remove"]
    assert any(words in line for line in said), said


@pytest.mark.fault
def test_a_failed_destroy_is_loud_and_fails_the_run(tmp_path: Path) -> None:
    pulumi = FakePulumi(fail_at="destroy")
    code, said = run(tmp_path, pulumi, FakeClient())
    assert code == 1 and "remove" not in pulumi.names()  # never forget resources that may still exist
    assert any("CLEANUP FAILED: destroy broke" in line for line in said)


def test_an_existing_stack_is_never_touched(tmp_path: Path) -> None:
    pulumi = FakePulumi(existing=True)
    code, said = run(tmp_path, pulumi, FakeClient())
    assert code == 1 and pulumi.names() == ["check", "exists"]
    assert any("already exists" in line for line in said)



def test_a_stack_with_settings_here_is_refused_before_any_call(tmp_path: Path) -> None:
    pulumi, said = FakePulumi(), []
    code = smoke.run_smoke(smoke.SmokeSettings(stack="dev", yes=True), pulumi, FakeClient(), say=said.append,
                           make_plate=fake_plate)
    assert code == 1 and pulumi.calls == [] and "Pulumi.dev.yaml" in said[0] and "choose a new name" in said[0]


@pytest.mark.fault
def test_ctrl_c_during_up_destroys_and_exits_130(tmp_path: Path) -> None:
    def ctrl_c() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("the interrupt did not arrive")

    pulumi = FakePulumi(on_up=ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler from a terminal; SIG_IGN under nohup/&
    code, said = run(tmp_path, pulumi, FakeClient())
    assert code == 130
    assert pulumi.names() == ["check", "exists", "create", "up", "destroy", "remove"]
    assert any("interrupted (SIGINT)" in line for line in said)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.fault
def test_interrupts_during_destroy_are_ignored(tmp_path: Path) -> None:
    pulumi = FakePulumi(on_destroy=lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, said = run(tmp_path, pulumi, FakeClient())
    assert code == 0 and pulumi.names()[-2:] == ["destroy", "remove"]
    assert any("SIGTERM ignored: destroying the stack" in line for line in said)


# ------------------------------------------------------------ a real process, a fake pulumi executable

FAKE_PULUMI = r"""#!/bin/bash
echo "$*" >> "$FAKE_PULUMI_LOG"
case "$1" in
  whoami) echo me ;;
  stack)
    case "$2" in
      ls) echo '[]' ;;
      output) echo '{"bucketName": "b", "queueUrl": "q", "jobQueueArn": "jq", "jobDefinitionArn": "jd"}' ;;
    esac ;;
  up)
    if [ "$FAKE_UP" = fail ]; then echo "error: up failed" >&2; exit 255; fi
    trap 'echo "up got SIGINT" >> "$FAKE_PULUMI_LOG"; sleep 1; exit 255' INT
    echo "up started" >> "$FAKE_PULUMI_LOG"
    for i in $(seq 1 300); do sleep 0.1; done
    echo "up finished" >> "$FAKE_PULUMI_LOG" ;;
  destroy)
    echo "destroy started" >> "$FAKE_PULUMI_LOG"
    for i in $(seq 1 ${FAKE_DESTROY_TENTHS:-1}); do sleep 0.1; done
    echo "destroy done" >> "$FAKE_PULUMI_LOG" ;;
esac
exit 0
"""

DRIVER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from pathlib import Path
from tools import cloud_smoke as smoke
from test_cloud_smoke import FakeClient, fake_plate
commands = smoke.Commands(say=print, grace_seconds=20)
settings = smoke.SmokeSettings(stack="smoke-sub", yes=True, work_dir=Path({work!r}))
code = smoke.run_smoke(settings, smoke.PulumiCli(commands, exe={exe!r}), FakeClient(),
                       say=lambda s: print(s, flush=True), make_plate=fake_plate)
sys.exit(code)
"""


def start_driver(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    exe = tmp_path / "pulumi"
    exe.write_text(FAKE_PULUMI)
    exe.chmod(0o755)
    log = tmp_path / "pulumi.log"
    log.touch()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), tests=str(REPO / "tests"), work=str(tmp_path), exe=str(exe)))
    proc = subprocess.Popen([sys.executable, str(driver)], env={**os.environ, "FAKE_PULUMI_LOG": str(log), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, log


def wait_for(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log.read_text()!r}"
        time.sleep(0.05)


@pytest.mark.fault
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_pulumi_up_stops_it_then_destroys(tmp_path: Path, signum: int) -> None:
    proc, log = start_driver(tmp_path)
    wait_for(log, "up started")
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=60)
    lines = log.read_text().splitlines()
    assert proc.returncode == 130, output
    assert "up got SIGINT" in lines and "up finished" not in lines  # told to stop, as Ctrl-C would
    destroy = next(i for i, line in enumerate(lines) if line.startswith("destroy --stack smoke-sub"))
    assert lines.index("up got SIGINT") < destroy
    assert "--yes" in lines[destroy] and "--continue-on-error" in lines[destroy]
    assert lines[-1] == "stack rm smoke-sub --yes --non-interactive"
    assert "submit" not in output


@pytest.mark.fault
def test_ctrl_c_during_destroy_does_not_stop_it(tmp_path: Path) -> None:
    proc, log = start_driver(tmp_path, FAKE_UP="fail", FAKE_DESTROY_TENTHS="30")
    wait_for(log, "destroy started")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    lines = log.read_text().splitlines()
    assert proc.returncode == 1, output  # the up failed; the cleanup finished regardless
    assert "destroy done" in lines and lines[-1] == "stack rm smoke-sub --yes --non-interactive"
    assert output.count("SIGINT ignored: destroying the stack") == 2


def test_the_make_target_needs_a_stack_name() -> None:
    done = subprocess.run(["make", "-s", "cloud-smoke"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAKEFLAGS": ""})
    assert done.returncode != 0 and "usage: make cloud-smoke STACK=<new stack name>" in done.stderr
    dry = subprocess.run(["make", "-n", "cloud-smoke", "STACK=smoke-x", "YES=1"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert "-m tools.cloud_smoke --stack \"smoke-x\"" in dry.stdout and "--yes" in dry.stdout


# ------------------------------------------------------------ the smoke's cpb steps, for real, on the local stack

@pytest.mark.cellprofiler
def test_the_smokes_cpb_steps_run_the_demo_plate_through_the_chain_on_the_local_stack(cellprofiler_env, tmp_path,
                                                                                      monkeypatch) -> None:
    """What `make cloud-smoke` does between `pulumi up` and `pulumi destroy`, with its real CpbClient and
    plate: `cpb plate` (illumination, then the analysis array after it), `cpb status --watch` of both,
    `cpb results` of both, the illumination and count checks; against `cpb local up`'s stack (real
    Lambda handlers, real worker, CellProfiler 4.2.8.1) instead of AWS."""
    from cpb.local.emulator import environment
    from cpb.local.settings import LocalSettings
    from cpb.local.up import LocalCloud

    for key in ("CPB_CELLPROFILER", "CPB_CELLPROFILER_ARGS"):
        monkeypatch.setenv(key, cellprofiler_env[key])

    class LocalClient(smoke.CpbClient):
        def check(self, region: str) -> str:  # Docker and STS: what pulumi up needs, not the local stack
            return "000000000000"

    with environment({"CPB_HOME": str(tmp_path / "home")}), \
            LocalCloud(LocalSettings(stack="smoke"), log_dir=tmp_path / "logs", cores=2) as cloud:

        class LocalPulumi(FakePulumi):
            def outputs(self, stack: str) -> dict:
                self._call("outputs", stack)
                return cloud.outputs()

        pulumi, said = LocalPulumi(), []
        settings = smoke.SmokeSettings(stack="local", yes=True, work_dir=tmp_path, sites=2, wait_minutes=10)
        code = smoke.run_smoke(settings, pulumi, LocalClient(poll_seconds=1), say=said.append)
        tasks = sorted((o.item.name.rsplit("-", 1)[0], o.item.index, o.status) for o in cloud.batch.outcomes)
        illum_job, analysis_job = (min(o.item.job_id for o in cloud.batch.outcomes if o.item.name.startswith(n))
                                   for n in ("SMOKE1-illum", "SMOKE1-analysis"))
        import boto3
        depends = boto3.client("batch").describe_jobs(jobs=[analysis_job])["jobs"][0]["dependsOn"]
    assert code == 0, "\n".join(said)
    assert said[-1].startswith("cloud-smoke succeeded: deployed, ran the demo plate through the chain")
    assert pulumi.names()[-2:] == ["destroy", "remove"]
    assert tasks == [("SMOKE1-analysis", 0, "SUCCEEDED"), ("SMOKE1-analysis", 1, "SUCCEEDED"),
                     ("SMOKE1-illum", None, "SUCCEEDED")]
    assert [d["jobId"] for d in depends] == [illum_job]  # the analysis ran after the illumination, as Batch was told
