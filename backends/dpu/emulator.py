"""Bit-accurate emulation of the DPU's fixed-point ops: a composition of :mod:`nilmc.quantization.intops`.

The arithmetic follows the Vitis AI runtime's CPU reference ops (``conv2d-fix``, ``eltwise-fix``,
``pool-fix`` of the VART cpu-runner); each op's semantics is one ``intops`` reference function,
reached through the op table (:data:`nilmc.backends.dpu.ops.OPS`):

* **conv2d-fix / inner product**: exact integer accumulator (:class:`intops.IntegerMatmul`), bias
  added as ``b_q * 2**shift_bias``, ReLU / LeakyReLU (26/256) on the exact value, **one** rounding
  by ``2**shift_cut`` and saturation (:func:`intops.pot_requantize`);
* **eltwise add**: :func:`intops.pot_eltwise_add` (7 fraction bits, floor alignment);
* **max / average pool**: :func:`intops.pot_max_pool`, :func:`intops.pot_avg_pool` (``N / 2**M``);
* input quantized with :func:`intops.pot_quantize`, outputs dequantized ``q * 2**-fo``.

DPU_ROUND is round half up (``floor(x + 0.5)``: -2.5 -> -2). ``rounding`` can be set to
``HALF_EVEN`` to reproduce onnxruntime's QuantizeLinear, which is how the emulator is
cross-checked against the power-of-two QDQ graph (ties are the only place the two differ).

Speed: every op runs on 128 windows at once (:data:`CHUNK`, cache-sized); conv and dense
products are exact uint8 x int8 onnxruntime GEMMs (codes 0..127 as they are, signed codes split into three
non-negative parts), convs through one strided im2col copy into reused buffers, requantization in place in
int32 (see :class:`intops.IntegerMatmul`, :func:`intops.pot_requantize`). ``benchmarks/bench_dpu.py``
prints windows/s and the time per op.
"""
from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.dpu.ops import OPS, OpKind, Step, record
from nilmc.compiler.errors import BadInputError
from nilmc.quantization import intops
from nilmc.quantization.intops import DPU_ROUND, Rounding

if TYPE_CHECKING:
    from nilmc.backends.dpu.ir import DpuGraph, DpuOp
    from nilmc.quantization.pot import PotParams

# Windows per pass through the graph: a pass's patches and accumulators stay in cache. Measured on the
# T-P model (2 loaded cores): 128 -> 12,600 windows/s, 64 -> 12,200, 256 -> 8,100, 1024 -> 8,400.
CHUNK = 128
SUPPORTED = "the DPU emulation covers conv, dense, pooling, add, ReLU and LeakyReLU"


class EmulationError(BadInputError):
    """The graph holds an op the DPU emulation cannot run."""


# --------------------------------------------------------------------------- single ops (kept for callers and tests)
def quantize_input(x: np.ndarray, fix_point: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Float input -> int8 codes at ``fix_point`` (:func:`intops.pot_quantize`)."""
    return intops.pot_quantize(x, fix_point, rounding=rounding)


def dequantize(q: np.ndarray, fix_point: int) -> np.ndarray:
    return intops.pot_dequantize(q, fix_point)


requantize = intops.pot_requantize
avgpool_factors = intops.avgpool_factors


def avgpool(q: np.ndarray, attrs: Mapping[str, Any], fi: int, fo: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    return intops.pot_avg_pool(q, attrs["kernel"], attrs["stride"], attrs["pads"], fi, fo, rounding)


def run_op(op: DpuOp, args: list[np.ndarray], params: PotParams, rounding: Rounding = DPU_ROUND,
           cache: dict[str, Any] | None = None) -> np.ndarray:
    """int8 codes of ``op``'s output from its inputs' codes (the op table's ``emulate``)."""
    rec = OPS.get(OpKind(op.kind))
    if rec is None or rec.emulate is None:
        raise EmulationError(f"op {op.name!r} ({op.attrs.get('op_type', op.kind)}) has no DPU emulation: {op.reason or op.kind}",
                             "remove or replace the op (the DPU runs conv, dense, pooling, add, ReLU, LeakyReLU)")
    step = Step([params.fix[t] for t in op.inputs], params.fix[op.output], params.weights.get(op.name), rounding,
                {} if cache is None else cache)
    return rec.emulate(op, args, step)


# --------------------------------------------------------------------------- the whole graph
class DpuEmulator:
    """Runs a :class:`DpuGraph` with DPU parameters in exact integers.

    ``rounding`` (default DPU_ROUND) applies to input quantization and every requantization.
    ``timings`` (seconds per op, summed over calls) feed the benchmark's stage table.
    """

    def __init__(self, graph: DpuGraph, params: PotParams, *, rounding: Rounding = DPU_ROUND) -> None:
        unsupported = graph.unsupported
        if unsupported:
            op = unsupported[0]
            raise EmulationError(f"{len(unsupported)} op(s) cannot be emulated, first {op.name!r} ({op.attrs.get('op_type')}): {op.reason}",
                                 SUPPORTED)
        self.graph = graph
        self.params = params
        self.rounding = Rounding.parse(rounding)
        self._cache: dict[str, Any] = {}  # per-op integer GEMMs and their buffers, built on first use
        self.timings: dict[str, float] = {}

    def codes(self, feeds: Mapping[str, np.ndarray], *, batch: int = CHUNK) -> dict[str, np.ndarray]:
        """int8 codes of every tensor (inputs quantized at their fix point), ``batch`` windows per pass (default 128)."""
        return self._chunked(feeds, None, batch)

    def _chunked(self, feeds: Mapping[str, np.ndarray], keep: Collection[str] | None, batch: int) -> dict[str, np.ndarray]:
        """The codes of ``keep`` (None: every tensor), the graph run on ``batch`` windows at a time."""
        n = len(next(iter(feeds.values()))) if feeds else 0
        if n <= batch:
            return self._pass(feeds, keep)
        parts = [self._pass({k: v[i:i + batch] for k, v in feeds.items()}, keep) for i in range(0, n, batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _pass(self, feeds: Mapping[str, np.ndarray], keep: Collection[str] | None) -> dict[str, np.ndarray]:
        vals: dict[str, np.ndarray] = {}
        for op in self.graph.ops:
            t0 = time.perf_counter()
            vals[op.output] = self._input(op, feeds) if op.kind == OpKind.INPUT else self._run(op, vals)
            self.timings[op.name] = self.timings.get(op.name, 0.0) + time.perf_counter() - t0
        return vals if keep is None else {t: vals[t] for t in keep}

    def _input(self, op: DpuOp, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if op.name not in feeds:
            raise BadInputError(f"no feed for input {op.name!r}", f"feed {', '.join(self.graph.inputs)}")
        x = np.asarray(feeds[op.name], np.float32)
        return quantize_input(x.reshape(len(x), *op.shape), self.params.fix[op.output], self.rounding)

    def _run(self, op: DpuOp, vals: Mapping[str, np.ndarray]) -> np.ndarray:
        return run_op(op, [vals[t] for t in op.inputs], self.params, self.rounding, self._cache)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph outputs dequantized to float32 (``q * 2**-fo``), keyed by ONNX output name."""
        vals = self._chunked(feeds, set(self.graph.output_names.values()), CHUNK)
        return {name: dequantize(vals[t], self.params.fix[t]) for name, t in self.graph.output_names.items()}


__all__ = ["DpuEmulator", "EmulationError", "record", "run_op"]
