"""Host, process and GPU metrics, read when Prometheus scrapes (nothing runs between scrapes, so a job pays for
them only a few milliseconds per scrape interval): psutil for the host and this process, NVML (nvidia-ml-py) for
the GPUs this process uses."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


class HostCollector:
    """CPU, memory, disk and network of the host and this process; free space where the run writes."""

    def __init__(self, watch_path: str | Path) -> None:
        self.watch_path = str(watch_path)
        self.process = psutil.Process()
        psutil.cpu_percent(interval=None)  # the first call starts the interval the next one measures

    def _existing_watch_path(self) -> str:
        path = Path(self.watch_path).expanduser().absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        return str(path)

    def collect(self):
        cpu = os.times()  # a syscall, where psutil reads /proc/self/stat
        mem = psutil.virtual_memory()
        yield _gauge("saepipe_host_cpu_utilization_ratio", "Host CPU busy fraction since the last scrape.",
                     psutil.cpu_percent(interval=None) / 100.0)
        yield _counter("saepipe_process_cpu_seconds", "CPU time of this job's process (user + system).",
                       cpu.user + cpu.system)
        yield _gauge("saepipe_process_resident_memory_bytes", "Resident memory of this job's process.",
                     self.process.memory_info().rss)
        yield _gauge("saepipe_host_memory_used_bytes", "Host memory in use (total - available).", mem.total - mem.available)
        yield _gauge("saepipe_host_memory_total_bytes", "Host memory.", mem.total)
        try:
            io = self.process.io_counters()
            yield _counter("saepipe_process_disk_read_bytes", "Bytes this process read from storage.", io.read_bytes)
            yield _counter("saepipe_process_disk_written_bytes", "Bytes this process wrote to storage.", io.write_bytes)
        except (psutil.AccessDenied, AttributeError):  # not on every platform
            pass
        path = self._existing_watch_path()
        usage = psutil.disk_usage(path)
        yield _gauge("saepipe_filesystem_free_bytes", "Free bytes on the run directory's file system.", usage.free,
                     {"path": path})
        yield _gauge("saepipe_filesystem_size_bytes", "Size of the run directory's file system.", usage.total,
                     {"path": path})
        net = psutil.net_io_counters()
        yield _counter("saepipe_host_network_received_bytes", "Bytes the host received (all interfaces).", net.bytes_recv)
        yield _counter("saepipe_host_network_sent_bytes", "Bytes the host sent (all interfaces).", net.bytes_sent)


def _visible_indices(count: int) -> list[int]:
    """The devices this process uses: CUDA_VISIBLE_DEVICES (as Slurm and submitit set it) or LOCAL_RANK's."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        out = []
        for item in visible.split(","):
            item = item.strip()
            if item.isdigit() and int(item) < count:
                out.append(int(item))
        return out
    return list(range(count))


class GPUCollector:
    """Per GPU of this job: utilisation, memory, power, temperature, SM clock, ECC errors (where supported).
    Absent, with one info line, where NVML cannot start (no GPU, no driver)."""

    def __init__(self) -> None:
        self.handles: list[tuple[int, str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            for i in _visible_indices(count):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                self.handles.append((i, uuid if isinstance(uuid, str) else uuid.decode(), h))
            self.nvml = pynvml
        except Exception as err:  # noqa: BLE001 - pynvml raises its own NVMLError family, or ImportError
            self.nvml = None
            log.info("no GPU metrics: NVML is not available here (%s)", str(err).splitlines()[0] if str(err) else type(err).__name__)

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def collect(self):
        yield _gauge("saepipe_gpu_count", "GPUs this job's exporter reports (0 without NVML).", len(self.handles))
        if not self.handles:
            return
        nv = self.nvml
        names = ["gpu", "uuid"]
        fams = {
            "util": GaugeMetricFamily("saepipe_gpu_utilization_ratio", "GPU busy fraction (NVML utilization.gpu).", labels=names),
            "used": GaugeMetricFamily("saepipe_gpu_memory_used_bytes", "GPU memory in use.", labels=names),
            "total": GaugeMetricFamily("saepipe_gpu_memory_total_bytes", "GPU memory.", labels=names),
            "power": GaugeMetricFamily("saepipe_gpu_power_watts", "GPU power draw.", labels=names),
            "temp": GaugeMetricFamily("saepipe_gpu_temperature_celsius", "GPU temperature.", labels=names),
            "clock": GaugeMetricFamily("saepipe_gpu_sm_clock_hertz", "GPU SM clock.", labels=names),
            "ecc": CounterMetricFamily("saepipe_gpu_ecc_errors", "GPU ECC errors since the driver loaded.",
                                       labels=[*names, "kind"]),
        }
        for index, uuid, h in self.handles:
            key = [str(index), uuid]
            for fam, read in (
                ("util", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                ("used", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
                ("total", lambda: nv.nvmlDeviceGetMemoryInfo(h).total),
                ("power", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                ("temp", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("clock", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM) * 1e6),
            ):
                try:
                    fams[fam].add_metric(key, float(read()))
                except nv.NVMLError:  # a query this device does not support
                    pass
            for kind, which in (("corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                                ("uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
                try:
                    fams["ecc"].add_metric([*key, kind], float(nv.nvmlDeviceGetTotalEccErrors(h, which, nv.NVML_VOLATILE_ECC)))
                except nv.NVMLError:
                    pass
        yield from fams.values()
