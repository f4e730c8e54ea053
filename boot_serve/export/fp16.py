"""fp16 conversion of an fp32 graph that keeps the numerically sensitive parts in fp32 (normalisation,
softmax, the time and guidance embeddings, the uint8 post-process)."""

from __future__ import annotations

import warnings
from pathlib import Path

from boot_serve.export.spec import save_onnx

# Kept in fp32 inside fp16 graphs: normalization statistics (a variance of large activations
# overflows fp16), softmax, and, found by `fp32_nodes`, the sinusoidal time/guidance
# embeddings (sin of arguments up to 1000: fp16 spacing there is 0.5 rad) and the image
# postprocess after the VAE's last convolution (round(255 x) needs more than 11 bits).
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")


def _ancestors(graph, roots: list, stop_ops: tuple[str, ...] = ("Shape",)) -> set[str]:
    """Names of `roots` and every node upstream of them (not crossing `stop_ops`)."""
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.name in seen or node.op_type in stop_ops:
            continue
        seen.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    return seen


def fp32_nodes(graph) -> set[str]:
    """Nodes an fp16 graph keeps in fp32: sinusoidal embeddings and the uint8 postprocess."""
    keep = _ancestors(graph, [n for n in graph.node if n.op_type in ("Sin", "Cos")])
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if out.name == "image" and out.name in producer:
            convs = _ancestors(graph, [n for n in graph.node if n.op_type == "Conv"])
            keep |= _ancestors(graph, [producer[out.name]]) - convs
    return keep


def _remove_cast_round_trips(graph, fp32_producers: set[str]) -> None:
    """The converter casts every fp32-kept node's output to fp16 and back to fp32 for the next
    fp32-kept node, which throws away exactly the precision we keep (and duplicates cast nodes
    when two kept nodes read one tensor). Rewire fp32 -> fp16 -> fp32 pairs to the fp32 source."""
    from onnx import TensorProto

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    fp32 = {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    fp32 |= {o for n in graph.node if n.name in fp32_producers or cast_to(n) == TensorProto.FLOAT for o in n.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == TensorProto.FLOAT and src is not None and cast_to(src) == TensorProto.FLOAT16
                and src.input[0] in fp32):
            rename[node.output[0]] = src.input[0]
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    # Drop casts nobody reads any more (and identical duplicates), until nothing changes.
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        seen_outputs: set[str] = set()
        keep = []
        for n in graph.node:
            dead = n.op_type == "Cast" and (n.output[0] not in used or n.output[0] in seen_outputs)
            if not dead:
                keep.append(n)
                seen_outputs.update(n.output)
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    produced = {o for n in graph.node for o in n.output}
    live = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(live)


def to_fp16(src: Path, dst: Path) -> dict:
    """fp16 copy of an fp32 graph: fp16 weights and activations, fp32 inputs/outputs, the nodes
    of FP32_OPS and `fp32_nodes` in fp32 (ONNX Runtime's float16 converter + a cast cleanup)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = fp32_nodes(onnx.load(str(src), load_external_data=False).graph)
    ops = set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(str(src), keep_io_types=True, op_block_list=sorted(ops),
                                         node_block_list=sorted(keep))
    blocked = keep | {n.name for n in model.graph.node if n.op_type in ops}
    _remove_cast_round_trips(model.graph, blocked)
    save_onnx(model, dst)
    return {"fp32_nodes": len(blocked), "nodes": len(model.graph.node), "fp32_ops": sorted(FP32_OPS)}

