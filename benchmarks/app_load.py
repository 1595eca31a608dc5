"""Load on ``varlib-app``: concurrent clients against the command on 127.0.0.1, with request batching on and off.

    .venv/bin/python benchmarks/app_load.py --checkpoint outputs/demo/var/model.safetensors

For each setting of ``batch_size`` (``--batch-sizes``, default 8 = batching on, 1 = off) it starts ``varlib-app`` on
a free localhost port, sends a few requests one at a time (the single-request latency, after a warm-up), then
``--clients`` concurrent gradio_client clients that send ``--requests`` Generate requests each (``--count`` images of
one class, client i asking for class i; every request has the same settings, the model file's, seed 0). Prints JSON
per setting: p50 / p95 latency, images/s over the concurrent phase, failed requests, and the server's resident
memory after the warm-up and after the load. Bounded: every request has a timeout, and no request starts after
``--time-limit-s``. Targets (issue 25): no failed request, p95 under 2x the single-request latency with batching
on, memory after within 10% of before. The clients run in this process, on the same CPU as the server.
``model_sampling_s`` is the model's own ``generate`` of the same request in this process (interleaved with the
single requests), ``single_over_model`` the median ratio of the two (issue 41's target: at most 2);
``http_single_s`` and ``http_single_over_model`` the same for the request as the page makes it (Gradio's REST call
and event stream, then the image's GET; :func:`http_request`), without gradio_client's 50 ms polling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
from gradio_client import Client  # noqa: E402

import varlib  # noqa: E402
from varlib.app.service import class_names_of  # noqa: E402

REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(checkpoint: str, batch_size: int, threads: int, folder: Path) -> tuple[subprocess.Popen, str]:
    """``varlib-app`` on 127.0.0.1 with ``batch_size``; returns once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "varlib.cli.app", f"checkpoint={checkpoint}", "device=cpu", f"port={port}",
               f"batch_size={batch_size}", "queue_size=64", "max_images=16", f"cpu_threads={threads}",
               f"hydra.run.dir={folder / f'hydra_{batch_size}'}"]
    log = (folder / f"app_{batch_size}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"varlib-app exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("varlib-app did not answer within 180 s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def http_request(url: str, inputs: list) -> float:
    """One Generate request as the page makes it, in seconds: Gradio's REST call (POST, then the event stream read
    until its ``complete`` event) and the GET of every image it names. gradio_client's event reader polls its
    message queue every 50 ms, so this is the app's own latency."""
    start = time.perf_counter()
    post = urllib.request.Request(f"{url}gradio_api/call/generate", data=json.dumps({"data": inputs}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=REQUEST_TIMEOUT_S) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event_id}", timeout=REQUEST_TIMEOUT_S) as stream:
        event, gallery = None, None
        for line in stream:
            line = line.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"the app answered an error: {line}")
                gallery = json.loads(line.split(":", 1)[1])[0]
                break
    if gallery is None:
        raise RuntimeError(f"the app's event stream for {event_id} ended without a complete event")
    for item in gallery:
        with urllib.request.urlopen(item["image"]["url"], timeout=REQUEST_TIMEOUT_S) as image:
            image.read()
    return time.perf_counter() - start


def measure(checkpoint: str, batch_size: int, args: argparse.Namespace, folder: Path) -> dict:
    var = varlib.load(checkpoint).eval()
    names = class_names_of(var)
    process, url = start_app(checkpoint, batch_size, args.threads, folder)
    server = psutil.Process(process.pid)
    try:
        client = Client(url, verbose=False)

        def request(client: Client, name: str) -> float:
            start = time.perf_counter()
            images = client.predict([name], args.count, api_name="/generate")  # the file's settings, seed 0
            if len(images) != args.count:
                raise RuntimeError(f"expected {args.count} images, got {len(images)}")
            return time.perf_counter() - start

        sampling = var.sampling.resolve()  # the page's defaults: the file's settings, seed 0
        http_inputs = [[names[0]], args.count, sampling["cfg"], min(sampling["top_k"], var.vocab_size),
                       sampling["top_p"], 0]
        for _ in range(2):  # warm-up
            request(client, names[0])
            http_request(url, http_inputs)
        single, http_single, model = [], [], []
        with torch.no_grad():  # the model's own sampling of the same request, in this process
            var.generate([0] * args.count, seed=0)
            for _ in range(args.single):  # interleaved, so that all see the same load
                single.append(request(client, names[0]))
                http_single.append(http_request(url, http_inputs))
                start = time.perf_counter()
                var.generate([0] * args.count, seed=0)
                model.append(time.perf_counter() - start)
        rss_before = server.memory_info().rss

        latencies: list[float] = []
        failures: list[str] = []
        skipped = [0]
        lock = threading.Lock()
        deadline = time.monotonic() + args.time_limit_s

        def run_client(index: int) -> None:
            own = Client(url, verbose=False)
            for _ in range(args.requests):
                if time.monotonic() > deadline:
                    with lock:
                        skipped[0] += 1
                    continue
                try:
                    seconds = request(own, names[index % len(names)])
                    with lock:
                        latencies.append(seconds)
                except Exception as error:  # counted, the load goes on
                    with lock:
                        failures.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
        rss_after = server.memory_info().rss
        return {
            "batch_size": batch_size,
            "single_request_s": round(statistics.median(single), 4),
            "model_sampling_s": round(statistics.median(model), 4),
            "single_over_model": round(statistics.median([a / b for a, b in zip(single, model)]), 2),
            "http_single_s": round(statistics.median(http_single), 4),
            "http_single_over_model": round(statistics.median([a / b for a, b in zip(http_single, model)]), 2),
            "p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
            "p95_s": round(percentile(latencies, 0.95), 4) if latencies else None,
            "p95_over_single": round(percentile(latencies, 0.95) / statistics.median(single), 2) if latencies else None,
            "images_per_s": round(len(latencies) * args.count / wall, 2),
            "requests_ok": len(latencies),
            "requests_failed": len(failures),
            "requests_not_sent": skipped[0],
            "failures": failures[:5],
            "rss_before_mib": round(rss_before / 2**20, 1),
            "rss_after_mib": round(rss_after / 2**20, 1),
            "rss_change": round(rss_after / rss_before - 1, 3),
            "wall_s": round(wall, 1),
        }
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="outputs/demo/var/model.safetensors")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], help="8: batching on, 1: off")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    parser.add_argument("--count", type=int, default=1, help="images per request")
    parser.add_argument("--single", type=int, default=5, help="one-at-a-time requests for the single latency")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--time-limit-s", type=float, default=600, help="no request starts after this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # this process samples beside the app for the model's own time
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"--checkpoint: expected a VAR model file at {args.checkpoint} (make demo writes "
                         "outputs/demo/var/model.safetensors), got nothing there")
    results = []
    with tempfile.TemporaryDirectory(prefix="app_load_") as folder:
        for batch_size in args.batch_sizes:
            results.append(measure(args.checkpoint, batch_size, args, Path(folder)))
            print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"checkpoint": args.checkpoint, "clients": args.clients, "requests": args.requests,
                      "count": args.count, "threads": args.threads, "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
