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

Speed: every op runs on a whole batch slice at once (``workers`` threads share a batch); conv and dense
products are exact uint8 x int8 onnxruntime GEMMs (codes 0..127 as they are, signed codes split into three
non-negative parts), convs through one strided im2col copy into reused buffers, requantization in place in
int32 (see :class:`intops.IntegerMatmul`, :func:`intops.pot_requantize`). ``benchmarks/bench_dpu.py``
prints windows/s and the time per op.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.dpu.ops import OPS, OpKind, Step, record
from nilmc.compiler.errors import BadInputError
from nilmc.quantization import intops
from nilmc.quantization.intops import DPU_ROUND, Rounding

if TYPE_CHECKING:
    from nilmc.backends.dpu.ir import DpuGraph, DpuOp
    from nilmc.quantization.pot import PotParams

_MIN_WINDOWS_PER_WORKER = 64  # below this a thread hand-off costs more than it saves
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
    ``workers`` (default 2, at most the CPU count) is how many threads share a batch, each on its own
    slice with its own GEMM sessions and buffers (numpy's copies and onnxruntime release the GIL;
    measured on 2 loaded cores: +15% windows/s at batch 1024). Results do not depend on it.
    ``timings`` (seconds per op, summed over calls and workers) feed the benchmark's stage table.
    """

    def __init__(self, graph: DpuGraph, params: PotParams, *, rounding: Rounding = DPU_ROUND, workers: int = 2) -> None:
        unsupported = graph.unsupported
        if unsupported:
            op = unsupported[0]
            raise EmulationError(f"{len(unsupported)} op(s) cannot be emulated, first {op.name!r} ({op.attrs.get('op_type')}): {op.reason}",
                                 SUPPORTED)
        self.graph = graph
        self.params = params
        self.rounding = Rounding.parse(rounding)
        self.workers = max(1, min(int(workers), os.cpu_count() or 1))
        self._caches: list[dict[str, Any]] = []  # per worker: its integer GEMMs and their buffers, built on first use
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.timings: dict[str, float] = {}

    def codes(self, feeds: Mapping[str, np.ndarray], *, batch: int = 1024) -> dict[str, np.ndarray]:
        """int8 codes of every tensor (inputs quantized at their fix point), ``batch`` windows at a time."""
        n = len(next(iter(feeds.values()))) if feeds else 0
        if n > batch:
            parts = [self.codes({k: v[i:i + batch] for k, v in feeds.items()}, batch=batch) for i in range(0, n, batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        workers = min(self.workers, max(1, n // _MIN_WINDOWS_PER_WORKER))
        while len(self._caches) < workers:
            self._caches.append({})
        if workers == 1:
            return self._codes(feeds, self._caches[0])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dpu-emulator")
        bounds = np.linspace(0, n, workers + 1).astype(int)
        slices = [{k: v[lo:hi] for k, v in feeds.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]
        parts = list(self._pool.map(self._codes, slices, self._caches[:workers]))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _codes(self, feeds: Mapping[str, np.ndarray], cache: dict[str, Any]) -> dict[str, np.ndarray]:
        vals: dict[str, np.ndarray] = {}
        for op in self.graph.ops:
            t0 = time.perf_counter()
            vals[op.output] = self._input(op, feeds) if op.kind == OpKind.INPUT else self._run(op, vals, cache)
            dt = time.perf_counter() - t0
            with self._lock:
                self.timings[op.name] = self.timings.get(op.name, 0.0) + dt
        return vals

    def _input(self, op: DpuOp, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if op.name not in feeds:
            raise BadInputError(f"no feed for input {op.name!r}", f"feed {', '.join(self.graph.inputs)}")
        x = np.asarray(feeds[op.name], np.float32)
        return quantize_input(x.reshape(len(x), *op.shape), self.params.fix[op.output], self.rounding)

    def _run(self, op: DpuOp, vals: Mapping[str, np.ndarray], cache: dict[str, Any]) -> np.ndarray:
        return run_op(op, [vals[t] for t in op.inputs], self.params, self.rounding, cache)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph outputs dequantized to float32 (``q * 2**-fo``), keyed by ONNX output name."""
        vals = self.codes(feeds)
        return {name: dequantize(vals[t], self.params.fix[t]) for name, t in self.graph.output_names.items()}


__all__ = ["DpuEmulator", "EmulationError", "record", "run_op"]
