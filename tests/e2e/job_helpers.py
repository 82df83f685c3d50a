"""Submit-and-wait for the end-to-end tests; bounded by the watch stream ending, never by sleeps."""

from __future__ import annotations

from pathlib import Path

from services.cli.job_client import TERMINAL_STATES, JobClient
from services.common.job_vocabulary import SelectorMode
from swapline.jobs.v1 import jobs_pb2


def wait_for_end(client: JobClient, job_id: str) -> jobs_pb2.Job:
    for event in client.watch(job_id):
        if event.state in TERMINAL_STATES:
            break
    return client.get(job_id)


def run_to_end(
    client: JobClient,
    source: bytes,
    target: Path,
    selector: SelectorMode = "one",
    reference: bytes = b"",
    swapper: str = "",
) -> jobs_pb2.Job:
    job = client.submit(source, target_path=target, selector=selector, reference_image=reference, swapper=swapper)
    return wait_for_end(client, job.id)
