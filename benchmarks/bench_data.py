"""Data pipeline throughput: synthesis, feature extraction, shipped-set build (time and peak memory).

Run: ``python benchmarks/bench_data.py [--frames N] [--quick]``. Prints frames/s of waveform
synthesis (bursts of 30-90 cycles, 275 samples each), of feature extraction per setup, of the
two together for T-P, and the wall time and peak memory (tracemalloc peak of numpy/Python
allocations, and the process's max RSS) of building the shipped calib/eval sets into a
temporary directory.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc

import numpy as np

from nilmc.calibration_data.features import extract_features
from nilmc.calibration_data.shipped import SHIPPED_SEED, build_shipped
from nilmc.calibration_data.synth import iter_bursts


def _collect(n_frames: int, seed: int) -> tuple[list, float]:
    t = time.perf_counter()
    bursts, have = [], 0
    for b in iter_bursts(seed, split="test"):
        bursts.append(b)
        have += b.n_frames
        if have >= n_frames:
            break
    return bursts, time.perf_counter() - t


def _bench_shipped() -> None:
    tracemalloc.start()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        m = build_shipped(tmp, seed=SHIPPED_SEED)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    windows = sum(m["sizes"].values())
    size = sum(e["bytes"] for e in m["files"].values())
    print(f"build_shipped      {windows:>8d} windows (train for the statistics + calib + eval) in {dt:5.2f} s; "
          f"files {size / 1e6:.2f} MB; tracemalloc peak {peak / 2**20:.1f} MiB; process max RSS so far {rss_mb:.0f} MiB")


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=60_000, help="frames to synthesize (default 60000 = 1000 s of mains)")
    ap.add_argument("--quick", action="store_true", help="skip the shipped-set build")
    args = ap.parse_args()
    if not args.quick:  # first, so that max RSS reflects the build and not the big arrays below
        _bench_shipped()

    bursts, t_syn = _collect(args.frames, seed=0)
    n = sum(b.n_frames for b in bursts)
    print(f"synthesis          {n:>8d} frames in {t_syn:6.2f} s  -> {n / t_syn:>10,.0f} frames/s  ({len(bursts)} bursts)")
    v = np.concatenate([b.v for b in bursts])
    i = np.concatenate([b.i for b in bursts])
    for setup in ("T-P", "TF-P", "TF-VIP", "TFHF-VIP"):
        dt = _best_of(lambda setup=setup: extract_features(v, i, setup))
        nf = len(extract_features(v[:1], i[:1], setup)[0])
        print(f"features {setup:<9} {n:>8d} frames in {dt:6.2f} s  -> {n / dt:>10,.0f} frames/s  ({nf} features, best of 3)")
    dt_pb = _best_of(lambda: [extract_features(b.v, b.i, "T-P") for b in bursts])
    print(f"synthesis + T-P features, burst by burst             -> {n / (t_syn + dt_pb):>10,.0f} frames/s")


if __name__ == "__main__":
    main()
