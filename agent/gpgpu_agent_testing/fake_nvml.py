"""A fake NVIDIA driver beneath pynvml: tests and the simulation mode run the real collector.

FakeNvml replaces pynvml's module-level functions (nvmlInit, nvmlDeviceGetUtilizationRates, …)
with fakes that read a scenario, so gpgpu_agent.nvml runs its real code path and sees pynvml's
real return shapes and real exception classes (pynvml.NVMLError(code) maps to the subclass:
NVMLError_GpuIsLost, NVMLError_NotSupported, …). It plays scenarios: a GPU falls off the bus, a
process appears, utilisation follows a series, a field fails, there is no driver, MIG is on.

    with FakeNvml() as fake:                       # or fake.install() … fake.uninstall()
        gpu = fake.add_gpu("NVIDIA GeForce RTX 4090", 24564)
        fake.set_utilization(gpu, [90, 5, 0, 0])   # one value per read; the last one stays
        fake.add_process(gpu, 4242, 1500, kind="graphics")
        collector = NvmlCollector()

Like the driver, the fake answers Uninitialized before nvmlInit. It counts every call by
function name (`calls`), so tests and benchmarks can see what a poll costs. Only one FakeNvml
may be installed at a time. All methods are thread-safe.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid as uuid_module
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import pynvml

_MIB = 1024 * 1024
_NO_INSTANCE = 0xFFFFFFFF  # what NVML puts in gpuInstanceId/computeInstanceId without MIG
MAX_MIG_DEVICES = 7  # as on an A100 or H100

# fail_field's field names (the collector's error names, gpgpu_agent.nvml.FIELDS) → the fakes
# they make fail.
FIELD_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "uuid": ("nvmlDeviceGetUUID",),
    "name": ("nvmlDeviceGetName",),
    "minor_number": ("nvmlDeviceGetMinorNumber",),
    "memory": ("nvmlDeviceGetMemoryInfo",),
    "utilization": ("nvmlDeviceGetUtilizationRates",),
    "temperature": ("nvmlDeviceGetTemperature",),
    "power": ("nvmlDeviceGetPowerUsage",),
    "power_limit": ("nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPowerManagementLimit"),
    "pcie_gen": ("nvmlDeviceGetCurrPcieLinkGeneration",),
    "pcie_width": ("nvmlDeviceGetCurrPcieLinkWidth",),
    "mig_mode": ("nvmlDeviceGetMigMode",),
    "mig_devices": ("nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex"),
    "compute_processes": ("nvmlDeviceGetComputeRunningProcesses",),
    "graphics_processes": ("nvmlDeviceGetGraphicsRunningProcesses",),
}
HOST_FIELD_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "driver_version": ("nvmlSystemGetDriverVersion",),
    "cuda_version": ("nvmlSystemGetCudaDriverVersion", "nvmlSystemGetCudaDriverVersion_v2"),
    "gpu_count": ("nvmlDeviceGetCount",),
}

NvmlErrorLike: TypeAlias = int | pynvml.NVMLError | type[pynvml.NVMLError]
UtilizationSource: TypeAlias = float | int | Iterable[float] | Callable[[float], float]

_installed: FakeNvml | None = None
_install_lock = threading.Lock()


def error_code(error: NvmlErrorLike) -> int:
    """An NVML error code from a code, an NVMLError or one of pynvml's NVMLError_* classes."""
    if isinstance(error, int):
        return error
    if isinstance(error, pynvml.NVMLError):
        return int(error.value)
    if isinstance(error, type) and issubclass(error, pynvml.NVMLError) and error is not pynvml.NVMLError:
        return int(error().value)  # the generated subclasses know their code
    raise TypeError(f"not an NVML error: {error!r}")


@dataclass(frozen=True, slots=True)
class FakeHandle:
    """A device handle. `generation` changes when a lost GPU comes back, so an old handle stays
    dead (as with the driver, a GPU that returns must be looked up again)."""

    index: int
    generation: int
    mig_slot: int | None = None


@dataclass(slots=True)
class FakeProcess:
    pid: int
    used_memory_mb: int | None
    kind: Literal["compute", "graphics"]


@dataclass(slots=True)
class FakeMigDevice:
    uuid: str
    gpu_instance_id: int
    memory_mb: int


@dataclass(slots=True)
class FakeGpu:
    """One fake GPU's state; change it through FakeNvml's methods."""

    index: int
    uuid: str
    model: str
    vram_mb: int
    base_used_mb: int = 300  # what the driver and display use with no process
    utilization: Callable[[], float] = lambda: 0.0
    memory_utilization: float = 0.0
    temperature_c: int = 35
    power_w: float = 20.0
    power_limit_w: float = 300.0
    pcie_gen: int = 4
    pcie_width: int = 16
    mig_capable: bool = False
    mig_enabled: bool = False
    mig_devices: list[FakeMigDevice] = field(default_factory=list)
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    lost: bool = False
    generation: int = 0
    failing: dict[str, int] = field(default_factory=dict)  # pynvml function name → error code
    minor_number: int | None = None  # None: the index, as on most machines


class FakeNvml:
    """The scenario and the fakes that serve it. `clock` (seconds, monotonic) is what a
    utilisation function of time is called with; `uuid_namespace` makes GPU uuids differ between
    fakes (two simulated machines must not share one); `legacy_bytes` makes strings come back as
    bytes, as from pynvml before 11.5."""

    def __init__(
        self,
        *,
        driver_version: str = "550.54.14",
        cuda_version: int = 12040,
        clock: Callable[[], float] = time.monotonic,
        uuid_namespace: str = "fake-nvml",
        legacy_bytes: bool = False,
    ) -> None:
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.clock = clock
        self.uuid_namespace = uuid_namespace
        self.legacy_bytes = legacy_bytes
        self.gpus: list[FakeGpu] = []
        self.calls: Counter[str] = Counter()
        self._init_count = 0
        self._init_error: int | None = None
        self._host_failing: dict[str, int] = {}
        self._saved: dict[str, object] = {}
        self._lock = threading.RLock()

    # --- installing ---------------------------------------------------------------------------

    def install(self) -> FakeNvml:
        """Put the fakes in place of pynvml's functions (until uninstall())."""
        global _installed
        with _install_lock:
            if _installed is not None:
                raise RuntimeError("a FakeNvml is already installed; uninstall it first")
            fakes = self._fakes()
            for name, fake in fakes.items():
                self._saved[name] = pynvml.__dict__.get(name, _MISSING)
                setattr(pynvml, name, fake)
            _installed = self
        return self

    def uninstall(self) -> None:
        """Give pynvml its own functions back; idempotent."""
        global _installed
        with _install_lock:
            if _installed is not self:
                return
            for name, original in self._saved.items():
                if original is _MISSING:
                    delattr(pynvml, name)
                else:
                    setattr(pynvml, name, original)
            self._saved.clear()
            _installed = None

    def __enter__(self) -> FakeNvml:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    # --- the scenario ---------------------------------------------------------------------------

    def add_gpu(
        self,
        model: str = "NVIDIA GeForce RTX 4090",
        vram_mb: int = 24564,
        *,
        uuid: str | None = None,
        utilization: UtilizationSource = 0.0,
        temperature_c: int = 35,
        power_w: float = 20.0,
        power_limit_w: float = 450.0,
        pcie_gen: int = 4,
        pcie_width: int = 16,
        mig_capable: bool = False,
    ) -> int:
        """Add a GPU at the next index and return that index."""
        with self._lock:
            index = len(self.gpus)
            gpu = FakeGpu(
                index=index,
                uuid=uuid or self._uuid("GPU", index),
                model=model,
                vram_mb=vram_mb,
                temperature_c=temperature_c,
                power_w=power_w,
                power_limit_w=power_limit_w,
                pcie_gen=pcie_gen,
                pcie_width=pcie_width,
                mig_capable=mig_capable,
            )
            self.gpus.append(gpu)
            self.set_utilization(index, utilization)
            return index

    def set_utilization(self, index: int, source: UtilizationSource, *, memory: float | None = None) -> None:
        """What the GPU's utilisation reads: a number; a series (each read takes the next value,
        the last one stays); or a function of the fake's clock (seconds)."""
        with self._lock:
            gpu = self.gpus[index]
            gpu.utilization = _utilization_reader(source, self.clock)
            if memory is not None:
                gpu.memory_utilization = memory

    def set_telemetry(
        self,
        index: int,
        *,
        temperature_c: float | None = None,
        power_w: float | None = None,
        power_limit_w: float | None = None,
        memory_utilization: float | None = None,
        base_used_mb: int | None = None,
    ) -> None:
        """Change any of a GPU's slower readings."""
        with self._lock:
            gpu = self.gpus[index]
            if temperature_c is not None:
                gpu.temperature_c = round(temperature_c)
            if power_w is not None:
                gpu.power_w = power_w
            if power_limit_w is not None:
                gpu.power_limit_w = power_limit_w
            if memory_utilization is not None:
                gpu.memory_utilization = memory_utilization
            if base_used_mb is not None:
                gpu.base_used_mb = base_used_mb

    def add_process(
        self, index: int, pid: int, mem_mb: int | None = 500, *, kind: Literal["compute", "graphics"] = "compute"
    ) -> None:
        """A process appears on the GPU (mem_mb None: the driver will not say how much it uses)."""
        if kind not in ("compute", "graphics"):
            raise ValueError(f"kind must be 'compute' or 'graphics', not {kind!r}")
        with self._lock:
            self.gpus[index].processes[pid] = FakeProcess(pid=pid, used_memory_mb=mem_mb, kind=kind)

    def remove_process(self, index: int, pid: int) -> None:
        """The process left the GPU (no error if it was not there)."""
        with self._lock:
            self.gpus[index].processes.pop(pid, None)

    def processes(self, index: int) -> list[FakeProcess]:
        with self._lock:
            return list(self.gpus[index].processes.values())

    def fall_off_bus(self, index: int) -> None:
        """The GPU is lost: every call on it (and looking it up) fails with GpuIsLost."""
        with self._lock:
            self.gpus[index].lost = True

    def recover(self, index: int) -> None:
        """The lost GPU is back; handles fetched before it was lost stay dead."""
        with self._lock:
            gpu = self.gpus[index]
            gpu.lost = False
            gpu.generation += 1

    def fail_field(self, index: int, field_name: str, error: NvmlErrorLike = pynvml.NVML_ERROR_UNKNOWN) -> None:
        """Make the NVML call(s) behind one field of one GPU fail (field names: FIELD_FUNCTIONS)."""
        code = error_code(error)
        with self._lock:
            for name in _functions_of(field_name, FIELD_FUNCTIONS):
                self.gpus[index].failing[name] = code

    def heal_field(self, index: int, field_name: str) -> None:
        with self._lock:
            for name in _functions_of(field_name, FIELD_FUNCTIONS):
                self.gpus[index].failing.pop(name, None)

    def fail_host_field(self, field_name: str, error: NvmlErrorLike = pynvml.NVML_ERROR_UNKNOWN) -> None:
        """Make a machine-wide call fail: "driver_version", "cuda_version" or "gpu_count"."""
        code = error_code(error)
        with self._lock:
            for name in _functions_of(field_name, HOST_FIELD_FUNCTIONS):
                self._host_failing[name] = code

    def heal_host_field(self, field_name: str) -> None:
        with self._lock:
            for name in _functions_of(field_name, HOST_FIELD_FUNCTIONS):
                self._host_failing.pop(name, None)

    def no_driver(self, kind: Literal["library", "driver"] = "library") -> None:
        """nvmlInit fails: "library" as without libnvidia-ml.so, "driver" as without the kernel
        module."""
        self._init_error = (
            pynvml.NVML_ERROR_LIBRARY_NOT_FOUND if kind == "library" else pynvml.NVML_ERROR_DRIVER_NOT_LOADED
        )

    def fail_init(self, error: NvmlErrorLike) -> None:
        self._init_error = error_code(error)

    def enable_mig(self, index: int, instances: int | Iterable[int] = 2) -> list[str]:
        """Turn MIG on with `instances` instances (a count, sharing the memory evenly, or each
        instance's memory in MB); returns their uuids. 0 instances: MIG on, none configured."""
        with self._lock:
            gpu = self.gpus[index]
            if isinstance(instances, int):
                sizes = [gpu.vram_mb // instances] * instances if instances > 0 else []
            else:
                sizes = list(instances)
            if len(sizes) > MAX_MIG_DEVICES:
                raise ValueError(f"at most {MAX_MIG_DEVICES} MIG instances")
            gpu.mig_capable = True
            gpu.mig_enabled = True
            gpu.mig_devices = [
                FakeMigDevice(uuid=self._uuid("MIG", index, slot), gpu_instance_id=slot + 1, memory_mb=size)
                for slot, size in enumerate(sizes)
            ]
            return [device.uuid for device in gpu.mig_devices]

    def disable_mig(self, index: int) -> None:
        with self._lock:
            gpu = self.gpus[index]
            gpu.mig_enabled = False
            gpu.mig_devices = []

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    @property
    def initialized(self) -> bool:
        """nvmlInit was called more often than nvmlShutdown."""
        return self._init_count > 0

    @property
    def lock(self) -> threading.RLock:
        """Held by every fake call: hold it to change several things at once, unseen by a poll."""
        return self._lock

    @property
    def installed(self) -> bool:
        """This fake is in place beneath pynvml."""
        return _installed is self

    def _uuid(self, prefix: str, *parts: int) -> str:
        key = "/".join([self.uuid_namespace, prefix, *map(str, parts)])
        return f"{prefix}-{uuid_module.uuid5(uuid_module.NAMESPACE_URL, key)}"

    # --- the fakes ----------------------------------------------------------------------------

    def _fakes(self) -> dict[str, Callable[..., object]]:
        """Every pynvml function the fake replaces, by name."""
        raise_for = self._raise

        def counted(name: str, body: Callable[..., object]) -> Callable[..., object]:
            def fake(*args: object, **kwargs: object) -> object:
                with self._lock:
                    self.calls[name] += 1
                    raise_for(name)
                    return body(*args, **kwargs)

            fake.__name__ = name
            fake.__qualname__ = f"FakeNvml.{name}"
            return fake

        def device(name: str, body: Callable[..., object]) -> Callable[..., object]:
            """A call on a device handle: checks the handle, the GPU's state and failing fields.
            `body` takes the GPU, the handle and the call's other arguments."""

            def call(handle: object, *args: object) -> object:
                gpu = self._gpu_of(handle)
                if name in gpu.failing:
                    raise pynvml.NVMLError(gpu.failing[name])
                return body(gpu, handle, *args)

            return counted(name, call)

        def init(*_args: object) -> None:
            if self._init_error is not None:
                raise pynvml.NVMLError(self._init_error)
            self._init_count += 1

        def shutdown() -> None:
            self._init_count -= 1

        def handle_by_index(index: int) -> FakeHandle:
            if not 0 <= index < len(self.gpus):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            gpu = self.gpus[index]
            if gpu.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return FakeHandle(index=index, generation=gpu.generation)

        def memory(gpu: FakeGpu, handle: FakeHandle, version: object = None) -> object:
            if handle.mig_slot is not None:
                total = gpu.mig_devices[handle.mig_slot].memory_mb * _MIB
                used = 0
            else:
                total = gpu.vram_mb * _MIB
                used = min(total, (gpu.base_used_mb + _process_mb(gpu)) * _MIB)
            return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

        def utilization(gpu: FakeGpu, handle: FakeHandle) -> object:
            if gpu.mig_enabled:  # as the driver: no utilisation for a GPU split by MIG
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            value = min(100, max(0, round(gpu.utilization())))
            return pynvml.c_nvmlUtilization_t(gpu=value, memory=round(gpu.memory_utilization))

        def temperature(gpu: FakeGpu, handle: FakeHandle, sensor: int) -> int:
            if sensor != pynvml.NVML_TEMPERATURE_GPU:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return gpu.temperature_c

        def mig_mode(gpu: FakeGpu, handle: FakeHandle) -> list[int]:
            if not gpu.mig_capable:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
            return [mode, mode]

        def max_mig(gpu: FakeGpu, handle: FakeHandle) -> int:
            if not gpu.mig_capable:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return MAX_MIG_DEVICES

        def mig_handle(gpu: FakeGpu, handle: FakeHandle, slot: int) -> FakeHandle:
            if not gpu.mig_enabled:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if not 0 <= slot < len(gpu.mig_devices):
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return FakeHandle(index=gpu.index, generation=gpu.generation, mig_slot=slot)

        def instance_id(gpu: FakeGpu, handle: FakeHandle) -> int:
            if handle.mig_slot is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return gpu.mig_devices[handle.mig_slot].gpu_instance_id

        def processes(kind: str) -> Callable[[FakeGpu, FakeHandle], list[object]]:
            def listing(gpu: FakeGpu, handle: FakeHandle) -> list[object]:
                return [
                    pynvml.nvmlFriendlyObject(
                        {
                            "pid": p.pid,
                            "usedGpuMemory": None if p.used_memory_mb is None else p.used_memory_mb * _MIB,
                            "gpuInstanceId": _NO_INSTANCE,
                            "computeInstanceId": _NO_INSTANCE,
                        }
                    )
                    for p in gpu.processes.values()
                    if p.kind == kind
                ]

            return listing

        def string(value: str) -> str | bytes:
            return value.encode() if self.legacy_bytes else value

        def uuid_of(gpu: FakeGpu, handle: FakeHandle) -> str | bytes:
            return string(gpu.uuid if handle.mig_slot is None else gpu.mig_devices[handle.mig_slot].uuid)

        power_limit = device("nvmlDeviceGetEnforcedPowerLimit", lambda g, h: round(g.power_limit_w * 1000))
        compute = device("nvmlDeviceGetComputeRunningProcesses", processes("compute"))
        graphics = device("nvmlDeviceGetGraphicsRunningProcesses", processes("graphics"))
        fakes = [
            counted("nvmlInit", init),
            counted("nvmlInitWithFlags", init),
            counted("nvmlShutdown", shutdown),
            counted("nvmlSystemGetDriverVersion", lambda: string(self.driver_version)),
            counted("nvmlSystemGetCudaDriverVersion", lambda: self.cuda_version),
            counted("nvmlSystemGetCudaDriverVersion_v2", lambda: self.cuda_version),
            counted("nvmlDeviceGetCount", lambda: len(self.gpus)),
            counted("nvmlDeviceGetHandleByIndex", handle_by_index),
            device("nvmlDeviceGetUUID", uuid_of),
            device("nvmlDeviceGetName", lambda g, h: string(g.model)),
            device("nvmlDeviceGetMinorNumber", lambda g, h: g.index if g.minor_number is None else g.minor_number),
            device("nvmlDeviceGetMemoryInfo", memory),
            device("nvmlDeviceGetUtilizationRates", utilization),
            device("nvmlDeviceGetTemperature", temperature),
            device("nvmlDeviceGetPowerUsage", lambda g, h: round(g.power_w * 1000)),
            power_limit,
            device("nvmlDeviceGetPowerManagementLimit", lambda g, h: round(g.power_limit_w * 1000)),
            device("nvmlDeviceGetCurrPcieLinkGeneration", lambda g, h: g.pcie_gen),
            device("nvmlDeviceGetCurrPcieLinkWidth", lambda g, h: g.pcie_width),
            device("nvmlDeviceGetMigMode", mig_mode),
            device("nvmlDeviceGetMaxMigDeviceCount", max_mig),
            device("nvmlDeviceGetMigDeviceHandleByIndex", mig_handle),
            device("nvmlDeviceGetGpuInstanceId", instance_id),
            compute,
            graphics,
        ]
        by_name = {fake.__name__: fake for fake in fakes}
        # pynvml's versioned names lead to the same fakes.
        for version in ("_v2", "_v3"):
            by_name[f"nvmlDeviceGetComputeRunningProcesses{version}"] = compute
            by_name[f"nvmlDeviceGetGraphicsRunningProcesses{version}"] = graphics
        return by_name

    def _raise(self, name: str) -> None:
        """Errors every call may meet before its body: not initialised, or a failing host call."""
        if name in ("nvmlInit", "nvmlInitWithFlags"):
            return
        if self._init_count <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if name in self._host_failing:
            raise pynvml.NVMLError(self._host_failing[name])

    def _gpu_of(self, handle: object) -> FakeGpu:
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost or handle.generation != gpu.generation:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return gpu


class _Missing:
    pass


_MISSING = _Missing()


def _functions_of(field_name: str, table: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    try:
        return table[field_name]
    except KeyError:
        raise ValueError(f"unknown field {field_name!r}; known: {', '.join(table)}") from None


def _process_mb(gpu: FakeGpu) -> int:
    return sum(p.used_memory_mb or 0 for p in gpu.processes.values())


def _utilization_reader(source: UtilizationSource, clock: Callable[[], float]) -> Callable[[], float]:
    if isinstance(source, int | float):
        value = float(source)
        return lambda: value
    if callable(source):
        return lambda: float(source(clock()))
    if isinstance(source, str | bytes):
        raise TypeError("utilisation must be a number, a series of numbers or a function of time")
    return _SeriesReader(iter(source))


class _SeriesReader:
    """Each call takes the series' next value; once it runs out, the last value stays."""

    def __init__(self, values: Iterator[float]) -> None:
        self._values = values
        self._last = 0.0

    def __call__(self) -> float:
        for value in itertools.islice(self._values, 1):
            self._last = float(value)
        return self._last
