"""What `swapline batch` keeps in the output directory between runs: the batch its key made, and the progress
events seen so far.

Knowing the batch id, a re-run reads the batch (GetBatch) instead of submitting it again, so the targets are
not uploaded a second time; a gateway that no longer has it (another store, retention) gets a submission with
the same key. The events let the throughput chart cover every run of the batch, not only the last one.
The file is rewritten (temporary name, rename) at most every SAVE_INTERVAL_SECONDS while events arrive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from pathlib import Path

from services.cli.batch_report import ThroughputSample
from services.common.media_paths import write_file

RESUME_FILENAME = ".swapline-batch.json"
SAVE_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True)
class ResumeRecord:
    idempotency_key: str
    batch_id: str
    samples: tuple[ThroughputSample, ...]


def load_resume(output_dir: Path, key: str) -> ResumeRecord | None:
    """The record a run with the same key left; None when there is none, it is unreadable, or another key's."""
    path = output_dir / RESUME_FILENAME
    try:
        document = json.loads(path.read_text())
        if document["idempotency_key"] != key:
            return None
        samples = tuple(ThroughputSample(*row) for row in document["samples"])
        return ResumeRecord(key, str(document["batch_id"]), samples)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_resume(output_dir: Path, record: ResumeRecord) -> None:
    document = {
        "idempotency_key": record.idempotency_key,
        "batch_id": record.batch_id,
        "samples": [list(astuple(sample)) for sample in record.samples],
    }
    write_file(output_dir / RESUME_FILENAME, json.dumps(document))


@dataclass
class ResumeLog:
    """The record of the running batch, saved when its batch id is known and then every so often as events come."""

    output_dir: Path
    idempotency_key: str
    batch_id: str = ""
    samples: list[ThroughputSample] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    _saved_at: float | None = None

    def started(self, batch_id: str) -> None:
        self.batch_id = batch_id
        self.save()

    def add(self, sample: ThroughputSample) -> None:
        self.samples.append(sample)
        if self._saved_at is None or self.clock() - self._saved_at >= SAVE_INTERVAL_SECONDS:
            self.save()

    def save(self) -> None:
        if not self.batch_id:
            return
        save_resume(self.output_dir, ResumeRecord(self.idempotency_key, self.batch_id, tuple(self.samples)))
        self._saved_at = self.clock()
