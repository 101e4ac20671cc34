"""Put the bias and activation of a squeezed convolution back on the convolution (an FP32-exact rewrite).

tf2onnx exports a Keras ``Conv1D`` as ``Unsqueeze -> Conv(x, W) -> Squeeze -> Add(b) -> Relu``: the bias comes
after the Squeeze, so :func:`nilmc.quantization.graph.analyze` cannot fuse it into the layer, and the pre-bias
convolution output becomes a quantization point of its own. That tensor carries the bias offset (values far
from the post-bias ones), so its 8-bit grid is coarse exactly where the ReLU decides: measured on the CtRNN
(seed 002, 4 appliances; generic INT8 on onnxruntime), quantizing only the pre-bias output of ``block3_conv1``
cost 31 points of weighted F1 on its own.

:func:`fold_squeezed_conv_bias` rewrites each ``Conv(x, W) -> Squeeze(axes) -> Add(b) [-> act]`` (``b`` a
per-output-channel constant, ``axes`` not touching the batch or channel axis, ``act`` one of Relu, LeakyRelu,
Clip) into ``Conv(x, W, b) [-> act] -> Squeeze(axes)``: a per-channel bias and an element-wise activation
commute with dropping unit axes, so the result is the same function (up to the float rounding of adding the
bias inside the convolution), and every later stage sees the plain fused layer. Names of the tensors the rest
of the graph reads are kept.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Clip"})


def _only_user(tensor: str, users: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> onnx.NodeProto | None:
    found = users.get(tensor, [])
    return found[0] if len(found) == 1 and tensor not in outputs else None


def _squeeze_axes(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[int] | None:
    if len(node.input) > 1:
        axes = consts.get(node.input[1])
        return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]
    attr = next((a for a in node.attribute if a.name == "axes"), None)
    return None if attr is None else [int(a) for a in attr.ints]


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def fold_squeezed_conv_bias(model: onnx.ModelProto) -> list[str]:
    """Rewrite ``model`` in place (module docstring, then :func:`fold_transposed_conv_bias`); returns the names of the
    Conv / ConvTranspose nodes rewritten."""
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    taken = {t for n in g.node for t in (*n.input, *n.output)} | set(consts) | {n.name for n in g.node}
    done: list[str] = []
    changed = True
    while changed:  # one rewrite per pass: the consumer map is rebuilt after each
        changed = False
        users: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        for conv in g.node:
            if conv.op_type != "Conv" or len(conv.input) != 2 or conv.input[1] not in consts or conv.name in done:
                continue
            w = consts[conv.input[1]]
            channels, rank = int(w.shape[0]), int(w.ndim)  # the output is (N, C, spatial...) of the weight's rank
            sq = _only_user(conv.output[0], users, outputs)
            if sq is None or sq.op_type != "Squeeze":
                continue
            axes = _squeeze_axes(sq, consts)
            if not axes or any((a % rank) < 2 for a in axes):  # only spatial unit axes: batch and channel stay put
                continue
            add = _only_user(sq.output[0], users, outputs)
            if add is None or add.op_type != "Add" or len(add.input) != 2:
                continue
            other = add.input[1] if add.input[0] == sq.output[0] else add.input[0]
            if other not in consts:
                continue
            b = consts[other]
            out_rank = rank - len(set(a % rank for a in axes))
            # per output channel: C values on the channel axis (axis 1, i.e. out_rank - 1 from the end) of the squeezed tensor
            if b.size != channels or not (channels == 1 or (b.ndim >= out_rank - 1 and b.shape[b.ndim - (out_rank - 1)] == channels)):
                continue
            act = _only_user(add.output[0], users, outputs)
            act = act if act is not None and act.op_type in _ACTIVATIONS and act.input[0] == add.output[0] else None
            final = (act or add).output[0]  # what the rest of the graph reads: keeps its name
            bias_name = _fresh(f"{conv.name}/bias", taken)
            g.initializer.append(numpy_helper.from_array(b.reshape(channels).astype(w.dtype), bias_name))
            conv.input.append(bias_name)
            pre = conv.output[0]
            if act is not None:
                act_out = _fresh(f"{conv.name}/activated", taken)
                new_act = helper.make_node(act.op_type, [pre, *act.input[1:]], [act_out], name=act.name)
                new_act.attribute.extend(act.attribute)
                pre = act_out
            new_sq = helper.make_node("Squeeze", [pre, *sq.input[1:]], [final], name=sq.name)
            new_sq.attribute.extend(sq.attribute)
            stale = {sq.output[0], add.output[0]} - {final}
            kept = [n for n in g.node if n is not sq and n is not add and n is not act]
            at = kept.index(conv) + 1
            replacement = ([new_act] if act is not None else []) + [new_sq]
            del g.node[:]
            g.node.extend(kept[:at] + replacement + kept[at:])
            vi = [v for v in g.value_info if v.name not in stale]
            del g.value_info[:]
            g.value_info.extend(vi)
            if not any(other in n.input for n in g.node):  # the old bias constant, now read by nothing
                inits = [t for t in g.initializer if t.name != other]
                del g.initializer[:]
                g.initializer.extend(inits)
            consts[bias_name] = b.reshape(channels)
            done.append(conv.name)
            changed = True
            break
    return done + fold_transposed_conv_bias(model)


_CROPS = frozenset({"Slice", "Pad", "Squeeze"})  # what tf2onnx puts between a ConvTranspose and its bias ("same" output crop)


def _probe_outputs(model: onnx.ModelProto) -> list[np.ndarray] | None:
    """The graph outputs on a fixed random batch of 2 (None when the input shape is not static or the graph fails)."""
    from nilmc.quantization import _ort

    inits = {t.name for t in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in inits]
    if len(inp) != 1:
        return None
    dims = [d.dim_value for d in inp[0].type.tensor_type.shape.dim][1:]
    if not dims or any(d <= 0 for d in dims):
        return None
    x = np.random.default_rng(0).normal(0.0, 1.0, (2, *dims)).astype(np.float32)
    try:
        return list(_ort.run(model, x, [o.name for o in model.graph.output]).values())
    except Exception:  # onnxruntime's own errors: the probe cannot judge, so nothing is rewritten
        return None


def _topological_sort(g: onnx.GraphProto) -> None:
    """Reorder ``g.node`` so every node follows its producers (stable: the order is kept where it already holds)."""
    available = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle or a missing input: leave the rest as it was (the probe will reject it)
            ordered += rest
            break
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def fold_transposed_conv_bias(model: onnx.ModelProto) -> list[str]:
    """The same for tf2onnx's ``Conv1DTranspose``: ``ConvTranspose(x, W) -> Slice/Pad/Squeeze... -> Add(b) [-> act]``
    becomes ``ConvTranspose(x, W, b) [-> act] -> Slice/Pad/Squeeze...``, so the pre-bias transposed-convolution output
    is no longer rounded to 8 bits on its own (on the CtRNN it alone cost 5 points of weighted F1). A crop commutes
    with a per-channel bias and an activation; a Pad only when it pads nothing (tf2onnx computes its amounts at run
    time), so each rewrite is kept only when the graph's outputs on a probe batch are unchanged (else undone).
    Returns the ConvTranspose nodes rewritten."""
    g = model.graph
    if not any(n.op_type == "ConvTranspose" for n in g.node):
        return []
    before = _probe_outputs(model)
    if before is None:
        return []
    done: list[str] = []
    for conv in [n for n in g.node if n.op_type == "ConvTranspose"]:
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        if len(conv.input) != 2 or conv.input[1] not in consts:
            continue
        users: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        outputs = {o.name for o in g.output}
        w = consts[conv.input[1]]
        group = next((int(a.i) for a in conv.attribute if a.name == "group"), 1)
        channels = int(w.shape[1]) * group  # ConvTranspose weights are (C_in, C_out / group, k...)
        chain, t = [], conv.output[0]
        while True:  # Shape readers beside the chain are fine: every tensor keeps its shape
            readers = [u for u in users.get(t, []) if u.op_type != "Shape"]
            nxt = readers[0] if len(readers) == 1 and t not in outputs else None
            if nxt is None or nxt.op_type not in _CROPS or nxt.input[0] != t:
                break
            chain.append(nxt)
            t = nxt.output[0]
        add = _only_user(t, users, outputs)
        if not chain or add is None or add.op_type != "Add" or len(add.input) != 2:
            continue
        other = add.input[1] if add.input[0] == t else add.input[0]
        if other not in consts or consts[other].size != channels:
            continue
        act = _only_user(add.output[0], users, outputs)
        act = act if act is not None and act.op_type in _ACTIVATIONS and act.input[0] == add.output[0] else None
        saved = onnx.ModelProto()
        saved.CopyFrom(model)
        taken = {x for n in g.node for x in (*n.input, *n.output)} | set(consts) | {n.name for n in g.node}
        bias_name = _fresh(f"{conv.name}/bias", taken)
        g.initializer.append(numpy_helper.from_array(consts[other].reshape(channels).astype(w.dtype), bias_name))
        conv.input.append(bias_name)
        final = (act or add).output[0]
        head = conv.output[0]
        new_nodes: list[onnx.NodeProto] = []
        if act is not None:
            act_out = _fresh(f"{conv.name}/activated", taken)
            new_act = helper.make_node(act.op_type, [head, *act.input[1:]], [act_out], name=act.name)
            new_act.attribute.extend(act.attribute)
            new_nodes.append(new_act)
            head = act_out
            for n in g.node:  # a Shape of the raw output reads the activated one (same shape): the activation then fuses
                if n.op_type == "Shape" and n.input[0] == conv.output[0]:
                    n.input[0] = act_out
        for i, c in enumerate(chain):  # the crop chain, now after the activation; the last one writes the old name
            out = final if i == len(chain) - 1 else _fresh(f"{c.output[0]}/after_bias", taken)
            n = helper.make_node(c.op_type, [head, *c.input[1:]], [out], name=c.name)
            n.attribute.extend(c.attribute)
            new_nodes.append(n)
            head = out
        drop = {id(n) for n in (*chain, add, *([act] if act is not None else []))}
        kept = [n for n in g.node if id(n) not in drop]
        aux = {x for c in chain for x in c.input[1:]}  # the crop's starts / ends / pads: their producers come first
        at = max([kept.index(conv), *(i for i, p in enumerate(kept) if set(p.output) & aux)]) + 1
        del g.node[:]
        g.node.extend(kept[:at] + new_nodes + kept[at:])
        _topological_sort(g)  # the Shape readers moved behind the activation
        stale = {x for c in chain for x in c.output} | {add.output[0]}
        stale.discard(final)
        vi = [v for v in g.value_info if v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(vi)
        after = _probe_outputs(model)
        if after is None or len(after) != len(before) or not all(
                a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-4 * (1.0 + float(np.max(np.abs(b))))) for a, b in zip(after, before)):
            model.CopyFrom(saved)  # a Pad that pads something, or any other difference: not the same function, undone
            continue
        done.append(conv.name)
    return done


BN_RTOL = 1e-4  # the folded graph must match the original this closely (relative to max |output|) on the probe batch


def fold_conv_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold an inference ``BatchNormalization`` that directly follows a ``Conv`` (or a ``Gemm`` with a constant
    weight) into that layer's weight and bias, in place; returns the names of the BatchNormalization nodes removed.

    What ``torch.onnx.export`` writes for ``Conv1d/Conv2d -> BatchNorm`` (and ``Linear -> BatchNorm1d``) in eval mode:
    the BN is a per-output-channel affine ``y = (x - mean) * g / sqrt(var + eps) + beta``, so with
    ``k = g / sqrt(var + eps)``: ``W'[c] = W[c] * k[c]``, ``b'[c] = (b[c] - mean[c]) * k[c] + beta[c]``. Left as it is,
    the BN is a float op between two quantization points that no weighted layer owns (the DPU, TFLite and eIQ
    refuse it; onnxruntime quantizes the un-normalized conv output on its own grid). The fold is applied only when
    the layer's output has the BN as its only reader, every BN parameter and the layer's weight (and bias) are
    constants read by nothing else, and the BN has one output; it is then checked on a random probe batch
    (:data:`BN_RTOL`): a graph that differs is restored.
    """
    g = model.graph
    before = onnx.ModelProto()
    before.CopyFrom(model)
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    outputs = {o.name for o in g.output}
    uses: dict[str, int] = {}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
            users.setdefault(i, []).append(n)
    taken = {t for n in g.node for t in (*n.input, *n.output)} | set(consts) | {n.name for n in g.node}
    folded: list[str] = []
    drop: set[str] = set()  # BN parameter initializers
    gone: list[onnx.NodeProto] = []  # the BN nodes
    for layer in list(g.node):
        if layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 2 or layer.input[1] not in consts or uses.get(layer.input[1]) != 1:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.attribute}
        if layer.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue  # W' and b' below assume Y = X @ W(^T) + C
        bn = _only_user(layer.output[0], users, outputs)
        if bn is None or bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1 or bn.input[0] != layer.output[0]:
            continue
        if any(p not in consts or uses.get(p) != 1 for p in bn.input[1:5]):
            continue
        w = consts[layer.input[1]].astype(np.float64)
        axis = 0 if layer.op_type == "Conv" or attrs.get("transB", 0) else 1  # the output-channel axis of the weight as stored
        channels = int(w.shape[axis])
        gamma, beta, mean, var = (consts[p].astype(np.float64).reshape(-1) for p in bn.input[1:5])
        if not all(a.size == channels for a in (gamma, beta, mean, var)):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + eps)
        has_bias = len(layer.input) > 2 and layer.input[2] != ""
        if has_bias and (layer.input[2] not in consts or uses.get(layer.input[2]) != 1):
            continue
        b = consts[layer.input[2]].astype(np.float64).reshape(-1) if has_bias else np.zeros(channels)
        shape = [1] * w.ndim
        shape[axis] = channels
        new_w = (w * k.reshape(shape)).astype(np.float32)
        new_b = ((b - mean) * k + beta).astype(np.float32)
        bias_name = layer.input[2] if has_bias else _fresh(f"{layer.name}/bias_folded", taken)
        for t in g.initializer:
            if t.name == layer.input[1]:
                t.CopyFrom(numpy_helper.from_array(new_w, t.name))
            elif has_bias and t.name == bias_name:
                t.CopyFrom(numpy_helper.from_array(new_b.reshape(consts[bias_name].shape), t.name))
        if not has_bias:  # Conv's B, or Gemm's C ((channels,) broadcasts over the batch)
            g.initializer.append(numpy_helper.from_array(new_b, bias_name))
            layer.input.append(bias_name)
        layer.output[0] = bn.output[0]  # the layer now writes what the BN wrote; the BN goes
        gone.append(bn)
        drop.update(bn.input[1:5])
        folded.append(bn.name)
    if not folded:
        return []
    kept = [n for n in g.node if not any(n is b for b in gone)]
    del g.node[:]
    g.node.extend(kept)
    inits = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(inits)
    ref, got = _probe_outputs(before), _probe_outputs(model)
    if ref is not None and (got is None or any(
            float(np.max(np.abs(a - b), initial=0.0)) > BN_RTOL * max(float(np.max(np.abs(a), initial=0.0)), 1e-12)
            for a, b in zip(ref, got))):
        model.CopyFrom(before)  # not exact on the probe: keep the graph as it was
        return []
    return folded
