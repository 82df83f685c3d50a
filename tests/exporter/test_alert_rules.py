"""The rules file passes `promtool check rules`; every alert fires and stays quiet in its unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES_FILE = REPO_ROOT / "deploy" / "monitoring" / "swapline-alerts.yaml"
RULE_TESTS_DIR = Path(__file__).resolve().parent / "rules"
PROMTOOL_SECONDS = 120


def _promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None, "no promtool on PATH: install Debian's prometheus package (`make install`)"
    return subprocess.run(
        [promtool, *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=PROMTOOL_SECONDS
    )


def _rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yaml"))


def _alert_names() -> set[str]:
    groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_promtool_check_rules_accepts_the_rules_file() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))

    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}\n{result.stderr}"


def test_promtool_unit_tests_pass() -> None:
    files = _rule_test_files()
    assert files, f"no promtool unit tests in {RULE_TESTS_DIR}"

    result = _promtool("test", "rules", *(str(path) for path in files))

    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.count("SUCCESS") == len(files), result.stdout


def test_every_alert_has_a_for_a_severity_and_annotations_naming_where() -> None:
    groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]

    for alert in alerts:
        name = alert["alert"]
        assert "for" in alert, f"{name} has no `for`"
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        annotations = alert["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        description = annotations["description"]
        assert "$labels.node" in description or "$labels.model" in description, name


def test_every_alert_both_fires_and_stays_quiet_in_the_unit_tests() -> None:
    """An alert with no firing case, or no quiet case, is untested in one direction."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in _rule_test_files():
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])

    alerts = _alert_names()
    assert alerts, f"no alerts in {RULES_FILE}"
    assert alerts - fires == set(), f"never expected to fire: {sorted(alerts - fires)}"
    assert alerts - quiet == set(), f"never expected to stay quiet: {sorted(alerts - quiet)}"
