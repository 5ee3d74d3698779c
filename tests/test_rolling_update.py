"""Restarts and rolling updates, as the Helm chart runs them (docs/deploy.md).

- After /readyz says ready, a request compiles nothing: with `runtime.warmup: true` (the chart's and the
  images' setting) every bucket is compiled, or loaded from `$INFERFLUX_HOME/xla-cache`, before the server
  answers at all. JAX's own compile log (`JAX_LOG_COMPILES=1`: one "Compiling ..." line per program it lowers,
  a persistent-cache hit included) is the witness; without warm-up the same request does compile, which shows
  the witness can see a compilation.
- A rolling update: two replicas behind a real nginx (Debian's package) on loopback with
  `proxy_next_upstream error timeout http_503 non_idempotent`, clients streaming chat completions through it
  continuously with the real `openai` client; SIGTERM one replica, restart it on its port, then the other:
  zero failed requests and every stream finishes with a finish_reason. The counts and the latency added are
  printed (`pytest -s`) and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
# The chart's settings (warm-up on, a drain window), with few buckets (token buckets 8, 16, 32; one page bucket)
# so a replica's warm-up stays short on two shared cores.
REPLICA = ["runtime.warmup=true", "server.drain_seconds=30", "runtime.max_num_batched_tokens=32",
           "runtime.min_token_bucket=8"]
# The rolling update restarts with the stored executables too, as the chart does (runtime.cache_executables).
ROLLING = [*REPLICA, "runtime.cache_executables=true"]
COMPILING = re.compile(r"^Compiling ", re.M)


def _log(server: Server) -> str:
    server.log.flush()
    return Path(server.log.name).read_text()


def _exercise(url: str) -> None:
    """Requests of several shapes: a short and a long prompt, streamed and not, two samples, a batch of four."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    client.completions.create(model="tiny", prompt="word " * 90, max_tokens=3, n=2)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 20}],
                                            max_tokens=6, stream=True)
    assert [c for c in stream if c.choices and c.choices[0].finish_reason]
    threads = [threading.Thread(target=client.completions.create,
                                kwargs=dict(model="tiny", prompt=f"number {i} " * (i + 1), max_tokens=5))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_nothing_compiles_after_ready(tiny_model):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_LOG_COMPILES", "1")
        srv = Server(tiny_model("llama"), "tiny", REPLICA)
        try:
            at_ready = len(COMPILING.findall(_log(srv)))
            assert at_ready > 0, "the warm-up's programs appear in JAX's compile log"
            _exercise(srv.url)
            after = COMPILING.findall(_log(srv))
            assert len(after) == at_ready, _log(srv)[-3000:]
        finally:
            assert srv.stop() == 0, srv.output()
        # The witness sees a compilation: without warm-up, the first request after ready lowers the step.
        lazy = Server(tiny_model("llama"), "tiny", ["runtime.warmup=false"])
        try:
            at_ready = len(re.findall(r"^Compiling jit\(step\)", _log(lazy), re.M))
            openai.OpenAI(base_url=lazy.url + "/v1", api_key="unused", max_retries=0).completions.create(
                model="tiny", prompt="hello", max_tokens=2)
            assert len(re.findall(r"^Compiling jit\(step\)", _log(lazy), re.M)) > at_ready
        finally:
            assert lazy.stop() == 0, lazy.output()


def _nginx_conf(workdir: Path, port: int, upstreams: list[int]) -> str:
    # max_fails=0: nginx never benches a replica on its own (passive health checks), it retries the other
    # one per request. With max_fails=1 fail_timeout=2s both replicas could be benched at once (the restarted
    # one for a refused connection just before it was ready, the next one for its draining 503), and nginx
    # then answers 502 "no live upstreams" for the rest of the window: a balancer artefact that CI hit.
    # Kubernetes takes a pod out by its readiness probe instead (docs/deploy.md).
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=0;" for p in upstreams)
    temp = "\n".join(f"  {kind}_temp_path {workdir}/{kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
  access_log {workdir}/access.log;
{temp}
  upstream inferflux {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://inferflux;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 120s;
      # A draining replica answers 503 before generating anything, and a stopped one refuses the
      # connection: both are safe to retry on the other replica, POSTs included.
      proxy_next_upstream error timeout http_502 http_503 non_idempotent;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"""


class Nginx:
    def __init__(self, upstreams: list[int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="inferflux-nginx-"))
        self.dir.chmod(0o777)  # workers may run as nobody
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.dir / "nginx.conf"
        conf.write_text(_nginx_conf(self.dir, self.port, upstreams))
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "error.log").read_text()
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("nginx did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class StreamingClients:
    """`n` threads streaming chat completions through the balancer until stopped; every outcome recorded."""

    def __init__(self, url: str, n: int = 2) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.results: list[tuple[float, float, str]] = []  # (start, seconds, "ok" or the error)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            start = time.monotonic()
            try:
                stream = self.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"client {i} request {k}"}],
                    max_tokens=24, stream=True)
                finish, pieces = None, 0
                for chunk in stream:
                    if chunk.choices:
                        pieces += 1
                        finish = chunk.choices[0].finish_reason or finish
                outcome = "ok" if finish in ("stop", "length") and pieces else f"unfinished ({finish}, {pieces})"
            except Exception as exc:  # every failure is counted, whatever raised it
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.results.append((start, time.monotonic() - start, outcome))

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(90)


@pytest.mark.slow
@pytest.mark.skipif(NGINX is None, reason="nginx (Debian's package; .ci/run installs it) is not installed")
def test_rolling_update_without_errors(tiny_model):
    model = tiny_model("llama")
    replicas = [Server(model, "tiny", ROLLING), Server(model, "tiny", ROLLING)]
    nginx = Nginx([r.port for r in replicas])
    clients = None
    try:
        # The names the chart's autoscalers and the gateway read are on a real replica's /metrics.
        text = httpx.get(replicas[0].url + "/metrics").text
        for so_query in _chart_queries():
            assert re.search(rf"^{re.escape(so_query)}\{{", text, re.M), so_query
        clients = StreamingClients(nginx.url)
        time.sleep(3)
        baseline_end = time.monotonic()
        events = []
        for i in range(len(replicas)):
            old = replicas[i]
            t0 = time.monotonic()
            assert old.stop() == 0, old.output()  # SIGTERM: drain, then exit 0
            events.append(("stopped", i, time.monotonic() - t0))
            t0 = time.monotonic()
            replicas[i] = Server(model, "tiny", REPLICA, port=old.port)
            events.append(("ready again", i, time.monotonic() - t0))
            time.sleep(2)
        time.sleep(2)
    finally:
        if clients is not None:
            clients.stop()
        nginx.stop()
        for r in replicas:
            r.stop()
    results = clients.results
    failed = [r for r in results if r[2] != "ok"]
    base = [d for s, d, _ in results if s + d <= baseline_end] or [d for _, d, _ in results]
    during = [d for s, d, _ in results if s + d > baseline_end]
    added = max(during) - statistics.median(base) if during else 0.0
    print(f"\nrolling update: {len(results)} streamed requests, {len(failed)} failed; baseline median "
          f"{statistics.median(base):.3f} s, max during the update {max(during or [0]):.3f} s "
          f"(added {added:.3f} s); {events}")
    assert len(during) > 10, "clients kept streaming through both restarts"
    assert failed == [], failed[:5]


def _chart_queries() -> list[str]:
    """The metric names the chart's KEDA triggers query (deploy/helm/inferflux/templates/scaledobject.yaml)."""
    text = (ROOT / "deploy" / "helm" / "inferflux" / "templates" / "scaledobject.yaml").read_text()
    names = re.findall(r'"(?:sum|avg)\(([a-z_:]+)\{', text)
    assert len(names) == 3, names
    return names
