from services.bench.gpu_samplers import (
    CpuReading,
    GpuSample,
    cores_busy,
    parse_proc_stat,
    summarise_gpus,
    summarise_window,
)


def sample(at: float, utilisation: float, memory: int = 0, decoder: float | None = None) -> GpuSample:
    return GpuSample(at, 0, utilisation, memory, decoder, None)


def test_proc_stat_counts_idle_and_iowait_as_not_busy() -> None:
    reading = parse_proc_stat("cpu  100 5 20 300 50 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert reading == CpuReading(busy_ticks=131, total_ticks=481)


def test_cores_busy_scales_the_busy_share_by_the_cores() -> None:
    assert cores_busy(CpuReading(0, 0), CpuReading(300, 400), cores=16) == 12.0
    assert cores_busy(CpuReading(5, 10), CpuReading(5, 10), cores=4) == 0.0


def test_window_summary_keeps_only_samples_inside_it() -> None:
    samples = [sample(0.5, 99.0, 9), sample(1.0, 10.0, 100, 20.0), sample(2.0, 30.0, 300, None), sample(3.5, 80.0)]
    window = summarise_window(samples, 1.0, 3.0)
    assert window is not None
    assert (window.samples, window.utilisation_mean, window.utilisation_max) == (2, 20.0, 30.0)
    assert window.memory_used_max_bytes == 300
    assert (window.decoder_utilisation_mean, window.decoder_utilisation_max) == (20.0, 20.0)
    assert window.encoder_utilisation_mean is None


def test_window_without_samples_is_none() -> None:
    assert summarise_window([sample(5.0, 1.0)], 0.0, 1.0) is None


def test_process_roles_name_the_service_or_the_program() -> None:
    from services.bench.gpu_samplers import process_role

    assert process_role([b"/usr/bin/python3", b"-m", b"services.worker", b""]) == "worker"
    assert process_role([b"/opt/pytriton/tritonserver/bin/tritonserver", b"--model-repository=x"]) == "tritonserver"
    assert process_role([]) == "?"


def test_cpu_per_frame_counts_only_what_grew() -> None:
    from services.bench.gpu_samplers import cpu_ms_per_frame

    figures = cpu_ms_per_frame({"encoder": 1.0, "gateway": 2.0}, {"encoder": 3.0, "gateway": 2.0, "worker": 0.5}, 100)
    assert figures == {"encoder": 20.0, "worker": 5.0}


def test_each_gpu_is_summarised_apart_within_the_window() -> None:
    samples = [
        GpuSample(1.0, 0, 80.0, 100, None, None),
        GpuSample(1.0, 1, 20.0, 300, None, None),
        GpuSample(2.0, 0, 60.0, 200, None, None),
        GpuSample(9.0, 1, 99.0, 900, None, None),
    ]
    windows = summarise_gpus(samples, 0.5, 2.5)
    assert sorted(windows) == [0, 1]
    assert (windows[0].samples, windows[0].utilisation_mean, windows[0].memory_used_max_bytes) == (2, 70.0, 200)
    assert (windows[1].samples, windows[1].utilisation_max, windows[1].memory_used_max_bytes) == (1, 20.0, 300)
    assert summarise_gpus(samples, 5.0, 6.0) == {}
