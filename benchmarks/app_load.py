"""Load on the app over loopback: is it fair to every visitor, are its errors clear, does its memory stay flat?

Launches the app on the embedded default (model + copy index) on 127.0.0.1 and, with ``gradio_client``
(each client is its own browser session), measures:

1. a cheap generate (1 clip, the shipped sampler and NFE) alone: p50 / p95 latency;
2. the same while another session sends two max-cost requests at once (4 clips at NFE 50 with
   guidance: the most one request may spend): its p50 / p95 and the ratio to (1); the other session's
   second request is refused at once (one running request per session);
3. 8 concurrent sessions sending cheap generates with bad inputs mixed in: every error must be clear (name
   what was wrong and what is allowed); errors that are not are counted as unclear;
4. the server's resident memory over 200 requests (after a warm-up of 20): first vs last;
5. idle click-to-audio in headless Chromium (Debian's, when installed): from the Generate click to the
   clip's player holding its WAV, at the shipped settings.

Bounded in count and time; loopback only. Writes ``benchmarks/results/app_load.md``.
Run: ``python benchmarks/app_load.py [--requests 200]``
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "app_load.md"
CLEAR = re.compile(r"allowed|valid|must|limit|unknown|at a time|choose", re.I)
BAD_INPUTS = [("no_such_class", "dpmpp_2m", 8, 1.0, 1, 1), ("footstep", "dpmpp_2m", 0, 1.0, 1, 1),
              ("footstep", "dpmpp_2m", 8, 99.0, 1, 1), ("footstep", "heun", 8, 1.0, 1, 1),
              ("footstep", "dpmpp_2m", 8, 1.0, -5, 1), ("footstep", "nope", 8, 1.0, 1, 1),
              ("footstep", "dpmpp_2m", 8, 1.0, 1, 9)]


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cheap(client, seed: int) -> float:
    t = time.perf_counter()
    client.predict("footstep", "dpmpp_2m", 8, 1.0, seed, 1, api_name="/generate")
    return time.perf_counter() - t


def click_to_audio(url: str, rounds: int) -> list[float]:
    """Seconds from a click on Generate to the first player holding the new clip's WAV (headless Chromium)."""
    from playwright.sync_api import expect, sync_playwright
    times = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#generate-btn")).to_be_visible(timeout=60_000)
            link = page.locator("#clip-audio-0 a[download]")
            for r in range(rounds + 1):
                before = link.get_attribute("href") if link.count() else None
                page.locator("#seed input").fill(str(1000 + r))   # a new clip (the same one is cached)
                page.locator("#seed input").press("Tab")
                t = time.perf_counter()
                page.locator("#generate-btn").click()
                page.wait_for_function(
                    "prev => { const a = document.querySelector('#clip-audio-0 a[download]');"
                    " return a && a.getAttribute('href') && a.getAttribute('href') !== prev; }",
                    arg=before, timeout=120_000, polling=20)
                if r:                                    # the first is a warm-up
                    times.append(time.perf_counter() - t)
                page.wait_for_timeout(1500)              # let the neighbours finish before the next click
        finally:
            browser.close()
    return times


def q(xs, p) -> float:
    return float(np.percentile(xs, p)) if len(xs) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests for the memory figure")
    ap.add_argument("--rounds", type=int, default=8, help="cheap generates timed in (1) and (2)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    from gradio_client import Client
    from edmsound import EDMSoundService, build_demo, launch_kwargs
    svc = EDMSoundService.from_paths(ROOT / "checkpoints" / "default", index=ROOT / "checkpoints" / "index")
    demo = build_demo(svc)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            **launch_kwargs(quiet=True))
    deadline = time.time() + 1800
    try:
        b = Client(url, verbose=False)
        cheap(b, 0)                                                   # warm-up
        alone = [cheap(b, i) for i in range(a.rounds)]
        # (2) behind another session's two max-cost requests
        heavy = Client(url, verbose=False)
        refused = []
        behind = []
        for r in range(max(2, a.rounds // 2)):
            jobs = [heavy.submit("rain", "dpmpp_2m", 50, 2.0, 100 + 2 * r + j, 4, api_name="/generate")
                    for j in range(2)]
            time.sleep(0.5)
            behind += [cheap(b, 1000 + 10 * r + i) for i in range(2)]
            for j in jobs:
                try:
                    j.result(timeout=600)
                except Exception as e:              # the session's second request: refused at once
                    refused.append(str(e))
        # (3) 8 sessions, bad inputs mixed in
        unclear, errors, ok = [], 0, 0

        def session(k):
            nonlocal errors, ok
            c = Client(url, verbose=False)
            for i in range(4):
                args = BAD_INPUTS[(k + i) % len(BAD_INPUTS)] if i % 2 else ("footstep", "dpmpp_2m", 8, 1.0, k, 1)
                try:
                    c.predict(*args, api_name="/generate")
                    ok += 1
                except Exception as e:
                    errors += 1
                    if not CLEAR.search(str(e)):
                        unclear.append(str(e)[:200])
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(session, range(8)))
        clicks = click_to_audio(url, 5) if Path("/usr/bin/chromium").exists() else []
        # (4) memory over many requests
        rss = []
        c = Client(url, verbose=False)
        for i in range(a.requests):
            if time.time() > deadline:
                break
            c.predict("footstep", "euler", 1, 1.0, i, 1, api_name="/generate")
            if i in (19, a.requests - 1):
                rss.append(rss_mb())
    finally:
        demo.close()
        svc.close()
    ratio = q(behind, 50) / q(alone, 50)
    growth = 100 * (rss[-1] / rss[0] - 1) if len(rss) == 2 else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = ["# App under load (loopback)", "",
             f"Machine: {cpu}, {os.cpu_count()} cores; date {date.today().isoformat()}. Generated by "
             "`benchmarks/app_load.py`. Targets: a cheap generate behind two max-cost requests of another session "
             "<= 3x its idle latency; 0 unclear errors; resident memory flat (+-5 %) over the requests.", "",
             "| figure | value |", "|---|---|",
             f"| cheap generate alone (1 clip, dpmpp_2m NFE 8), p50 / p95 | {q(alone, 50):.2f} s / {q(alone, 95):.2f} s |",
             f"| the same behind another session's two max-cost requests, p50 / p95 | {q(behind, 50):.2f} s / "
             f"{q(behind, 95):.2f} s |",
             f"| ratio (p50) | {ratio:.2f}x |",
             f"| the other session's second max-cost request | refused at once {len(refused)} of "
             f"{max(2, a.rounds // 2)} times: `{refused[0][:120] if refused else ''}` |",
             f"| 8 sessions, bad inputs mixed in: succeeded / errors / unclear errors | {ok} / {errors} / {len(unclear)} |",
             (f"| idle click-to-audio in Chromium (shipped settings), p50 / max of {len(clicks)} | "
              f"{q(clicks, 50):.2f} s / {max(clicks):.2f} s |" if clicks else
              "| idle click-to-audio | not measured (no /usr/bin/chromium) |"),
             f"| resident memory after request 20 -> {a.requests} | {rss[0]:.0f} MB -> {rss[-1]:.0f} MB "
             f"({growth:+.1f} %) |" if len(rss) == 2 else "| resident memory | not measured (time limit) |"]
    if unclear:
        lines += ["", "Unclear errors:", ""] + [f"- `{u}`" for u in unclear[:10]]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
