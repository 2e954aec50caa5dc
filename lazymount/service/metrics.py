"""The status as Prometheus metrics: the text exposition (``lazymount status --prometheus``)
and a small HTTP endpoint for it (``metrics_listen = "127.0.0.1:9101"``).

The metrics are made from the status dict (``service.status.collect``), so both always say
the same; prometheus-client writes the exposition format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192


class _StatusCollector:
    def __init__(self, status: dict[str, Any]):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        status = self.status
        mountpoint = status["mountpoint"]
        info = InfoMetricFamily("lazymount", "the running lazymount",
                                labels=["mountpoint"])
        info.add_metric([mountpoint], {"version": status["version"], "pid": str(status["pid"])})
        yield info

        up = GaugeMetricFamily("lazymount_mirror_up", "1 if the mirror's last request "
                               "succeeded, 0 if it failed or was not made yet",
                               labels=["mountpoint", "url", "layout"])
        fetched = CounterMetricFamily("lazymount_mirror_fetched_bytes", "bytes received "
                                      "from the mirror since the mount started",
                                      labels=["mountpoint", "url"])
        for mirror in status["mirrors"]:
            layout = f"v{mirror['layout']}" if mirror["layout"] else ""
            up.add_metric([mountpoint, mirror["url"], layout],
                          1.0 if mirror["state"] == "ok" else 0.0)
            fetched.add_metric([mountpoint, mirror["url"]], mirror.get("fetched_bytes", 0))
        yield up
        yield fetched

        proxy_up = GaugeMetricFamily("lazymount_proxy_up", "1 if the proxy is in use, 0 while "
                                     "it rests after a failure", labels=["mountpoint", "proxy",
                                                                         "group"])
        proxy_failures = GaugeMetricFamily("lazymount_proxy_failures", "the proxy's failures "
                                           "in a row", labels=["mountpoint", "proxy", "group"])
        for proxy in status.get("proxies", []):
            labels = [mountpoint, proxy["proxy"], str(proxy["group"] + 1)]
            proxy_up.add_metric(labels, 1.0 if proxy["up"] else 0.0)
            proxy_failures.add_metric(labels, proxy["failures"])
        yield proxy_up
        yield proxy_failures

        index = status["index"]
        yield _gauge("lazymount_index_packages", "packages the mounted index lists",
                     mountpoint, index["packages"])
        yield _gauge("lazymount_index_age_seconds", "seconds since the index was last found "
                     "current", mountpoint, index["age_s"])
        yield _gauge("lazymount_index_refresh_failing", "1 if the last index refresh failed",
                     mountpoint, 1.0 if index.get("last_error") else 0.0)

        packages = GaugeMetricFamily("lazymount_packages", "packages this mount has "
                                     "handled, by state", labels=["mountpoint", "state"])
        pkgs = status["packages"]
        packages.add_metric([mountpoint, "ready"], pkgs["ready"])
        packages.add_metric([mountpoint, "materializing"], pkgs["materializing"])
        packages.add_metric([mountpoint, "failed"], len(pkgs["failed"]))
        yield packages

        store = status["store"]
        yield _gauge("lazymount_store_bytes", "bytes on disk in the store", mountpoint,
                     store["bytes"])
        yield _gauge("lazymount_store_packages", "packages in the store", mountpoint,
                     store["packages"])
        if store.get("quota_bytes") is not None:
            yield _gauge("lazymount_store_quota_bytes", "size limit of the store",
                         mountpoint, store["quota_bytes"])

        total = CounterMetricFamily("lazymount_fetched_bytes", "bytes received from all "
                                    "mirrors since the mount started", labels=["mountpoint"])
        total.add_metric([mountpoint], status["fetched_bytes"])
        yield total


def _gauge(name: str, documentation: str, mountpoint: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["mountpoint"])
    gauge.add_metric([mountpoint], value)
    return gauge


def exposition(status: dict[str, Any]) -> str:
    """The Prometheus text exposition of a status dict."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


async def serve_http(listeners: list[trio.SocketListener], metrics: Any) -> None:
    """Answer ``GET /metrics`` on ``listeners`` with ``await metrics()`` (the exposition
    text); anything else gets a 404. Runs until cancelled."""

    async def answer(stream: trio.SocketStream) -> None:
        try:
            request = b""
            with trio.move_on_after(10):
                while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST_BYTES:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) >= 2 and line[0] == b"GET" and line[1].split(b"?")[0] == b"/metrics":
                body, code = (await metrics()).encode(), b"200 OK"
                kind = CONTENT_TYPE.encode()
            else:
                body, code, kind = b"not found; try /metrics\n", b"404 Not Found", b"text/plain"
            await stream.send_all(b"HTTP/1.0 " + code + b"\r\nContent-Type: " + kind
                                  + b"\r\nContent-Length: " + str(len(body)).encode()
                                  + b"\r\nConnection: close\r\n\r\n" + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await stream.aclose()

    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        log.info("metrics at http://%s:%d/metrics", host, port)
    await trio.serve_listeners(answer, listeners)  # type: ignore[arg-type]
