"""Where `nilmc example`'s time goes: one compile of the shipped model for every available target, per stage.

Prints the wall time and peak RSS of the whole compile, the shared stages (FP32 reference,
the one statistics pass, the techniques per traits set — each run once and shared by every
target whose traits derive the same parameters), and per target the lowering time (which
includes the shared stages the first target to need them pays) and the verification time
(the artifact over the evaluation set, plus batch-1 latency where measured).

    python benchmarks/bench_compile_stages.py [--targets all] [--repeat 1] [--jobs 1|2]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def run_once(targets: str, jobs: int = 1) -> tuple[float, object]:
    from nilmc.backends.registry import default_registry
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.shipped import shipped_paths
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.compiler.frontend import load_model

    p = shipped_paths()
    reg = default_registry()
    t0 = time.perf_counter()
    model = load_model(p["keras"])
    with tempfile.TemporaryDirectory() as tmp:
        summary = compile_model(model, NilmDataset.load(p["eval"]), reg.parse_targets(targets), Path(tmp) / "out",
                                calib=NilmDataset.load(p["calib"]), registry=reg, options=CompileOptions(jobs=jobs))
    return time.perf_counter() - t0, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="1: every target here (per-target times are clean); 2: a worker process too")
    a = ap.parse_args()
    walls = []
    summary = None
    for _ in range(a.repeat):
        wall, summary = run_once(a.targets, a.jobs)
        walls.append(wall)
    assert summary is not None
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"compile of the shipped model, {len(summary.results)} targets: wall {min(walls):.1f} s (best of {len(walls)}), "
          f"peak RSS {peak_mb:.0f} MiB, exit code {summary.exit_code}")
    st = summary.stages_s
    print(f"  shared: load+reference {st.get('reference', 0):.2f} s, statistics pass {st.get('statistics', 0):.2f} s, "
          f"techniques {sum(st.get('techniques', {}).values()):.2f} s "
          + "(" + ", ".join(f"{k} {v:.2f}" for k, v in st.get("techniques", {}).items()) + ")")
    print(f"  {'target':<20} {'lower s':>8} {'verify s':>9} {'dEACC pts':>10} {'SQNR dB':>8}  verification")
    for r in summary.results:
        row = r.row()
        d = "-" if row["delta_eacc_pts"] is None else f"{row['delta_eacc_pts']:+.3f}"
        q = "-" if row["output_sqnr_db"] is None else f"{row['output_sqnr_db']:.1f}"
        print(f"  {row['target']:<20} {r.compile_s:>8.2f} {r.verify_s:>9.2f} {d:>10} {q:>8}  {row['verification']}")
    lower = sum(r.compile_s for r in summary.results)
    verify = sum(r.verify_s for r in summary.results)
    print(f"  sum: lowering {lower:.1f} s, verification {verify:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
