"""The GPU recommendation a succeeded job's report carries, asked of the advisor service.

The gateway sends the finished report (RecommendForReport) rather than a profile it built itself,
so reading reports into profiles stays the advisor's business. The advisor is optional: without
one the report has no recommendation, and an advisor that fails only adds a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
from google.protobuf.json_format import MessageToDict

from services.common.grpc_channel import ChannelSecurity, open_channel
from swapline.advisor.v1 import advisor_pb2, advisor_pb2_grpc

log = logging.getLogger(__name__)

Recommendation = tuple[dict[str, Any] | None, list[str]]


class JobAdvisor(Protocol):
    async def recommend(self, report: Mapping[str, Any]) -> Recommendation:
        """(the report's `recommendation` section or None, warnings to add)."""
        ...


class NoAdvisor:
    async def recommend(self, report: Mapping[str, Any]) -> Recommendation:
        return None, []


class GrpcAdvisor:
    def __init__(self, target: str, timeout_seconds: float, security: ChannelSecurity) -> None:
        self._stub = advisor_pb2_grpc.AdvisorServiceStub(open_channel(target, security))
        self._timeout_seconds = timeout_seconds

    async def recommend(self, report: Mapping[str, Any]) -> Recommendation:
        request = advisor_pb2.RecommendForReportRequest(report_json=json.dumps(report))
        try:
            answer = await self._stub.RecommendForReport(request, timeout=self._timeout_seconds)
        except grpc.aio.AioRpcError as error:
            log.warning("the advisor did not recommend a GPU for job %s: %s", report.get("job_id"), error.details())
            return None, [f"no GPU recommendation: the advisor answered {error.code().name}: {error.details()}"]
        return recommendation_section(answer), []


def recommendation_section(answer: advisor_pb2.Recommendation) -> dict[str, Any]:
    """The advisor's answer as report JSON, without the profile it echoes (the report holds the facts)."""
    section = MessageToDict(answer, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    section.pop("profile", None)
    return section
