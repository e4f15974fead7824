"""The NVML collector, run over FakeNvml (the fake replaces the functions beneath pynvml, so the
collector's real code path runs and meets pynvml's real exception classes)."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator

import pynvml
import pytest

from gpgpu_agent.nvml import (
    DRIVER_NOT_LOADED,
    MIG_DECLINED,
    MIG_NO_INSTANCES,
    NO_DRIVER,
    NvmlCollector,
    NvmlUnavailable,
    cuda_version_text,
)
from gpgpu_agent.protocols import AgentError
from gpgpu_agent.types import NOT_SUPPORTED, GpuProcess
from gpgpu_agent_testing.fake_nvml import FakeNvml


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    with FakeNvml() as installed:
        yield installed


@pytest.fixture
def collector(fake: FakeNvml) -> Iterator[NvmlCollector]:
    # GPUs are added by each test before the first sample(); the count is read then.
    made = NvmlCollector()
    yield made
    made.close()


def test_collector_reads_every_field_from_the_driver(fake: FakeNvml, collector: NvmlCollector) -> None:
    gpu = fake.add_gpu(
        "NVIDIA GeForce RTX 4090",
        24564,
        utilization=37,
        temperature_c=61,
        power_w=212.5,
        power_limit_w=450,
        pcie_gen=4,
        pcie_width=16,
    )
    fake.set_utilization(gpu, 37, memory=22)
    fake.add_process(gpu, 1200, 2048, kind="compute")
    fake.add_process(gpu, 3400, None, kind="graphics")  # the driver will not say how much

    sample = collector.sample()

    assert sample.driver_version == "550.54.14"
    assert sample.cuda_version == "12.4"
    assert sample.errors == {}
    (read,) = sample.gpus
    assert read.index == 0
    assert read.uuid == fake.gpus[gpu].uuid and read.uuid.startswith("GPU-")
    assert read.model == "NVIDIA GeForce RTX 4090"
    assert read.vram_total_mb == 24564
    assert read.vram_used_mb == 300 + 2048  # the driver's own share plus the processes'
    assert read.utilization_pct == 37.0
    assert read.memory_utilization_pct == 22.0
    assert read.temperature_c == 61.0
    assert read.power_w == 212.5
    assert read.power_limit_w == 450.0
    assert (read.pcie_gen, read.pcie_width) == (4, 16)
    assert read.mig_enabled is False and read.mig_devices == () and read.declined_reason is None
    assert read.processes == (GpuProcess(pid=1200, used_memory_mb=2048), GpuProcess(pid=3400, used_memory_mb=None))
    assert read.errors == {}


@pytest.mark.parametrize(("version", "text"), [(12040, "12.4"), (11080, "11.8"), (12090, "12.9"), (13000, "13.0")])
def test_cuda_version_is_written_as_major_dot_minor(version: int, text: str) -> None:
    assert cuda_version_text(version) == text


def test_names_from_an_older_pynvml_returning_bytes_are_decoded() -> None:
    with FakeNvml(legacy_bytes=True) as fake:
        fake.add_gpu("NVIDIA L4", 23034)
        with NvmlCollector() as collector:
            sample = collector.sample()
    assert sample.driver_version == "550.54.14"
    assert sample.gpus[0].model == "NVIDIA L4"
    assert isinstance(sample.gpus[0].uuid, str) and sample.gpus[0].uuid.startswith("GPU-")


def test_one_failing_field_spoils_only_that_field(fake: FakeNvml, collector: NvmlCollector) -> None:
    first = fake.add_gpu(temperature_c=50)
    fake.add_gpu(temperature_c=52)
    fake.fail_field(first, "temperature", pynvml.NVML_ERROR_UNKNOWN)

    sample = collector.sample()

    broken, healthy = sample.gpus
    assert broken.temperature_c is None
    assert broken.errors == {"temperature": "Unknown Error"}
    assert broken.model is not None and broken.vram_total_mb == 24564 and broken.utilization_pct == 0.0
    assert broken.power_w == 20.0 and broken.pcie_gen == 4
    assert healthy.temperature_c == 52.0 and healthy.errors == {}

    fake.heal_field(first, "temperature")
    assert collector.sample().gpus[0].temperature_c == 50.0
    assert collector.sample().gpus[0].errors == {}


def test_a_failing_field_is_warned_about_once_not_every_poll(
    fake: FakeNvml, collector: NvmlCollector, caplog: pytest.LogCaptureFixture
) -> None:
    gpu = fake.add_gpu()
    fake.fail_field(gpu, "power", pynvml.NVMLError_Timeout)
    with caplog.at_level(logging.INFO, logger="gpgpu_agent.nvml"):
        for _ in range(5):
            assert collector.sample().gpus[0].errors == {"power": "Timeout"}
        fake.heal_field(gpu, "power")
        collector.sample()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "power" in warnings[0].getMessage() and "Timeout" in warnings[0].getMessage()
    assert any("power can be read again" in r.getMessage() for r in caplog.records)


def test_a_field_the_gpu_does_not_offer_is_recorded_quietly(
    fake: FakeNvml, collector: NvmlCollector, caplog: pytest.LogCaptureFixture
) -> None:
    gpu = fake.add_gpu("NVIDIA GeForce GTX 1080", 8192)
    fake.fail_field(gpu, "power", pynvml.NVMLError_NotSupported)
    with caplog.at_level(logging.DEBUG, logger="gpgpu_agent.nvml"):
        read = collector.sample().gpus[0]
    assert read.power_w is None
    assert read.errors == {"power": NOT_SUPPORTED}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_gpu_falling_off_the_bus_mid_run_leaves_the_others_intact(fake: FakeNvml, collector: NvmlCollector) -> None:
    for _ in range(3):
        fake.add_gpu(utilization=20)
    before = collector.sample()
    assert all(gpu.errors == {} for gpu in before.gpus)

    fake.fall_off_bus(1)
    during = collector.sample()

    lost = during.gpus[1]
    assert lost.index == 1
    assert lost.uuid == before.gpus[1].uuid  # still says which board it was
    assert lost.errors == {"gpu": "GPU is lost"}
    assert lost.model is None and lost.utilization_pct is None and lost.processes == ()
    for index in (0, 2):
        assert during.gpus[index] == before.gpus[index]


def test_a_lost_gpu_that_comes_back_is_looked_up_again(fake: FakeNvml, collector: NvmlCollector) -> None:
    for _ in range(2):
        fake.add_gpu()
    collector.sample()
    fake.fall_off_bus(0)
    collector.sample()
    collector.sample()  # still lost: each poll tries to look it up again
    fake.recover(0)
    fake.reset_calls()

    back = collector.sample().gpus[0]

    assert back.errors == {} and back.model == "NVIDIA GeForce RTX 4090"
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 1  # only the GPU that was lost


def test_a_gpu_lost_before_its_first_read_is_reported_by_index(fake: FakeNvml) -> None:
    fake.add_gpu()
    fake.add_gpu()
    fake.fall_off_bus(0)
    with NvmlCollector() as collector:
        sample = collector.sample()
    assert sample.gpus[0].index == 0 and sample.gpus[0].uuid == ""
    assert sample.gpus[0].errors == {"gpu": "GPU is lost"}
    assert sample.gpus[1].errors == {} and sample.gpus[1].uuid


def test_a_process_appearing_on_the_gpu_is_seen(fake: FakeNvml, collector: NvmlCollector) -> None:
    gpu = fake.add_gpu()
    assert collector.sample().gpus[0].processes == ()

    fake.add_process(gpu, 4242, 6000, kind="graphics")  # the owner starts a game

    read = collector.sample().gpus[0]
    assert read.processes == (GpuProcess(pid=4242, used_memory_mb=6000),)
    assert read.vram_used_mb == 300 + 6000

    fake.remove_process(gpu, 4242)
    assert collector.sample().gpus[0].processes == ()


def test_process_listing_failure_is_recorded_and_the_other_kind_still_listed(
    fake: FakeNvml, collector: NvmlCollector
) -> None:
    gpu = fake.add_gpu()
    fake.add_process(gpu, 10, 100, kind="compute")
    fake.add_process(gpu, 20, 100, kind="graphics")
    fake.fail_field(gpu, "compute_processes", pynvml.NVMLError_NoPermission)

    read = collector.sample().gpus[0]

    assert read.processes == (GpuProcess(pid=20, used_memory_mb=100),)
    assert read.errors == {"compute_processes": "Insufficient Permissions"}


def test_mig_enabled_gpu_is_declined_with_a_reason_by_default(fake: FakeNvml, collector: NvmlCollector) -> None:
    gpu = fake.add_gpu("NVIDIA A100-SXM4-80GB", 81920)
    fake.enable_mig(gpu, 2)

    read = collector.sample().gpus[0]

    assert read.mig_enabled is True
    assert read.declined_reason == MIG_DECLINED == "MIG is enabled; set offer_mig to rent its instances"
    assert read.mig_devices == ()


def test_mig_instances_are_offered_when_asked(fake: FakeNvml) -> None:
    gpu = fake.add_gpu("NVIDIA H100 80GB HBM3", 81559)
    uuids = fake.enable_mig(gpu, [40000, 20000, 10000])
    with NvmlCollector(offer_mig=True) as collector:
        read = collector.sample().gpus[0]

    assert read.mig_enabled is True and read.declined_reason is None
    assert [d.uuid for d in read.mig_devices] == uuids
    assert all(d.uuid.startswith("MIG-") for d in read.mig_devices)
    assert [d.memory_total_mb for d in read.mig_devices] == [40000, 20000, 10000]
    assert [d.gpu_instance_id for d in read.mig_devices] == [1, 2, 3]
    assert read.errors == {"utilization": NOT_SUPPORTED}  # as the driver: none for a split GPU


def test_mig_enabled_without_instances_is_declined_even_when_offering(fake: FakeNvml) -> None:
    gpu = fake.add_gpu("NVIDIA A100-SXM4-40GB", 40960)
    fake.enable_mig(gpu, 0)
    with NvmlCollector(offer_mig=True) as collector:
        read = collector.sample().gpus[0]
    assert read.declined_reason == MIG_NO_INSTANCES


def test_mig_mode_that_cannot_be_read_declines_the_gpu(fake: FakeNvml, collector: NvmlCollector) -> None:
    gpu = fake.add_gpu("NVIDIA A100-SXM4-80GB", 81920, mig_capable=True)
    fake.fail_field(gpu, "mig_mode", pynvml.NVML_ERROR_UNKNOWN)
    read = collector.sample().gpus[0]
    assert read.mig_enabled is None
    assert read.declined_reason == "MIG mode could not be read (Unknown Error)"


def test_gpu_without_mig_reports_mig_off_without_an_error(fake: FakeNvml, collector: NvmlCollector) -> None:
    fake.add_gpu("NVIDIA GeForce RTX 3090", 24576)  # the driver answers Not Supported
    read = collector.sample().gpus[0]
    assert read.mig_enabled is False and read.declined_reason is None and read.errors == {}


@pytest.mark.parametrize(("kind", "sentence"), [("library", NO_DRIVER), ("driver", DRIVER_NOT_LOADED)])
def test_no_driver_is_a_clear_sentence_not_a_traceback(kind: str, sentence: str) -> None:
    with FakeNvml() as fake:
        fake.no_driver(kind)  # type: ignore[arg-type]
        with pytest.raises(NvmlUnavailable) as raised:
            NvmlCollector()
    assert str(raised.value) == sentence
    assert isinstance(raised.value, AgentError)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_no_driver_sentence_names_the_library_and_the_way_out() -> None:
    assert NO_DRIVER == ("The NVIDIA driver was not found (libnvidia-ml.so): install the driver or run with --simulate")


def _nvidia_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_nvidia_library_present(), reason="this machine has the NVIDIA driver")
def test_real_pynvml_on_a_machine_without_the_driver_raises_nvml_unavailable() -> None:
    with pytest.raises(NvmlUnavailable, match=r"^The NVIDIA driver was not found \(libnvidia-ml\.so\)"):
        NvmlCollector()


def test_handles_and_fixed_facts_are_not_fetched_every_poll(fake: FakeNvml, collector: NvmlCollector) -> None:
    for _ in range(4):
        fake.add_gpu()
    for _ in range(10):
        collector.sample()

    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlDeviceGetCount"] == 1
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 4
    assert fake.calls["nvmlDeviceGetUUID"] == 4
    assert fake.calls["nvmlDeviceGetName"] == 4
    assert fake.calls["nvmlSystemGetDriverVersion"] == 1
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 40  # telemetry: every GPU, every poll


def test_a_failing_machine_wide_call_spoils_only_its_field(fake: FakeNvml, collector: NvmlCollector) -> None:
    fake.add_gpu()
    fake.fail_host_field("driver_version", pynvml.NVML_ERROR_UNKNOWN)

    sample = collector.sample()
    assert sample.driver_version is None and sample.errors == {"driver_version": "Unknown Error"}
    assert sample.cuda_version == "12.4" and len(sample.gpus) == 1 and sample.gpus[0].errors == {}

    fake.heal_host_field("driver_version")
    healed = collector.sample()
    assert healed.driver_version == "550.54.14" and healed.errors == {}


def test_closing_the_collector_shuts_nvml_down_and_refuses_more_polls(fake: FakeNvml) -> None:
    fake.add_gpu()
    collector = NvmlCollector()
    assert fake.initialized
    collector.close()
    collector.close()  # idempotent
    assert not fake.initialized
    with pytest.raises(NvmlUnavailable):
        collector.sample()


def test_uninstalling_the_fake_gives_pynvml_its_functions_back() -> None:
    original = pynvml.nvmlDeviceGetUtilizationRates
    with FakeNvml() as fake:
        assert pynvml.nvmlDeviceGetUtilizationRates is not original
        with pytest.raises(RuntimeError):
            FakeNvml().install()  # one fake at a time
        assert fake.installed
    assert pynvml.nvmlDeviceGetUtilizationRates is original
    assert not fake.installed


def test_the_fake_refuses_calls_before_nvml_init_like_the_driver(fake: FakeNvml) -> None:
    fake.add_gpu()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
