"""Kernels per decoder layer of the rollout engine's decode step, counted from its compiled graph.

    python -m benchmarks.static.step_kernels            # CPU: tiny NF4 + LoRA Llama, kernels in the interpreter

The decode step is traced as torch.compile does on CUDA (one graph, dynamo then AOT autograd's
functionalised ATen graph) and its nodes are counted the way inductor turns them into kernels:

- **extern**: each matmul (mm/addmm/bmm), attention (scaled_dot_product_*), cache write
  (index_copy/index_put/scatter) and custom op (grpo_fast::nf4_decode, grpo_fast::decode_attention)
  is one kernel of its own;
- **fused**: the remaining compute nodes (element-wise, reductions, cat) inside the decoder layers
  form one kernel per group of nodes joined by data edges, an edge u -> v joining them unless an
  extern kernel lies on a path from u to v (it has to run between them: the residual add after the
  MLP cannot join the norm before it). Inductor fuses such groups; it may split one where iteration
  shapes differ, so this can undercount those. Nodes outside the layers (rotary tables, embedding,
  final norm, head) are counted apart;
- **free**: views, slices, transposes, getitem and scalar constants launch nothing.

A layer's count is its extern nodes plus the fused groups that begin in it (the residual add ending
a layer and the next layer's input norm are one group, counted in the first). This is an estimate
from the graph; on CUDA, tests/test_gpu.py counts inductor's generated kernels for the same step.
"""

from __future__ import annotations

import argparse
import operator
import re
from dataclasses import dataclass

import torch

FREE = {"view", "_unsafe_view", "reshape", "slice", "select", "t", "transpose", "permute", "unsqueeze", "squeeze",
        "expand", "alias", "detach", "as_strided", "scalar_tensor", "lift_fresh_copy", "empty", "sym_size",
        "unbind", "split", "split_with_sizes", "view_as_real", "view_as_complex"}
EXTERN = {"mm", "addmm", "bmm", "baddbmm", "convolution", "index_copy", "index_put", "scatter",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
          "scaled_dot_product_attention"}
_LAYER = re.compile(r"layers\.(\d+)\b")


@dataclass
class StepKernels:
    per_layer: list[int]  # kernels attributed to each decoder layer
    extern_per_layer: list[int]
    fused_per_layer: list[int]
    outside_layers: int  # kernels of the step outside the layers (embedding, rotary tables, norm, head...)
    extern_ops: dict  # op name -> count over the whole step

    @property
    def max_per_layer(self) -> int:
        return max(self.per_layer) if self.per_layer else 0


def _op_name(node) -> tuple[str, str]:
    """(namespace, op name) of a call_function node."""
    target = node.target
    if target is operator.getitem:
        return "python", "getitem"
    if hasattr(target, "_schema"):  # OpOverload: aten::mm.default, grpo_fast::nf4_decode
        namespace, _, rest = target._schema.name.partition("::")
        return namespace, rest
    if hasattr(target, "name") and callable(getattr(target, "name")):  # higher-order ops (auto_functionalized...)
        return "hop", target.name()
    return "python", getattr(target, "__name__", str(target))


def _kind(node) -> str:
    namespace, name = _op_name(node)
    if namespace == "hop":  # auto_functionalized(_v2) wraps a mutating custom op: one kernel
        return "extern"
    if namespace not in ("aten", "prims", "python"):
        return "extern"  # custom ops
    base = name.split(".")[0]
    if base in FREE or name == "getitem":
        return "free"
    return "extern" if base.rstrip("_") in EXTERN else "compute"


def _layer(node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        match = _LAYER.search(str(path))
        if match:
            return int(match.group(1))
    return None


def count_kernels(graph: torch.fx.Graph, num_layers: int) -> StepKernels:
    """Count a functionalised ATen graph's kernels per decoder layer (see the module docstring)."""
    nodes = [node for node in graph.nodes if node.op == "call_function"]
    kinds = {node: _kind(node) for node in nodes}
    layers = {node: _layer(node) for node in nodes}
    parent = {node: node for node in nodes if kinds[node] == "compute"}

    def find(node):
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def compute_sources(node):
        """The compute nodes a node reads, looking through free (view) nodes."""
        found = []
        for arg in node.all_input_nodes:
            if arg in kinds and kinds[arg] == "free":
                found += compute_sources(arg)
            elif arg in parent:
                found.append(arg)
        return found

    # externs reachable from each node (bitsets over the extern nodes), in reverse graph order
    extern_index = {node: i for i, node in enumerate(n for n in nodes if kinds[n] == "extern")}
    reaches: dict = {}
    for node in reversed(nodes):
        bits = 0
        for user in node.users:
            if user in kinds:
                bits |= reaches.get(user, 0) | (1 << extern_index[user] if user in extern_index else 0)
        reaches[node] = bits
    # externs each node depends on
    depends: dict = {}
    for node in nodes:
        bits = 1 << extern_index[node] if node in extern_index else 0
        for arg in node.all_input_nodes:
            bits |= depends.get(arg, 0)
        depends[node] = bits
    for node in parent:
        if layers[node] is None:
            continue
        for source in compute_sources(node):
            if layers[source] is not None and not reaches[source] & depends[node]:
                parent[find(node)] = find(source)
    extern, fused, outside = [0] * num_layers, [0] * num_layers, 0
    extern_ops: dict = {}
    started = set()
    for node in nodes:  # graph order: a group belongs to the layer of its first node
        layer = layers[node]
        if kinds[node] == "extern":
            name = ".".join(_op_name(node))
            extern_ops[name] = extern_ops.get(name, 0) + 1
            if layer is None:
                outside += 1
            else:
                extern[layer] += 1
        elif kinds[node] == "compute":
            root = find(node)
            if root in started:
                continue
            started.add(root)
            if layer is None:
                outside += 1
            else:
                fused[layer] += 1
    return StepKernels([e + f for e, f in zip(extern, fused)], extern, fused, outside, extern_ops)


def decode_step_graphs(engine_class, model, prompt_ids, params) -> tuple[list[torch.fx.GraphModule], list]:
    """(the functionalised ATen graphs of the decode step that ``engine_class`` (a RolloutEngine)
    compiles, one per shape it met; the completions) on any device (the graphs run eagerly)."""
    from torch._dynamo.backends.common import aot_autograd

    from grpo_fast.engine import _decode_step

    graphs = []

    def keep(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module

    class Capturing(engine_class):
        def _uses_cuda_graphs(self, device):
            return True

        def _compile_step(self):
            return torch.compile(_decode_step, backend=aot_autograd(fw_compiler=keep), fullgraph=True, dynamic=False)

    completions = Capturing()(model, prompt_ids, params)
    return graphs, completions


def tiny_engine_counts(fused: bool) -> StepKernels:
    """Kernels per layer of the decode step of grpo-fast's tiny Llama in NF4 + LoRA (CPU, interpreter):
    with the fused NF4 + LoRA matmuls and decode attention, or the plain engine's step."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    from grpo_fast.config import GRPOConfig
    from grpo_fast.engine import RolloutEngine
    from grpo_fast.model import load_model
    from grpo_fast.nf4 import fused_nf4_decode
    from grpo_fast.rollout import SamplingParams

    model, tokenizer = load_model(GRPOConfig(load_in_4bit=True, lora_r=4, lora_alpha=8, dtype="bfloat16"),
                                  torch.device("cpu"))  # bf16 activations: no casts around the NF4 layers, as on GPUs

    class Engine(RolloutEngine):
        def _nf4_decode(self, decoder, device):
            return fused_nf4_decode(decoder, force=True) if fused else super()._nf4_decode(decoder, device)

        def _fused_attention(self, config, implementation, device):
            return fused and implementation == "sdpa"

    params = SamplingParams(num_generations=2, max_completion_length=2, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, top_k=1)
    model.train()  # bitsandbytes keeps its standard NF4 packing on CPU in training mode (tests/test_nf4_decode.py)
    graphs, _ = decode_step_graphs(Engine, model, [tokenizer.encode("abc")], params)
    return count_kernels(graphs[0].graph, model.config.num_hidden_layers)


def main(argv=None) -> dict:
    argparse.ArgumentParser(prog="python -m benchmarks.static.step_kernels", description=__doc__.split("\n")[0]).parse_args(argv)
    results = {}
    for name, fused in (("plain engine (bitsandbytes + peft, sdpa)", False),
                        ("fused NF4 + LoRA, decode attention", True)):
        counts = tiny_engine_counts(fused)
        results[name] = counts
        print(f"{name}: per layer {counts.per_layer} (extern {counts.extern_per_layer}, fused groups "
              f"{counts.fused_per_layer}); outside the layers {counts.outside_layers}; extern ops {counts.extern_ops}")
    return results


if __name__ == "__main__":
    main()
