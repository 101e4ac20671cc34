"""Calibration time on long-window recurrent models (issue 11: 495- and 600-sample windows, 1000 calibration windows).

Builds the two Keras models of ``tests/outside_models.py`` (Conv1D + BiLSTM over 495 samples; BiGRU with a
TFOpLambda over 600), loads each through nilmc's front end with a contract, and times the one statistics pass
and the parameters (techniques) for onnxruntime:int8 on 1000 windows, as a compile does.

    python benchmarks/bench_long_windows.py [--windows 1000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from outside_models import keras_bigru_tfop, keras_conv1d_bilstm, lf_windows  # noqa: E402


def main() -> int:
    from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.frontend import load_model
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.traits import GENERIC_INT8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1000)
    a = ap.parse_args()
    for name, builder, window, layout in (("conv1d-bilstm", keras_conv1d_bilstm, 495, "NWC"), ("bigru-tfop", keras_bigru_tfop, 600, "NW")):
        ds = lf_windows(a.windows, window, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            builder(ds.subset(slice(0, 400)), str(Path(tmp) / "m.keras"))
            stats = FeatureStats.fit(ds.x)
            contract = ModelContract(input_shape=(window, 1, 1), normalization=NormalizationSpec(Normalization.C, stats), appliance="fridge",
                                     target=TargetScaling(float(ds.y.mean()), float(ds.y.std())), on_threshold_w=50.0, layout=layout)
            model = load_model(Path(tmp) / "m.keras", contract=contract)
        q = QuantContext(model, ds)
        t0 = time.perf_counter()
        _ = q.statistics
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        q.params(GENERIC_INT8)
        t_params = time.perf_counter() - t0
        print(f"{name:<14} {window} samples x {a.windows} windows: statistics {t_stats:.1f} s, parameters (techniques) {t_params:.1f} s, "
              f"calibration {t_stats + t_params:.1f} s (budget 60 s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
