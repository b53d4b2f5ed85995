"""GPU discovery and health through NVML (the nvidia-ml-py binding), plus virtual GPUs.

`select_gpus(spec)` turns a ``--gpus`` value into the GPUs bcorch supervises:
``all``, ``0,2`` (host indices), ``GPU-<uuid>,...`` (mixed with indices if you like) or
``virtual:N`` (N stand-ins for machines without a GPU; NVML is not touched).

`GpuMonitor` samples memory, utilisation, temperature, the uncorrectable ECC count and
critical XID events of the selected GPUs, and says when NVML reports a GPU lost.
Every NVML figure a device does not support is None, never an error.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import pynvml

from bcorch.config import ConfigError

log = logging.getLogger(__name__)

MAX_VIRTUAL_GPUS = 64
VIRTUAL_PREFIX = "virtual:"


class GpuSelectionError(ConfigError):
    """A GPU selection that cannot be satisfied; str() is one line naming where it came from
    (the --gpus flag or the orchestrator.gpus config key)."""


@dataclass(frozen=True)
class Gpu:
    index: int          # host index (NVML order), or 0..N-1 for virtual GPUs
    uuid: str           # what CUDA_VISIBLE_DEVICES is set to
    name: str
    memory_total: int | None = None   # bytes
    virtual: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GpuHealth:
    """One NVML sample of one GPU (None = not reported by this device)."""

    memory_used: int | None = None
    memory_total: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    ecc_uncorrected: int | None = None
    xid_events: int = 0
    last_xid: int | None = None
    lost: bool = False
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nvml_error_text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # pynvml builds the text lazily through the library itself
        return type(exc).__name__


def _is_lost(exc: BaseException) -> bool:
    return isinstance(exc, pynvml.NVMLError) and getattr(exc, "value", None) in (
        pynvml.NVML_ERROR_GPU_IS_LOST, getattr(pynvml, "NVML_ERROR_GPU_NOT_FOUND", -1))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_init(source: str = "--gpus") -> None:
    """Initialise NVML or raise a one-line GpuSelectionError that names virtual:N.

    source (here and below) is where the GPU selection came from, named first in an error:
    the flag `--gpus` or the config key `orchestrator.gpus`."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise GpuSelectionError(
            f"{source}: no NVIDIA driver available (NVML: {_nvml_error_text(exc)}); "
            f"use --gpus virtual:N to run N virtual GPUs without one") from None


def nvml_shutdown() -> None:
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def discover_nvml() -> list[Gpu]:
    """Every GPU NVML sees, in NVML index order (NVML must be initialised)."""
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        try:
            total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        except pynvml.NVMLError:
            total = None
        gpus.append(Gpu(index=index, uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=_text(pynvml.nvmlDeviceGetName(handle)), memory_total=total))
    return gpus


def virtual_gpus(count: int) -> list[Gpu]:
    return [Gpu(index=i, uuid=f"virtual-{i}", name="virtual GPU", virtual=True)
            for i in range(count)]


def parse_virtual(spec: str, source: str = "--gpus") -> int | None:
    """N for 'virtual:N', None for any other spec; a bad N raises GpuSelectionError."""
    if not spec.startswith(VIRTUAL_PREFIX):
        return None
    raw = spec[len(VIRTUAL_PREFIX):]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_VIRTUAL_GPUS:
        raise GpuSelectionError(f"{source}: virtual:N needs N from 1 to {MAX_VIRTUAL_GPUS}, "
                                f"got {spec!r}")
    return int(raw)


def choose(spec: str, found: list[Gpu], source: str = "--gpus") -> list[Gpu]:
    """Pick GPUs from `found` by 'all', indices and/or UUIDs; order follows the spec."""
    spec = spec.strip()
    if not found:
        raise GpuSelectionError(f"{source}: NVML found no GPU on this host; "
                                "use --gpus virtual:N to run without one")
    if spec == "all":
        return list(found)
    by_index = {g.index: g for g in found}
    by_uuid = {g.uuid.lower(): g for g in found}
    chosen: list[Gpu] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise GpuSelectionError(f"{source}: empty entry in {spec!r}")
        if item.isascii() and item.isdigit():
            gpu = by_index.get(int(item))
            if gpu is None:
                raise GpuSelectionError(f"{source}: no GPU with index {item} "
                                        f"(this host has {_describe_indices(found)})")
        else:
            gpu = by_uuid.get(item.lower())
            if gpu is None:
                raise GpuSelectionError(f"{source}: no GPU with UUID {item!r} on this host "
                                        f"(see `bcorch gpus`)")
        if gpu in chosen:
            raise GpuSelectionError(f"{source}: GPU {item} is listed twice")
        chosen.append(gpu)
    return chosen


def _describe_indices(found: list[Gpu]) -> str:
    return "indices " + ",".join(str(g.index) for g in found)


def select_gpus(spec: str, source: str = "--gpus") -> list[Gpu]:
    """The GPUs named by a --gpus value (initialises and shuts NVML down itself)."""
    count = parse_virtual(spec.strip(), source)
    if count is not None:
        return virtual_gpus(count)
    nvml_init(source)
    try:
        return choose(spec, discover_nvml(), source)
    except pynvml.NVMLError as exc:
        raise GpuSelectionError(f"{source}: NVML failed while listing GPUs: "
                                f"{_nvml_error_text(exc)}") from None
    finally:
        nvml_shutdown()


@dataclass
class _Tracked:
    gpu: Gpu
    handle: Any = None
    xid_events: int = 0
    last_xid: int | None = None
    lost: bool = False


@dataclass
class GpuMonitor:
    """NVML health of a fixed set of GPUs; open() once, sample() from the supervisor loop."""

    gpus: list[Gpu]
    _tracked: dict[str, _Tracked] = field(default_factory=dict)
    _events: Any = None
    _open: bool = False

    def open(self) -> None:
        real = [g for g in self.gpus if not g.virtual]
        if not real:
            return
        nvml_init()
        self._open = True
        for gpu in real:
            tracked = _Tracked(gpu)
            try:
                tracked.handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            except pynvml.NVMLError as exc:
                tracked.lost = _is_lost(exc)
                log.warning("gpu%d: no NVML handle (%s)", gpu.index, _nvml_error_text(exc))
            self._tracked[gpu.uuid] = tracked
        self._open_xid_events()

    def _open_xid_events(self) -> None:
        try:
            self._events = pynvml.nvmlEventSetCreate()
            for tracked in self._tracked.values():
                if tracked.handle is not None:
                    pynvml.nvmlDeviceRegisterEvents(tracked.handle,
                                                    pynvml.nvmlEventTypeXidCriticalError,
                                                    self._events)
        except pynvml.NVMLError as exc:
            log.info("NVML XID events not available (%s)", _nvml_error_text(exc))

    def close(self) -> None:
        if self._events is not None:
            try:
                pynvml.nvmlEventSetFree(self._events)
            except pynvml.NVMLError:
                pass
            self._events = None
        if self._open:
            nvml_shutdown()
            self._open = False

    def _poll_xids(self) -> None:
        """Drain pending critical XID events without waiting."""
        if self._events is None:
            return
        for _ in range(1000):
            try:
                data = pynvml.nvmlEventSetWait_v2(self._events, 0)
            except pynvml.NVMLError:
                return  # NVML_ERROR_TIMEOUT: nothing pending (or events unsupported)
            try:
                uuid = _text(pynvml.nvmlDeviceGetUUID(data.device))
            except pynvml.NVMLError:
                continue
            tracked = self._tracked.get(uuid)
            if tracked is not None:
                tracked.xid_events += 1
                tracked.last_xid = int(data.eventData)
                log.warning("gpu%d: critical XID %d", tracked.gpu.index, tracked.last_xid)

    def sample(self) -> dict[str, GpuHealth]:
        """Health of every real GPU, keyed by UUID (virtual GPUs are absent)."""
        self._poll_xids()
        return {uuid: self._sample_one(t) for uuid, t in self._tracked.items()}

    def _sample_one(self, tracked: _Tracked) -> GpuHealth:
        health = GpuHealth(xid_events=tracked.xid_events, last_xid=tracked.last_xid)
        if tracked.lost or tracked.handle is None:
            health.lost = tracked.lost
            health.error = "GPU is lost" if tracked.lost else "no NVML handle"
            return health
        handle = tracked.handle

        def read(call):
            try:
                return call()
            except pynvml.NVMLError as exc:
                if _is_lost(exc):
                    tracked.lost = True
                    health.lost = True
                    health.error = "GPU is lost"
                return None

        memory = read(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            health.memory_used, health.memory_total = int(memory.used), int(memory.total)
        rates = read(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
        if rates is not None:
            health.utilization_pct = int(rates.gpu)
        health.temperature_c = read(lambda: pynvml.nvmlDeviceGetTemperature(
            handle, pynvml.NVML_TEMPERATURE_GPU))
        health.ecc_uncorrected = read(lambda: pynvml.nvmlDeviceGetTotalEccErrors(
            handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
        return health
