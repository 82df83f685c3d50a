from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import commands, embedded_stack
from services.cli.embedded_stack import StackOptions
from services.cli.stack_credentials import StackCredentials, generate_credentials
from tests.cli.test_stack_gpu_instances import RecordingSupervisor, simulate_machine


@dataclass
class StartedStack:
    gateway_address: str
    credentials: StackCredentials | None

    def client_env(self, tenant: str = "") -> dict[str, str]:
        env = {"SWAPLINE_GATEWAY": self.gateway_address}
        if self.credentials is not None:
            env["SWAPLINE_CA_FILE"] = str(self.credentials.ca_file)
            env["SWAPLINE_TOKEN"] = self.credentials.token(tenant or self.credentials.first_tenant)
        return env


def test_an_open_stack_says_it_is_open(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands.announce(StartedStack("127.0.0.1:50051", None), StackOptions(tmp_path, tmp_path / "media"))
    out, err = capsys.readouterr()
    assert "OPEN" in err and "no TLS" in err and "no tokens" in err and "'local'" in err
    assert "swapline up --secure" in err
    assert out.splitlines()[-1] == "export SWAPLINE_GATEWAY=127.0.0.1:50051"


def test_a_secure_stack_says_how_to_connect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    credentials = generate_credentials(tmp_path, ["alice", "bob"])
    options = StackOptions(tmp_path, tmp_path / "media", secure=True)
    commands.announce(StartedStack("127.0.0.1:50051", credentials), options)
    out, err = capsys.readouterr()
    assert "OPEN" not in err
    assert str(credentials.tenant_tokens_file) in out
    assert out.splitlines()[-1] == (
        f"export SWAPLINE_GATEWAY=127.0.0.1:50051 SWAPLINE_CA_FILE={credentials.ca_file}"
        f" SWAPLINE_TOKEN={credentials.token('alice')}  # as tenant 'alice'"
    )


def test_restarts_are_summed_up_by_service() -> None:
    assert commands.restarts_summary({"decoder": 2, "gateway": 0, "tritonserver": 1}) == "decoder 2, tritonserver 1"
    assert commands.restarts_summary({"decoder": 0}) == "none"


def test_the_demo_runs_with_every_option_run_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's job goes through `run` with run's own defaults (it once missed the model options and crashed)."""
    from services.cli import sample_media
    from services.cli.__main__ import build_parser, main

    seen: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(sample_media, "make_face_video", lambda path, photo: path.write_bytes(b"clip"))
    monkeypatch.setattr(commands, "run", run)
    assert main(["--gateway", "", "demo", "--workdir", str(tmp_path), "--workers", "3", "--secure"]) == 0
    (run_args,) = seen
    defaults = build_parser().parse_args(["run", "--source", "s", "--target", "t", "--output", "o"])
    assert set(vars(defaults)) <= set(vars(run_args))
    assert (run_args.workers, run_args.secure, run_args.swapper) == (3, True, defaults.swapper)
    assert run_args.target == str(tmp_path / "sample-astronaut-720p.mp4") and run_args.gateway == ""


def _parsed(command: list[str]) -> argparse.Namespace:
    from services.cli.__main__ import build_parser

    return build_parser().parse_args(["--gateway", "", *command])


def test_without_sizes_the_stack_options_leave_them_to_the_machine(tmp_path: Path) -> None:
    options = commands.stack_options(_parsed(["up"]), tmp_path)
    given = commands.stack_options(_parsed(["up", "--workers", "3", "--frame-service-replicas", "2"]), tmp_path)

    assert (options.workers, options.frame_service_replicas) == (None, None)
    assert (given.workers, given.frame_service_replicas) == (3, 2)


@pytest.mark.parametrize(
    ("flags", "gpus", "workers", "printed"),
    [
        ([], 2, 16, "16 worker(s) and 4 process(es) of each frame service over 2 GPU(s) (8 and 2 on each)"),
        ([], 0, 2, "2 worker(s) and 1 process(es) of each frame service, no GPU"),
        (
            ["--workers", "3", "--frame-service-replicas", "1"],
            2,
            3,
            "3 worker(s) and 1 process(es) of each frame service over 2 GPU(s) (1 to 2 and 0 to 1 on each)",
        ),
    ],
)
def test_run_prints_the_sizes_its_embedded_stack_chose(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    gpus: int,
    workers: int,
    printed: str,
) -> None:
    simulate_machine(monkeypatch, gpus, cores=32)
    supervisor = RecordingSupervisor()
    monkeypatch.setattr(embedded_stack, "ProcessSupervisor", lambda *_: supervisor)
    job = ["--source", "s.png", "--target", "t.mp4", "--output", "o.mp4", "--workdir", str(tmp_path)]

    with commands.client_for(_parsed(["run", *job, *flags])):
        pass

    assert f"embedded stack: {printed}" in capsys.readouterr().err.splitlines()
    assert len([name for name in supervisor.envs if name.startswith("worker-")]) == workers


def test_the_demo_passes_on_only_the_sizes_given(tmp_path: Path) -> None:
    source, target = tmp_path / "s.png", tmp_path / "t.mp4"
    unsized = commands.demo_run_arguments(_parsed(["demo"]), source, target, tmp_path)
    sized = commands.demo_run_arguments(_parsed(["demo", "--frame-service-replicas", "2"]), source, target, tmp_path)

    assert (unsized.workers, unsized.frame_service_replicas) == (None, None)
    assert (sized.workers, sized.frame_service_replicas) == (None, 2)
