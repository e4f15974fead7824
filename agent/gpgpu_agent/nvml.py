"""GPU telemetry through NVML (pynvml, from the nvidia-ml-py package).

The only module of the agent that imports pynvml: every quirk of the driver stays here, and the
rest of the agent sees typed samples (gpgpu_agent.types). Tests and the simulation mode run this
very code over gpgpu_agent_testing.fake_nvml, which replaces the functions beneath pynvml.

Contracts:
- NVML is initialised once, when the collector is made, and shut down by `close()`. Device
  handles are fetched once per GPU and kept; a handle is fetched again only after its GPU was
  reported lost (fell off the bus) or could not be fetched.
- One failing NVML call spoils one field of one GPU: the field is None and `GpuSample.errors`
  maps the field's name (see FIELDS) to NVML's text. A field the GPU does not offer
  (NVML_ERROR_NOT_SUPPORTED) is recorded as types.NOT_SUPPORTED without a warning.
- A GPU that is lost (NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED, or no handle) yields a
  sample with its index, the uuid it last had ("" if it never had one), no telemetry and
  errors["gpu"]; the other GPUs report normally.
- No driver: making a collector raises NvmlUnavailable with a sentence, never an NVML traceback.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import pynvml

from gpgpu_agent.protocols import AgentError
from gpgpu_agent.types import NOT_SUPPORTED, GpuProcess, GpuSample, HostSample, MigDevice

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The names GpuSample.errors (and HostSample.errors) use, one per NVML call or group of calls.
FIELDS = (
    "gpu",  # the GPU as a whole: lost, or no handle
    "uuid",
    "name",
    "minor_number",  # the GPU's device node, /dev/nvidia<minor>
    "memory",  # vram_total_mb and vram_used_mb
    "utilization",  # utilization_pct and memory_utilization_pct
    "temperature",
    "power",
    "power_limit",
    "pcie_gen",
    "pcie_width",
    "mig_mode",
    "mig_devices",
    "compute_processes",
    "graphics_processes",
)
HOST_FIELDS = ("driver_version", "cuda_version", "gpu_count")

NO_DRIVER = "The NVIDIA driver was not found (libnvidia-ml.so): install the driver or run with --simulate"
DRIVER_NOT_LOADED = (
    "The NVIDIA driver is installed but not loaded (no nvidia kernel module): load it or reboot, or run with --simulate"
)
NO_PERMISSION = "NVML refused access to the GPUs: run the agent as a user allowed to use them (root or the video group)"
VERSION_MISMATCH = (
    "The NVIDIA driver's library and kernel module have different versions (usually after a driver "
    "upgrade): reboot the machine"
)
MIG_DECLINED = "MIG is enabled; set offer_mig to rent its instances"
MIG_NO_INSTANCES = "MIG is enabled but no MIG instances are configured"

_MIB = 1024 * 1024
# Errors after which the GPU cannot be used at all until it is found again.
_LOST_CODES = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})


class NvmlUnavailable(AgentError):
    """NVML cannot be used on this machine (no driver, not loaded, no permission…). The message is
    a sentence for the provider."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def text(value: str | bytes) -> str:
    """NVML strings as str: pynvml before 11.5 returned bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version integer (12040) as "12.4"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _init_failure_sentence(error: pynvml.NVMLError) -> str:
    code = getattr(error, "value", None)
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return NO_DRIVER
    if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return DRIVER_NOT_LOADED
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return NO_PERMISSION
    if code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return VERSION_MISMATCH
    return f"NVML could not start ({error}): check the NVIDIA driver with nvidia-smi, or run with --simulate"


class _Lost(Exception):
    """Internal: this GPU cannot be read at all (fell off the bus, needs a reset, no handle)."""


@dataclass(slots=True)
class _GpuState:
    """What the collector keeps about one GPU between polls."""

    index: int
    handle: object = None  # pynvml's opaque device handle; None until fetched
    uuid: str = ""  # the last uuid read: kept while the GPU is lost, to say which one it was
    uuid_read: bool = False  # read since the handle was fetched
    name: str | None = None
    minor_number: int | None = None
    # field -> the error last logged for it, so a persistent failure is logged once, not every poll
    logged: dict[str, str] = field(default_factory=dict)


class NvmlCollector:
    """protocols.Collector over NVML. Safe to call from several threads (one poll at a time).

    `offer_mig`: on a GPU with MIG enabled, offer its MIG instances (GpuSample.mig_devices) rather
    than decline the whole GPU with the reason MIG_DECLINED.
    """

    def __init__(self, *, offer_mig: bool = False, clock: Callable[[], datetime] = utc_now) -> None:
        self.offer_mig = offer_mig
        self._clock = clock
        self._lock = threading.Lock()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            raise NvmlUnavailable(_init_failure_sentence(error)) from None
        self._open = True
        # Facts that do not change while the driver stays loaded: read once they can be.
        self._driver_version: str | None = None
        self._cuda_version: str | None = None
        self._count: int | None = None
        self._gpus: dict[int, _GpuState] = {}
        self._host_logged: dict[str, str] = {}

    # --- protocols.Collector ----------------------------------------------------------------

    def sample(self) -> HostSample:
        """Read every GPU now. Never raises for a failing GPU or field; raises NvmlUnavailable
        only after close()."""
        with self._lock:
            if not self._open:
                raise NvmlUnavailable("The GPU collector was closed")
            taken_at = self._clock()
            errors: dict[str, str] = {}
            if self._driver_version is None:
                self._driver_version = self._host_read(
                    errors, "driver_version", lambda: text(pynvml.nvmlSystemGetDriverVersion())
                )
            if self._cuda_version is None:
                self._cuda_version = self._host_read(
                    errors, "cuda_version", lambda: cuda_version_text(pynvml.nvmlSystemGetCudaDriverVersion_v2())
                )
            if self._count is None:
                self._count = self._host_read(errors, "gpu_count", pynvml.nvmlDeviceGetCount)
            gpus = tuple(self._sample_gpu(index) for index in range(self._count or 0))
            return HostSample(
                driver_version=self._driver_version,
                cuda_version=self._cuda_version,
                gpus=gpus,
                taken_at=taken_at,
                errors=errors,
            )

    def close(self) -> None:
        """Shut NVML down; idempotent."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._gpus.clear()
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as error:
                logger.debug("nvmlShutdown failed: %s", error)

    def __enter__(self) -> NvmlCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- one GPU ------------------------------------------------------------------------------

    def _sample_gpu(self, index: int) -> GpuSample:
        state = self._gpus.get(index)
        if state is None:
            state = self._gpus[index] = _GpuState(index=index)
        errors: dict[str, str] = {}
        try:
            if state.handle is None:
                self._resolve(state)
            return self._read_gpu(state, errors)
        except _Lost as lost:
            state.handle = None  # fetch it again next poll: the GPU may come back
            message = str(lost)
            if state.logged.get("gpu") != message:
                logger.warning("GPU %d (%s) cannot be read: %s", index, state.uuid or "uuid unknown", message)
                state.logged = {"gpu": message}
            return GpuSample(index=index, uuid=state.uuid, errors={"gpu": message})

    def _resolve(self, state: _GpuState) -> None:
        """Fetch the GPU's handle (kept until the GPU is lost). Raises _Lost without one."""
        try:
            state.handle = pynvml.nvmlDeviceGetHandleByIndex(state.index)
        except pynvml.NVMLError as error:
            raise _Lost(str(error)) from None
        if state.logged.pop("gpu", None) is not None:
            logger.info("GPU %d can be read again", state.index)
        # After a GPU came back the index may name another board: read its facts afresh.
        state.uuid_read = False
        state.name = None
        state.minor_number = None

    def _read_gpu(self, state: _GpuState, errors: dict[str, str]) -> GpuSample:
        handle = state.handle
        if not state.uuid_read:
            uuid = self._read(state, errors, "uuid", lambda: text(pynvml.nvmlDeviceGetUUID(handle)))
            if uuid is not None:
                state.uuid, state.uuid_read = uuid, True
        if state.name is None:
            state.name = self._read(state, errors, "name", lambda: text(pynvml.nvmlDeviceGetName(handle)))
        if state.minor_number is None:
            state.minor_number = self._read(
                state, errors, "minor_number", lambda: int(pynvml.nvmlDeviceGetMinorNumber(handle))
            )

        memory = self._read(state, errors, "memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        rates = self._read(state, errors, "utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        temperature = self._read(
            state, errors, "temperature", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        )
        power_mw = self._read(state, errors, "power", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
        limit_mw = self._read(state, errors, "power_limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        pcie_gen = self._read(state, errors, "pcie_gen", lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))
        pcie_width = self._read(state, errors, "pcie_width", lambda: pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle))
        mig_enabled, mig_devices, declined = self._read_mig(state, errors)
        processes = self._read_processes(state, errors)
        self._log_cleared(state, errors)

        return GpuSample(
            index=state.index,
            uuid=state.uuid,
            model=state.name,
            minor_number=state.minor_number,
            vram_total_mb=None if memory is None else int(memory.total) // _MIB,
            vram_used_mb=None if memory is None else int(memory.used) // _MIB,
            utilization_pct=None if rates is None else float(rates.gpu),
            memory_utilization_pct=None if rates is None else float(rates.memory),
            temperature_c=None if temperature is None else float(temperature),
            power_w=None if power_mw is None else power_mw / 1000.0,
            power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
            pcie_gen=pcie_gen,
            pcie_width=pcie_width,
            mig_enabled=mig_enabled,
            mig_devices=mig_devices,
            processes=processes,
            declined_reason=declined,
            errors=errors,
        )

    def _read_mig(
        self, state: _GpuState, errors: dict[str, str]
    ) -> tuple[bool | None, tuple[MigDevice, ...], str | None]:
        """(mig_enabled, MIG instances offered, why the whole GPU is declined)."""
        try:
            current_mode = pynvml.nvmlDeviceGetMigMode(state.handle)[0]
        except pynvml.NVMLError as error:
            if getattr(error, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
                return False, (), None  # a GPU without MIG (every GeForce): MIG is simply off
            self._failed(state, errors, "mig_mode", error)
            # Renting the whole GPU while MIG might be on would hand out a GPU CUDA cannot use whole.
            return None, (), f"MIG mode could not be read ({error})"
        if current_mode != pynvml.NVML_DEVICE_MIG_ENABLE:
            return False, (), None
        if not self.offer_mig:
            return True, (), MIG_DECLINED
        devices = self._read(state, errors, "mig_devices", lambda: self._mig_devices(state.handle))
        if devices is None:
            return True, (), f"MIG instances could not be listed ({errors['mig_devices']})"
        if not devices:
            return True, (), MIG_NO_INSTANCES
        return True, devices, None

    @staticmethod
    def _mig_devices(parent: object) -> tuple[MigDevice, ...]:
        devices = []
        for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
            try:
                handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except pynvml.NVMLError_NotFound:
                continue  # an empty slot: fewer instances than the maximum
            try:
                instance_id: int | None = pynvml.nvmlDeviceGetGpuInstanceId(handle)
            except pynvml.NVMLError_NotSupported:
                instance_id = None
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                MigDevice(
                    uuid=text(pynvml.nvmlDeviceGetUUID(handle)),
                    gpu_instance_id=instance_id,
                    memory_total_mb=int(memory.total) // _MIB,
                )
            )
        return tuple(devices)

    def _read_processes(self, state: _GpuState, errors: dict[str, str]) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes (an owner's game is a graphics process), one per pid."""
        handle = state.handle
        by_pid: dict[int, int | None] = {}
        for name, call in (
            ("compute_processes", pynvml.nvmlDeviceGetComputeRunningProcesses),
            ("graphics_processes", pynvml.nvmlDeviceGetGraphicsRunningProcesses),
        ):
            found = self._read(state, errors, name, functools.partial(call, handle))
            for process in found or ():
                pid = int(process.pid)
                used = _process_memory_mb(process)
                if pid in by_pid and (used is None or (by_pid[pid] or 0) >= used):
                    continue  # a process using CUDA and graphics: listed twice, kept once
                by_pid[pid] = used
        return tuple(GpuProcess(pid=pid, used_memory_mb=used) for pid, used in sorted(by_pid.items()))

    # --- error handling -----------------------------------------------------------------------

    def _read(self, state: _GpuState, errors: dict[str, str], name: str, call: Callable[[], T]) -> T | None:
        """call(); on an NVML error record it under `name` and return None. Raises _Lost when the
        error says the whole GPU is gone."""
        try:
            return call()
        except pynvml.NVMLError as error:
            if getattr(error, "value", None) in _LOST_CODES:
                raise _Lost(str(error)) from None
            self._failed(state, errors, name, error)
            return None

    def _failed(self, state: _GpuState, errors: dict[str, str], name: str, error: pynvml.NVMLError) -> None:
        if getattr(error, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED:
            errors[name] = NOT_SUPPORTED
            return
        message = str(error)
        errors[name] = message
        if state.logged.get(name) != message:
            logger.warning("GPU %d (%s): reading %s failed: %s", state.index, state.uuid, name, message)
            state.logged[name] = message

    @staticmethod
    def _log_cleared(state: _GpuState, errors: dict[str, str]) -> None:
        for name in [name for name in state.logged if name not in errors]:
            del state.logged[name]
            logger.info("GPU %d (%s): %s can be read again", state.index, state.uuid, name)

    def _host_read(self, errors: dict[str, str], name: str, call: Callable[[], T]) -> T | None:
        try:
            value = call()
        except pynvml.NVMLError as error:
            message = NOT_SUPPORTED if getattr(error, "value", None) == pynvml.NVML_ERROR_NOT_SUPPORTED else str(error)
            errors[name] = message
            if self._host_logged.get(name) != message and message != NOT_SUPPORTED:
                logger.warning("Reading the %s failed: %s", name.replace("_", " "), message)
                self._host_logged[name] = message
            return None
        self._host_logged.pop(name, None)
        return value


def _process_memory_mb(process: object) -> int | None:
    used = getattr(process, "usedGpuMemory", None)
    # pynvml maps NVML_VALUE_NOT_AVAILABLE to None; an older one may pass the raw sentinel.
    if used is None or used == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
        return None
    return int(used) // _MIB
