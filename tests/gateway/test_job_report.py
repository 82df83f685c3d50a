from __future__ import annotations

import math
from dataclasses import replace

import pytest

from services.gateway.gpu_trend_source import TrendRow
from services.gateway.job_records import (
    ChunkRecord,
    ChunkStats,
    FaceCountChange,
    JobRecord,
    JoinOutcome,
)
from services.gateway.job_report import build_report, gpu_section, gpu_statistics, with_gpu_trend
from services.gateway.queue_servicer import stats_from_proto
from swapline.chunks.v1 import chunks_pb2
from tests.gateway.gateway_fakes import job_record, video_target

STARTED = 5000.0


def chunk(index: int, start: int, stats: ChunkStats | None, attempts: int = 1) -> ChunkRecord:
    frames = stats.frames if stats else 50
    return ChunkRecord(
        job_id="job1",
        index=index,
        state="DONE" if stats else "PENDING",
        start_frame=start,
        seek_pts=0,
        frame_count=frames,
        segment_uri=f"work/job1/chunk-{index:05d}.mp4",
        attempts=attempts,
        stats=stats,
    )


def stats(frames: int, begin: float, end: float, **overrides: object) -> ChunkStats:
    base = ChunkStats(
        frames=frames,
        faces=frames,
        frames_with_faces=frames,
        stage_seconds={"decode": 0.5, "detect": 1.0, "swap": 2.0, "paste": 0.25, "encode": 0.5},
        started_at_unix=STARTED + begin,
        finished_at_unix=STARTED + end,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def succeeded_job(wall_seconds: float) -> JobRecord:
    return replace(
        job_record("job1", created_at=STARTED - 1, target=video_target(100, 25.0, has_audio=True)),
        state="SUCCEEDED",
        started_at=STARTED,
        finished_at=STARTED + wall_seconds,
        join=JoinOutcome("outputs/job1/output.mp4", 100, True, 0.75),
    )


def test_stage_seconds_are_summed_and_rates_follow_from_frames() -> None:
    job = succeeded_job(wall_seconds=4.0)
    first = stats(40, 0.0, 3.0, stage_seconds={"detect": 1.0, "swap": 2.0})
    second = stats(60, 0.5, 3.5, stage_seconds={"detect": 1.5, "swap": 3.0, "encode": 0.5})
    report = build_report(job, [chunk(0, 0, first), chunk(1, 40, second)])
    assert report["frames"] == 100
    assert report["stages"]["detect"] == {"seconds": 2.5, "ms_per_frame": 25.0, "fps": 40.0}
    assert report["stages"]["swap"] == {"seconds": 5.0, "ms_per_frame": 50.0, "fps": 20.0}
    assert report["stages"]["decode"] == {"seconds": 0.0, "ms_per_frame": 0.0, "fps": 0.0}
    assert report["stages"]["join"] == {"seconds": 0.75}
    assert report["wall_seconds"] == pytest.approx(4.0)
    assert report["fps"] == pytest.approx(25.0)
    assert report["target"]["frames"] == 100 and report["target"]["has_audio"] is True
    assert report["output"] == {"uri": "outputs/job1/output.mp4", "frames": 100, "audio_copied": True}
    assert report["chunks"] == 2 and report["chunk_attempts"] == 2


def test_events_are_in_time_order_with_face_changes_inside_their_chunk() -> None:
    job = succeeded_job(wall_seconds=10.0)
    # Chunk 1 starts before chunk 0 and both overlap; frame 60 is halfway through chunk 1 (frames 50..99).
    late = stats(50, 2.0, 6.0, face_count_changes=(FaceCountChange(0, 1), FaceCountChange(30, 2)))
    early = stats(50, 1.0, 5.0, face_count_changes=(FaceCountChange(75, 0),))
    report = build_report(job, [chunk(0, 0, late), chunk(1, 50, early)])
    events = report["events"]
    times = [event["t"] for event in events]
    assert times == sorted(times)
    assert [(event["kind"], event["chunk"]) for event in events] == [
        ("chunk_start", 1),
        ("chunk_start", 0),
        ("faces_changed", 0),
        ("faces_changed", 1),
        ("faces_changed", 0),
        ("chunk_end", 1),
        ("chunk_end", 0),
    ]
    halfway = next(event for event in events if event["kind"] == "faces_changed" and event["chunk"] == 1)
    assert halfway["t"] == pytest.approx(3.0) and halfway["frame"] == 75 and halfway["faces"] == 0
    end_of_first = next(event for event in events if event["kind"] == "chunk_end" and event["chunk"] == 0)
    assert end_of_first["frame"] == 50 and end_of_first["t"] == pytest.approx(6.0)


def test_a_chunk_that_starts_with_the_count_already_in_force_adds_no_face_change() -> None:
    job = succeeded_job(wall_seconds=4.0)
    first = stats(50, 0.0, 2.0, face_count_changes=(FaceCountChange(0, 1), FaceCountChange(20, 2)))
    same = stats(50, 2.0, 4.0, face_count_changes=(FaceCountChange(50, 2), FaceCountChange(70, 1)))
    report = build_report(job, [chunk(0, 0, first), chunk(1, 50, same)])
    changes = [(event["frame"], event["faces"]) for event in report["events"] if event["kind"] == "faces_changed"]
    assert changes == [(0, 1), (20, 2), (70, 1)]


def test_warnings_name_frames_without_faces_retries_and_chunk_warnings() -> None:
    job = succeeded_job(wall_seconds=2.0)
    partly = stats(50, 0.0, 1.0, faces=30, frames_with_faces=30, warnings=("detector skipped a blurred frame",))
    full = stats(50, 0.0, 1.0)
    report = build_report(job, [chunk(0, 0, partly, attempts=2), chunk(1, 50, full)])
    assert report["frames_with_faces"] == 80 and report["faces"] == 80
    assert "chunk 0: detector skipped a blurred frame" in report["warnings"]
    assert any("20 of 100 frames had no face" in warning for warning in report["warnings"])
    assert any("1 chunk attempts" in warning for warning in report["warnings"])


def test_fp32_fallbacks_are_summed_and_warned_about() -> None:
    job = succeeded_job(wall_seconds=2.0)
    report = build_report(job, [chunk(0, 0, stats(50, 0.0, 1.0, fp32_fallbacks=2)), chunk(1, 50, stats(50, 0.0, 1.0))])
    assert report["fp32_fallbacks"] == 2
    assert "2 swapper requests overflowed in FP16 (NaN or Inf) and were run again in FP32" in report["warnings"]
    assert build_report(job, [chunk(0, 0, stats(50, 0.0, 1.0))])["fp32_fallbacks"] == 0


def test_no_face_anywhere_and_missing_audio_are_warned_about() -> None:
    job = replace(succeeded_job(wall_seconds=2.0), join=JoinOutcome("out.mp4", 50, False, 0.1))
    none_found = stats(50, 0.0, 1.0, faces=0, frames_with_faces=0)
    report = build_report(job, [chunk(0, 0, none_found)])
    assert any("no face was found in any of the 50 frames" in warning for warning in report["warnings"])
    assert any("audio" in warning for warning in report["warnings"])


def test_clean_job_has_no_warnings() -> None:
    job = succeeded_job(wall_seconds=2.0)
    report = build_report(job, [chunk(0, 0, stats(50, 0, 1)), chunk(1, 50, stats(50, 0, 1))])
    assert report["warnings"] == []


def gpu_row(second: int, gpu: int, utilization: float, memory_used: float, **overrides: object) -> TrendRow:
    base = TrendRow(
        timestamp=STARTED + second,
        node="n1",
        gpu_index=gpu,
        gpu_uuid=f"GPU-{gpu}",
        gpu_model="NVIDIA A10G",
        utilization_percent=utilization,
        memory_used_bytes=memory_used,
        memory_total_bytes=24e9,
        temperature_celsius=40.0 + second,
        power_watts=100.0 + 10 * second,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_gpu_statistics_per_gpu_mean_peak_and_p95() -> None:
    # GPU 0: utilisation 1..20 %, memory 1..20 GB; GPU 1: flat 50 % with one unknown reading.
    rows = [gpu_row(s, 0, float(s), s * 1e9) for s in range(1, 21)]
    rows += [gpu_row(s, 1, 50.0, 2e9) for s in range(1, 4)]
    rows.append(gpu_row(4, 1, math.nan, math.nan, temperature_celsius=math.nan))
    first, second = gpu_statistics(rows)
    assert (first["index"], first["uuid"], first["model"]) == (0, "GPU-0", "NVIDIA A10G")
    assert first["samples"] == 20
    assert first["utilization_mean_percent"] == pytest.approx(10.5)
    assert first["utilization_peak_percent"] == 20.0
    # Linear interpolation between ranks: 0.95 * (20 - 1) = 18.05 -> 19 + 0.05 * (20 - 19).
    assert first["utilization_p95_percent"] == pytest.approx(19.05)
    assert first["memory_used_peak_bytes"] == 20_000_000_000
    assert first["memory_used_p95_bytes"] == 19_050_000_000
    assert first["memory_total_bytes"] == 24_000_000_000
    assert first["temperature_peak_celsius"] == 60.0
    assert first["power_mean_watts"] == pytest.approx(100.0 + 10 * 10.5)
    assert second["samples"] == 4
    assert (second["utilization_mean_percent"], second["utilization_p95_percent"]) == (50.0, 50.0)
    assert second["temperature_peak_celsius"] == 43.0 and second["memory_used_peak_bytes"] == 2_000_000_000


def test_gpu_statistics_give_nvdec_and_nvenc_beside_the_gpu_s_utilisation() -> None:
    # GPU 0 decodes on NVDEC at 10..40 % and encodes on NVENC at 50 %; GPU 1, like an H100, has no NVENC.
    rows = [
        gpu_row(s, 0, 70.0, 1e9, decoder_utilization_percent=10.0 * s, encoder_utilization_percent=50.0)
        for s in range(1, 5)
    ]
    rows += [gpu_row(s, 1, 20.0, 1e9, decoder_utilization_percent=5.0) for s in range(1, 3)]
    first, second = gpu_statistics(rows)
    assert (first["decoder_utilization_mean_percent"], first["decoder_utilization_peak_percent"]) == (25.0, 40.0)
    assert (first["encoder_utilization_mean_percent"], first["encoder_utilization_peak_percent"]) == (50.0, 50.0)
    assert (second["decoder_utilization_mean_percent"], second["decoder_utilization_peak_percent"]) == (5.0, 5.0)
    assert second["encoder_utilization_mean_percent"] is None and second["encoder_utilization_peak_percent"] is None
    assert first["utilization_mean_percent"] == 70.0


def test_gpu_statistics_of_a_gpu_without_readings_are_null() -> None:
    (only,) = gpu_statistics([gpu_row(1, 0, math.nan, math.nan, power_watts=math.nan)])
    assert only["utilization_mean_percent"] is None and only["memory_used_p95_bytes"] is None
    assert only["power_mean_watts"] is None and only["samples"] == 1


def test_gpu_trend_joins_the_report_and_adds_its_warnings() -> None:
    job = succeeded_job(wall_seconds=2.0)
    report = build_report(job, [chunk(0, 0, stats(50, 0, 1, faces=0, frames_with_faces=0))])
    window = (STARTED - 1, STARTED + 3)
    section = gpu_section([gpu_row(1, 0, 30.0, 1e9)], "trend_log", window, {"png": "x.png"})
    merged = with_gpu_trend(report, section, ["no GPU samples in the job's window: ran in CPU mode"])
    assert merged["gpu"]["samples"] == 1 and merged["gpu"]["charts"] == {"png": "x.png"}
    assert merged["gpu"]["window"] == {"start_unix": STARTED - 1, "end_unix": STARTED + 3}
    assert merged["warnings"] == [*report["warnings"], "no GPU samples in the job's window: ran in CPU mode"]
    assert "gpu" not in report and merged["frames"] == report["frames"]


def test_a_workers_fp32_fallbacks_reach_the_gateways_chunk_stats() -> None:
    assert stats_from_proto(chunks_pb2.ChunkStats(frames=5, fp32_fallbacks=4)).fp32_fallbacks == 4
