from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import commands
from services.cli.embedded_stack import StackOptions
from services.cli.stack_credentials import StackCredentials, generate_credentials


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
