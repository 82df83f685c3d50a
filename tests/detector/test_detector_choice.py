from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.detector.detector_choice import CascadeMode, ChosenDetector
from services.detector.face_detector import CASCADE_MODEL, PNET_MODEL, CascadeFaceDetector, FaceDetector

FRAMES = np.zeros((1, 64, 64, 3), np.uint8)


class Triton:
    """Readiness answers that a test changes as Triton comes up, and the models requests reached."""

    def __init__(self, ready: Sequence[str] = ()) -> None:
        self.ready = set(ready)
        self.probed: list[str] = []
        self.inferred: list[str] = []

    async def is_model_ready(self, model: str) -> bool:
        self.probed.append(model)
        return model in self.ready

    async def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.inferred.append(model)
        raise Unavailable(f"triton model {model}: connection refused")


def chosen(mode: CascadeMode, triton: Triton) -> ChosenDetector:
    return ChosenDetector(triton, triton, mode)


def detect_reaching(detector: ChosenDetector, triton: Triton) -> str:
    """The model the detector's request reached (every request fails: the fake Triton serves nothing)."""
    triton.inferred.clear()
    with pytest.raises(Unavailable):
        asyncio.run(detector.detect(FRAMES))
    return triton.inferred[0]


def test_off_detects_per_stage_without_asking_triton() -> None:
    triton = Triton(ready=[CASCADE_MODEL, PNET_MODEL])
    detector = chosen("off", triton)
    assert isinstance(asyncio.run(detector.choose()), FaceDetector)
    assert detect_reaching(detector, triton) == PNET_MODEL
    assert triton.probed == []


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_ready_cascade_is_chosen_once_and_kept(mode: CascadeMode) -> None:
    triton = Triton(ready=[CASCADE_MODEL, PNET_MODEL])
    detector = chosen(mode, triton)
    assert isinstance(asyncio.run(detector.choose()), CascadeFaceDetector)
    assert detect_reaching(detector, triton) == CASCADE_MODEL
    triton.ready.clear()
    assert detect_reaching(detector, triton) == CASCADE_MODEL
    assert triton.probed == [CASCADE_MODEL]


def test_auto_detects_per_stage_where_triton_serves_no_cascade() -> None:
    triton = Triton(ready=[PNET_MODEL])
    detector = chosen("auto", triton)
    assert isinstance(asyncio.run(detector.choose()), FaceDetector)
    triton.ready.add(CASCADE_MODEL)
    assert detect_reaching(detector, triton) == PNET_MODEL
    assert triton.probed == [CASCADE_MODEL, PNET_MODEL]


def test_auto_asks_again_until_triton_answers() -> None:
    triton = Triton()
    detector = chosen("auto", triton)
    assert asyncio.run(detector.choose()) is None
    assert detect_reaching(detector, triton) == PNET_MODEL
    triton.ready.update([CASCADE_MODEL, PNET_MODEL])
    assert detect_reaching(detector, triton) == CASCADE_MODEL
    assert isinstance(detector.chosen, CascadeFaceDetector)


def test_on_fails_requests_as_unavailable_until_the_cascade_is_ready() -> None:
    triton = Triton()
    detector = chosen("on", triton)
    assert asyncio.run(detector.choose()) is None
    with pytest.raises(Unavailable, match=f"model {CASCADE_MODEL} is not ready"):
        asyncio.run(detector.detect(FRAMES))
    triton.ready.add(PNET_MODEL)
    with pytest.raises(FailedPrecondition, match=f"model {CASCADE_MODEL} is not served by Triton"):
        asyncio.run(detector.detect(FRAMES))
    assert triton.inferred == []
    triton.ready.add(CASCADE_MODEL)
    assert detect_reaching(detector, triton) == CASCADE_MODEL


def test_asking_triton_while_it_starts_leaves_the_detectors_own_channel_untried() -> None:
    # Asked on the detector's channel, the refused questions left it backing off past Triton's start, and
    # the first job after `swapline up` failed as Unavailable.
    import grpc

    from services.common.triton_client import TritonClient
    from services.detector.__main__ import chosen_detector
    from services.detector.settings import DetectorSettings
    from services.triton.server_process import free_ports

    async def scenario() -> tuple[bool, grpc.ChannelConnectivity]:
        (port,) = free_ports(1)
        settings = DetectorSettings(triton_url=f"127.0.0.1:{port}", triton_timeout_seconds=5.0)
        client = TritonClient(settings.triton_url, settings.triton_timeout_seconds)
        try:
            decided = await chosen_detector(settings, client).choose() is not None
            return decided, client._client._channel.get_state()
        finally:
            await client.close()

    decided, state = asyncio.run(scenario())
    assert not decided
    assert state == grpc.ChannelConnectivity.IDLE
