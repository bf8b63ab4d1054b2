"""NF4 decode matmul (kernels/nf4_matmul.py) and its module swap (grpo_fast/nf4.py).

Oracle: bitsandbytes' own dequantize_4bit, then x @ W.T in float64. The kernel rounds the
dequantised weight to x's dtype, as bitsandbytes' dequantise-then-matmul does, so its error
against x @ round(W).T in float64 is one rounding of the output plus fp32 accumulation.
On CPU the kernel runs in the Triton interpreter (conftest.py).
"""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks/` is a directory of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

from grpo_fast import nf4 as nf4_module  # noqa: E402
from grpo_fast.kernels.nf4_matmul import NF4Weight, default_nf4_config, nf4_matmul, nf4_matmul_reference  # noqa: E402
from grpo_fast.nf4 import FusedNF4Linear, fused_nf4_decode  # noqa: E402
from helpers import DEVICE  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantise(out_features, in_features, *, blocksize=64, nested=True, quant_type="nf4"):
    weight = torch.randn(out_features, in_features, device=DEVICE)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                                 quant_type=quant_type)
    return packed, state


def _check(out, x, dense, bias=None):
    """|out - x @ round(dense).T - bias| within half an output ulp plus fp32 accumulation error."""
    w = dense.to(x.dtype).double()
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    bound = torch.finfo(x.dtype).eps / 2 * ref.abs() + 1e-5 * scale + 1e-30
    excess = ((out.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
def test_kernel_matches_bitsandbytes_dequantise_then_matmul(dtype, rows, nested):
    packed, state = _quantise(37, 192, nested=nested)  # odd N; K spans 3 quantisation blocks
    dense = bnb_functional.dequantize_4bit(packed, state)
    x = torch.randn(rows, 192, device=DEVICE).to(dtype)
    bias = torch.randn(37, device=DEVICE)
    weight = NF4Weight.from_bnb(packed, state)
    _check(nf4_matmul(x, weight, bias), x, dense, bias)
    _check(nf4_matmul(x, weight), x, dense)
    # the plain PyTorch statement of the same product (bias rounded to x's dtype) agrees too
    tol = max(4 * torch.finfo(dtype).eps, 1e-5)
    torch.testing.assert_close(nf4_matmul_reference(x, weight, bias).double(),
                               x.double() @ dense.to(dtype).double().T + bias.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("blocksize,in_features", [(32, 96), (64, 64), (128, 384)])
@pytest.mark.parametrize("path", ["multiply_reduce", "tensor_core"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_block_sizes_both_paths_and_transposed_storage(blocksize, in_features, path, dtype):
    packed, state = _quantise(21, in_features, blocksize=blocksize)
    dense = bnb_functional.dequantize_4bit(packed, state)
    cfg = replace(default_nf4_config(DEVICE), gemv_max_rows=0 if path == "tensor_core" else 64)
    x = torch.randn(5, in_features, device=DEVICE).to(dtype)
    _check(nf4_matmul(x, NF4Weight.from_bnb(packed, state), config=cfg), x, dense)
    # Params4bit data may arrive transposed ([1, N*K/2], as in older bnb call sites): same bytes
    _check(nf4_matmul(x, NF4Weight.from_bnb(packed.t(), state), config=cfg), x, dense)


def test_kernel_reads_the_high_nibble_as_the_even_position():
    """One-hot rows pick single weight columns: a swapped nibble order would return W[:, k ^ 1]."""
    packed, state = _quantise(8, 64, nested=False)
    dense = bnb_functional.dequantize_4bit(packed, state)
    x = torch.eye(64, device=DEVICE)[:6]
    out = nf4_matmul(x, NF4Weight.from_bnb(packed, state))
    torch.testing.assert_close(out, dense[:, :6].T, rtol=0, atol=0)
    assert not torch.equal(dense[:, 0], dense[:, 1])


def test_kernel_split_k_and_row_tiles():
    """More rows than one tile and K split over several programs (fp32 partials summed)."""
    packed, state = _quantise(9, 512)
    dense = bnb_functional.dequantize_4bit(packed, state)
    cfg = replace(default_nf4_config(DEVICE), max_block_m=16, gemv_max_rows=0)
    x = torch.randn(20, 512, device=DEVICE)
    bias = torch.randn(9, device=DEVICE)
    _check(nf4_matmul(x, NF4Weight.from_bnb(packed, state), bias, config=cfg), x, dense, bias)


def _linear4bit(in_features, out_features, *, bias=True, quant_type="nf4"):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type=quant_type)
    dense = torch.randn(out_features, in_features)
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=True, quant_type=quant_type)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features))
    # bitsandbytes repacks CPU weights for its AVX512 kernel on the first eval-mode forward; in
    # training mode it keeps the standard packing that the fused kernel reads.
    return layer.to(DEVICE).train()


def test_fused_linear_matches_the_wrapped_layer(monkeypatch):
    layer = _linear4bit(128, 19)
    fused = FusedNF4Linear(layer, max_rows=8, force=True)
    calls = []
    monkeypatch.setattr(nf4_module, "nf4_matmul", lambda *a, **k: calls.append(1) or nf4_matmul(*a, **k))
    x = torch.randn(2, 3, 128, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
        out = fused(x)
    assert calls and out.shape == (2, 3, 19) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert fused.weight is layer.weight and fused.bias is layer.bias  # by reference, no copy
    with torch.no_grad():  # more rows than max_rows: the wrapped layer itself
        calls.clear()
        torch.testing.assert_close(fused(torch.randn(9, 128, device=DEVICE)).shape, torch.Size([9, 19]))
        assert not calls
    x.requires_grad_(True)  # inputs that need a gradient stay on bitsandbytes' differentiable path
    fused(x).sum().backward()
    assert not calls and x.grad is not None


def _tiny_qlora_model():
    from grpo_fast.config import GRPOConfig
    from grpo_fast.model import load_model

    model, tokenizer = load_model(GRPOConfig(load_in_4bit=True, lora_r=4, lora_alpha=8), torch.device(DEVICE))
    with torch.no_grad():  # peft starts B at zero; give the adapter an effect to preserve
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.train(), tokenizer  # train mode: see _linear4bit (lora_dropout is 0)


def test_fused_nf4_decode_swaps_restores_and_keeps_logits(monkeypatch):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model, tokenizer = _tiny_qlora_model()
    originals = {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert len(originals) == 2 * 7
    input_ids = torch.randint(3, len(tokenizer), (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        calls = []
        monkeypatch.setattr(nf4_module, "nf4_matmul", lambda *a, **k: calls.append(1) or nf4_matmul(*a, **k))
        with fused_nf4_decode(model, max_rows=16, force=True) as swapped:
            assert sorted(swapped) == sorted(originals)
            for name in originals:
                module = model.get_submodule(name)
                assert isinstance(module, FusedNF4Linear) and module.base_layer is originals[name]
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                assert isinstance(parent, LoraLinear4bit) and parent.base_layer is module
            fused = model(input_ids=input_ids).logits
        assert len(calls) == len(originals)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    assert {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)} == originals
    assert not any(isinstance(module, FusedNF4Linear) for module in model.modules())


def test_fused_nf4_decode_restores_after_an_exception():
    model, _ = _tiny_qlora_model()
    before = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="inside"):
        with fused_nf4_decode(model, force=True) as swapped:
            assert swapped
            raise RuntimeError("inside")
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU no-op only applies without CUDA")
def test_fused_nf4_decode_is_a_no_op_without_cuda():
    layer = _linear4bit(64, 8)
    model = torch.nn.Sequential(layer)
    with fused_nf4_decode(model) as swapped:
        assert swapped == [] and model[0] is layer


def test_fused_nf4_decode_leaves_fp4_layers_alone():
    model = torch.nn.Sequential(_linear4bit(64, 8, quant_type="fp4"), _linear4bit(64, 8))
    with fused_nf4_decode(model, force=True) as swapped:
        assert swapped == ["1"] and isinstance(model[0], bnb.nn.Linear4bit)


def test_bad_inputs_raise_value_errors_naming_the_argument():
    packed, state = _quantise(8, 128)
    weight = NF4Weight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="x: expected in_features=128"):
        nf4_matmul(torch.randn(2, 64, device=DEVICE), weight)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        nf4_matmul(torch.randn(128, device=DEVICE), weight)
    with pytest.raises(ValueError, match="x: expected dtype"):
        nf4_matmul(torch.randn(2, 128, device=DEVICE).double(), weight)
    with pytest.raises(ValueError, match=r"bias: expected shape \[8\]"):
        nf4_matmul(torch.randn(2, 128, device=DEVICE), weight, torch.randn(7, device=DEVICE))
    fp4_packed, fp4_state = _quantise(8, 128, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_state.quant_type: expected 'nf4', received 'fp4'"):
        NF4Weight.from_bnb(fp4_packed, fp4_state)
    odd_packed, odd_state = bnb_functional.quantize_4bit(torch.randn(4, 96, device=DEVICE), blocksize=64,
                                                         quant_type="nf4")
    with pytest.raises(ValueError, match="quant_state.blocksize: expected a divisor of in_features=96"):
        NF4Weight.from_bnb(odd_packed, odd_state)
    with pytest.raises(ValueError, match="packed: expected 512 bytes"):
        NF4Weight.from_bnb(packed[:-1], state)
    with pytest.raises(ValueError, match="layer: expected a quantised bitsandbytes Linear4bit"):
        FusedNF4Linear(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_rows: expected a positive number"):
        FusedNF4Linear(_linear4bit(64, 8), max_rows=0)


def test_benchmark_tiny_run_writes_results(tmp_path):
    from benchmarks import nf4 as nf4_bench

    args = ["--tiny", "--shapes", "tiny_qo", "--rows", "2", "--warmup-ms", "0", "--rep-ms", "0", "--min-reps", "1",
            "--out-dir", str(tmp_path), "--name", "smoke"]
    if torch.cuda.is_available():
        args.append("--no-graphs")
    payload = nf4_bench.main(args)
    assert {row["provider"] for row in payload["rows"]} == {"fused", "bnb", "bf16"}
    for row in payload["rows"]:
        assert row["status"] == "ok" and row["ms_median"] > 0 and row["packed_gbps"] > 0, row
        assert row["check"] < 1e-2, row  # every provider computes the same product
    assert (tmp_path / "smoke.json").exists() and (tmp_path / "smoke.md").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal only applies without CUDA")
def test_benchmark_without_cuda_exits_with_a_clear_message():
    from benchmarks import nf4 as nf4_bench

    with pytest.raises(SystemExit, match="needs a CUDA device; use --tiny"):
        nf4_bench.main([])


def test_fused_linear_traces_as_one_graph(monkeypatch):
    """torch.compile sees the kernel as one opaque op (grpo_fast::nf4_matmul): a compiled decode step
    keeps every fused linear inside its graph (fullgraph=True fails on any graph break)."""
    import grpo_fast.kernels.nf4_matmul as kernel_module

    layer = _linear4bit(128, 19, bias=True)
    fused = FusedNF4Linear(layer, max_rows=8, force=True)
    x = torch.randn(3, 128, device=DEVICE)
    launches = []
    launch = kernel_module._launch
    monkeypatch.setattr(kernel_module, "_launch", lambda *a: launches.append(1) or launch(*a))
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(fused, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert launches  # the kernel ran inside the compiled call
