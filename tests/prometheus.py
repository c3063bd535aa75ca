"""A real Prometheus for the tests: Debian's /usr/bin/prometheus (scripts/setup.sh installs it),
started on 127.0.0.1 at a free port, scraping the given targets every second, with its storage
in a temporary folder, and queried over its HTTP API.

    with Prometheus(["127.0.0.1:9123"]) as prom:
        prom.wait_until("up", lambda r: r and r[0][1] == 1, timeout_s=5)
        [(labels, value)] = prom.query("sum(uffdtrace_faults_total)")

Prometheus 2.42 (Debian 12) applies its scrape targets on a 5 s ticker: the first scrape comes
5-6 s after it is ready, whatever the scrape interval. Start it early (its targets need not be
up yet), then wait_targets_up().

Nothing is skipped: without /usr/bin/prometheus, starting fails with a clear error. The process
is terminated (then killed) and waited for on every way out of the `with`, and it gets SIGKILL
from the kernel should the process that started it die first (PR_SET_PDEATHSIG: start it from
a thread that outlives it, such as the main thread).
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

BINARY = Path("/usr/bin/prometheus")
JOB = "uffdtrace"

Labels = dict[str, str]
Vector = list[tuple[Labels, float]]
Matrix = list[tuple[Labels, list[tuple[float, float]]]]


class PrometheusError(RuntimeError):
    """Prometheus could not start, or answered a query with an error."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


class Prometheus:
    """A Prometheus server scraping `targets` ("127.0.0.1:PORT") as job `uffdtrace`."""

    def __init__(self, targets: Sequence[str], *, scrape_interval: str = "1s",
                 scrape_timeout: str = "800ms", metrics_path: str = "/metrics",
                 ready_timeout_s: float = 30.0, binary: Path = BINARY) -> None:
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.scrape_timeout = scrape_timeout
        self.metrics_path = metrics_path
        self.ready_timeout_s = ready_timeout_s
        self.binary = Path(binary)
        self.port = 0
        self.started = 0.0  # time.time() when it became ready
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._stderr: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- start and stop ----------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration file's content (JSON is YAML, so no YAML writer is needed)."""
        return {
            "global": {"scrape_interval": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_timeout},
            "scrape_configs": [{"job_name": JOB, "metrics_path": self.metrics_path,
                                "static_configs": [{"targets": self.targets}]}],
        }

    def __enter__(self) -> Prometheus:
        if not self.binary.exists():
            raise PrometheusError(f"{self.binary} is missing: run scripts/setup.sh as root "
                                  "(it installs Debian's `prometheus` package)")
        self._tmp = tempfile.TemporaryDirectory(prefix="uffdtrace-prometheus-")
        try:
            self._start(Path(self._tmp.name))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _start(self, tmp: Path) -> None:
        config = tmp / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        for attempt in range(3):  # another process may take the free port before Prometheus
            self.port = free_port()
            self._stderr = tmp / f"stderr.{attempt}"
            with self._stderr.open("wb") as err:
                self.proc = subprocess.Popen(
                    [str(self.binary), f"--config.file={config}",
                     f"--storage.tsdb.path={tmp / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     f"--web.console.templates={tmp}", f"--web.console.libraries={tmp}"],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=tmp,
                    preexec_fn=_die_with_parent)
            if self._wait_ready():
                self.started = time.time()
                return
            if "address already in use" not in _tail(self._stderr, 200):
                break
        raise PrometheusError(f"prometheus exited with status {self.proc.returncode} before it "
                              f"was ready; its last output:\n{_tail(self._stderr)}")

    def _wait_ready(self) -> bool:
        """True once /-/ready answers 200; False if the process ended. Raises on timeout."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise PrometheusError(f"prometheus was not ready at {self.url} after {self.ready_timeout_s:g} s; "
                              f"its last output:\n{_tail(self._stderr)}")

    def close(self) -> None:
        """Terminate (then kill) the server, wait for it, and remove its storage."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait()
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            tmp.cleanup()

    def stderr_tail(self, lines: int = 25) -> str:
        """The last lines Prometheus logged (for messages of failed checks)."""
        return _tail(self._stderr, lines) if self._stderr else "(not started)"

    # --- HTTP API ----------------------------------------------------------------------------

    def api(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """`data` of a /api/v1/ call (POSTed as a form, so long expressions fit)."""
        if self.proc is None:
            raise PrometheusError("prometheus is not running")
        body = urllib.parse.urlencode(params or {}).encode()
        req = urllib.request.Request(f"{self.url}/api/v1/{path}", data=body if params else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error
            try:
                answer = json.load(e)
            except ValueError:
                raise PrometheusError(f"/api/v1/{path} {params}: HTTP {e.code}") from e
        if answer.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {answer.get('errorType')}: "
                                  f"{answer.get('error')}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> Vector:
        """An instant query: [(labels, value)] (a scalar comes as [({}, value)])."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [(s["metric"], float(s["value"][1])) for s in result]
        if kind == "scalar":
            return [({}, float(result[1]))]
        raise PrometheusError(f"query {expr!r} gave a {kind}, not an instant vector or scalar")

    def query_range(self, expr: str, start: float, end: float, step: float) -> Matrix:
        """A range query: [(labels, [(unix time, value), ...])]."""
        data = self.api("query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                        "step": f"{step:g}"})
        return [(s["metric"], [(float(t), float(v)) for t, v in s["values"]]) for s in data["result"]]

    def wait_until(self, expr: str, predicate: Callable[[Vector], bool], timeout_s: float = 15.0,
                   poll_s: float = 0.2) -> Vector:
        """Query `expr` until `predicate(result)` holds, and return that result. On timeout,
        raises TimeoutError with the last result. Query errors are raised at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expr!r}: condition not met after {timeout_s:g} s; last result: "
                                   f"{result}; targets: {self.targets_health()}")
            time.sleep(poll_s)

    def targets_health(self) -> dict[str, tuple[str, str]]:
        """Each active target's (health, last scrape error), by its instance."""
        data = self.api("targets?state=active")
        return {t["labels"].get("instance", t["scrapeUrl"]): (t["health"], t.get("lastError", ""))
                for t in data["activeTargets"]}

    def targets_up(self) -> dict[str, bool]:
        """Whether each target's last scrape succeeded, by its instance ("127.0.0.1:PORT")."""
        return {inst: health == "up" for inst, (health, _) in self.targets_health().items()}

    def wait_targets_up(self, timeout_s: float = 10.0) -> None:
        """Wait until every target has been scraped successfully (`up` == 1 for each)."""
        n = len(self.targets)
        self.wait_until(f'up{{job="{JOB}"}}', lambda r: len(r) == n and all(v == 1 for _, v in r),
                        timeout_s)
