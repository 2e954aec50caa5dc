"""The status as Prometheus metrics: the text exposition (``lazymount status --prometheus``)
and a small HTTP endpoint for it (``metrics_listen = "127.0.0.1:9101"``).

The metrics are made from the status dict (``service.status.collect``), so both always say
the same; prometheus-client writes the exposition format. It is imported when metrics are
first asked for, not at every mount's start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # trio: the endpoint's only; `lazymount status --prometheus` needs none
    import trio
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_BYTES = 8192


class _StatusCollector:
    """The metrics of one or more mounts' statuses: one family per name, one sample (set)
    per mount, labelled with its mount point."""

    def __init__(self, statuses: list[dict[str, Any]]):
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        info = InfoMetricFamily("lazymount", "the running lazymount", labels=["mountpoint"])
        up = GaugeMetricFamily("lazymount_mirror_up", "1 if the mirror's last request "
                               "succeeded, 0 if it failed or was not made yet",
                               labels=["mountpoint", "url", "layout"])
        mirror_bytes = CounterMetricFamily("lazymount_mirror_fetched_bytes", "bytes "
                                           "received from the mirror since the mount started",
                                           labels=["mountpoint", "url"])
        gauges = {name: GaugeMetricFamily(name, text, labels=["mountpoint"]) for name, text in (
            ("lazymount_index_packages", "packages the mounted index lists"),
            ("lazymount_index_age_seconds", "seconds since the index was last found current"),
            ("lazymount_index_refresh_failing", "1 if the last index refresh failed"),
            ("lazymount_store_bytes", "bytes on disk in the store"),
            ("lazymount_store_packages", "packages in the store"),
            ("lazymount_store_quota_bytes", "size limit of the store"),
        )}
        proxy_up = GaugeMetricFamily("lazymount_proxy_up", "1 if the proxy is in use, 0 while "
                                     "it rests after a failure",
                                     labels=["mountpoint", "proxy", "group"])
        proxy_failures = GaugeMetricFamily("lazymount_proxy_failures", "the proxy's failures "
                                           "in a row", labels=["mountpoint", "proxy", "group"])
        packages = GaugeMetricFamily("lazymount_packages", "packages this mount has "
                                     "handled, by state", labels=["mountpoint", "state"])
        fetched = CounterMetricFamily("lazymount_fetched_bytes", "bytes received from all "
                                      "mirrors since the mount started", labels=["mountpoint"])
        for status in self.statuses:
            mountpoint = status["mountpoint"]
            info.add_metric([mountpoint], {"version": status["version"],
                                           "pid": str(status["pid"]),
                                           "host_target": status.get("host", {}).get("target",
                                                                                      "")})
            for mirror in status["mirrors"]:
                layout = f"v{mirror['layout']}" if mirror["layout"] else ""
                up.add_metric([mountpoint, mirror["url"], layout],
                              1.0 if mirror["state"] == "ok" else 0.0)
                mirror_bytes.add_metric([mountpoint, mirror["url"]],
                                        mirror.get("fetched_bytes", 0))
            for proxy in status.get("proxies", []):
                labels = [mountpoint, proxy["proxy"], str(proxy["group"] + 1)]
                proxy_up.add_metric(labels, 1.0 if proxy["up"] else 0.0)
                proxy_failures.add_metric(labels, proxy["failures"])
            index, store, pkgs = status["index"], status["store"], status["packages"]
            values = {
                "lazymount_index_packages": index["packages"],
                "lazymount_index_age_seconds": index["age_s"],
                "lazymount_index_refresh_failing": 1.0 if index.get("last_error") else 0.0,
                "lazymount_store_bytes": store["bytes"],
                "lazymount_store_packages": store["packages"],
                "lazymount_store_quota_bytes": store.get("quota_bytes"),
            }
            for name, value in values.items():
                if value is not None:
                    gauges[name].add_metric([mountpoint], value)
            for state in ("ready", "materializing"):
                packages.add_metric([mountpoint, state], pkgs[state])
            packages.add_metric([mountpoint, "failed"], len(pkgs["failed"]))
            packages.add_metric([mountpoint, "opened"], len(pkgs.get("opened", [])))
            fetched.add_metric([mountpoint], status["fetched_bytes"])
        yield from (info, up, mirror_bytes, proxy_up, proxy_failures, *gauges.values(),
                    packages, fetched)


def exposition(*statuses: dict[str, Any]) -> str:
    """The Prometheus text exposition of the status dicts of one or more mounts."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(list(statuses)))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


async def serve_http(listeners: list[trio.SocketListener], metrics: Any) -> None:
    """Answer ``GET /metrics`` on ``listeners`` with ``await metrics()`` (the exposition
    text); anything else gets a 404. Runs until cancelled."""
    import trio

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
