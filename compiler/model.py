"""A model as nilmc sees it: an ONNX graph (the canonical form) plus its contract."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from nilmc.compiler.contract import CONTRACT_KEY, ModelContract

# onnxruntime 1.31 rejects IR 14; every graph nilmc writes uses IR 10.
ONNX_IR_VERSION = 10
ONNX_OPSET = 17


@dataclass
class Model:
    graph: onnx.ModelProto
    contract: ModelContract
    source: str = ""  # where it came from (path), for messages and manifests
    keras_path: str | None = None  # original Keras file, when there is one (TFLite/QAT need it)

    def with_contract_metadata(self) -> onnx.ModelProto:
        """A copy of the graph with the contract stored in ``metadata_props``."""
        m = onnx.ModelProto()
        m.CopyFrom(self.graph)
        keep = [p for p in m.metadata_props if p.key != CONTRACT_KEY]
        del m.metadata_props[:]
        m.metadata_props.extend(keep)
        entry = m.metadata_props.add()
        entry.key, entry.value = CONTRACT_KEY, self.contract.dumps()
        m.ir_version = min(m.ir_version or ONNX_IR_VERSION, ONNX_IR_VERSION)
        return m

    def serialize(self) -> bytes:
        data: bytes = self.with_contract_metadata().SerializeToString(deterministic=True)
        return data

    def save_onnx(self, path: str | Path) -> Path:
        from nilmc.compiler.io import atomic_write_bytes

        return atomic_write_bytes(path, self.serialize())

    @property
    def input_name(self) -> str:
        name: str = self.graph.graph.input[0].name
        return name

    @property
    def output_name(self) -> str:
        name: str = self.graph.graph.output[0].name
        return name
