from __future__ import annotations

import pytest

from services.common.settings_loader import SettingsError, load_settings
from services.gateway.settings import ENV_PREFIX, GatewaySettings
from services.gateway.tenant_chunk_limits import TenantChunkLimits

REQUIRED = {
    f"{ENV_PREFIX}MEDIA_ROOT": "/media",
    f"{ENV_PREFIX}DECODER_TARGET": "decoder:50051",
    f"{ENV_PREFIX}DETECTOR_TARGET": "detector:50051",
    f"{ENV_PREFIX}ENCODER_TARGET": "encoder:50051",
}


def test_retry_stall_and_input_limit_settings_reach_their_policies() -> None:
    settings = load_settings(
        GatewaySettings,
        ENV_PREFIX,
        {
            **REQUIRED,
            f"{ENV_PREFIX}RETRY_BUDGET_SECONDS": "90",
            f"{ENV_PREFIX}RETRY_INITIAL_BACKOFF_SECONDS": "0.5",
            f"{ENV_PREFIX}RETRY_MAX_BACKOFF_SECONDS": "10",
            f"{ENV_PREFIX}MAX_ATTEMPTS": "7",
            f"{ENV_PREFIX}STALL_DEADLINE_SECONDS": "0",
            f"{ENV_PREFIX}MAX_FRAMES": "1000",
            f"{ENV_PREFIX}MAX_URI_LENGTH": "200",
        },
    )
    retry = settings.retry_policy()
    assert (retry.budget_seconds, retry.initial_backoff_seconds, retry.max_backoff_seconds, retry.max_attempts) == (
        90.0,
        0.5,
        10.0,
        7,
    )
    assert settings.stall_deadline_seconds == 0.0
    limits = settings.input_limits()
    assert (limits.max_frames, limits.max_uri_length, limits.max_filename_length) == (1000, 200, 255)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RETRY_BUDGET_SECONDS", "-1"),
        ("RETRY_INITIAL_BACKOFF_SECONDS", "0"),
        ("STALL_DEADLINE_SECONDS", "-5"),
        ("MAX_ATTEMPTS", "0"),
        ("MAX_IMAGE_PIXELS", "0"),
        ("MAX_FILENAME_LENGTH", "300"),
        ("RETRY_MAX_BACKOFF_SECONDS", "0.5"),
        ("TENANT_MAX_LEASED_CHUNKS", "-1"),
    ],
)
def test_out_of_range_settings_are_refused_by_name(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{ENV_PREFIX}{name}"):
        load_settings(GatewaySettings, ENV_PREFIX, {**REQUIRED, f"{ENV_PREFIX}{name}": value})


def test_tenant_chunk_limits_reach_the_chunk_queues_limits() -> None:
    settings = load_settings(
        GatewaySettings,
        ENV_PREFIX,
        {
            **REQUIRED,
            f"{ENV_PREFIX}TENANT_MAX_LEASED_CHUNKS": "4",
            f"{ENV_PREFIX}TENANT_CHUNK_LIMITS": "acme:10, beta:0",
        },
    )
    assert settings.leased_chunk_limits() == TenantChunkLimits(4, {"acme": 10, "beta": 0})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("acme", "is not tenant:max_leased_chunks"),
        ("acme:1:2", "is not tenant:max_leased_chunks"),
        ("-acme:1", "does not start with a valid tenant name"),
        ("acme:many", "needs a whole number of chunks"),
        ("acme:-1", "needs a max_leased_chunks from 0"),
        ("acme:1,acme:2", "names a tenant a second time"),
    ],
)
def test_bad_tenant_chunk_limits_are_refused_by_entry(value: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=f"{ENV_PREFIX}TENANT_CHUNK_LIMITS entry .* {problem}"):
        load_settings(GatewaySettings, ENV_PREFIX, {**REQUIRED, f"{ENV_PREFIX}TENANT_CHUNK_LIMITS": value})
