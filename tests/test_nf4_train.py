"""One copy of the NF4 weights for decoding and training: the dequantise kernel on the repacked
layout (kernels/nf4_dequant.py) and the single-copy Linear (grpo_fast/nf4_train.py).

Oracles: bitsandbytes' own dequantize_4bit (fp32, then rounded to the dtype: its arithmetic), the
float64 product of level and scale rounded to fp32 then the dtype (nf4_dequantize_reference), and
bitsandbytes' dequantise-then-matmul (F.linear on its dequantised weight) for the products. On CPU
the Triton kernel runs in the interpreter; the module's CPU path is the same arithmetic in PyTorch.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

from grpo_fast.kernels.nf4_decode import repack_nf4  # noqa: E402
from grpo_fast.kernels.nf4_dequant import nf4_dequantize, nf4_dequantize_reference  # noqa: E402
from grpo_fast.kernels.nf4_matmul import NF4Weight  # noqa: E402
from grpo_fast.nf4_train import NF4Linear, nf4_linear, restore_bitsandbytes, single_copy_nf4  # noqa: E402
from helpers import DEVICE  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (out_features, in_features) of every Linear of Qwen2.5-7B and Llama-3.1-8B: q / o, k / v, gate / up, down
SHAPES = {"qwen2.5-7b": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)],
          "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]}


def _quantise(out_features, in_features, *, blocksize=64, nested=True):
    weight = torch.randn(out_features, in_features, device=DEVICE)
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")


def _random_nf4(out_features, in_features):
    """A double-quantised NF4 weight of a full model shape built directly (random codes, absmax indices
    and nested scales): quantising 68M random values takes several seconds on CPU."""
    blocks = out_features * in_features // 64
    packed = torch.randint(0, 256, (out_features * in_features // 2, 1), dtype=torch.uint8, device=DEVICE)
    nested = bnb_functional.QuantState(absmax=torch.rand(-(-blocks // 256), device=DEVICE) * 0.02,
                                       code=bnb_functional.create_dynamic_map(signed=True).to(DEVICE),
                                       blocksize=256, dtype=torch.float32)
    state = bnb_functional.QuantState(
        absmax=torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=DEVICE),
        shape=torch.Size([out_features, in_features]), code=bnb_functional.get_4bit_type("nf4", device=DEVICE),
        blocksize=64, quant_type="nf4", dtype=torch.float32, offset=torch.tensor(0.03, device=DEVICE), state2=nested)
    return packed, state


# ----------------------------------------------------------------------------------------------
# the dequantisation: bit for bit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("blocksize,nested", [(64, True), (64, False), (32, True), (128, True)],
                         ids=["b64_double", "b64_plain", "b32", "b128"])
def test_dequantise_is_bitsandbytes_fp32_arithmetic_bit_for_bit(dtype, blocksize, nested):
    packed, state = _quantise(37, 384, blocksize=blocksize, nested=nested)  # odd N: a partial row tile
    expected = bnb_functional.dequantize_4bit(packed, state).to(dtype)
    weight = repack_nf4([NF4Weight.from_bnb(packed, state)])
    assert torch.equal(nf4_dequantize_reference(weight, dtype), expected)  # float64, rounded to fp32, then dtype
    assert torch.equal(nf4_dequantize(weight, dtype=dtype, force_triton=True), expected)  # the kernel
    assert torch.equal(nf4_dequantize(weight, dtype=dtype), expected)  # the CPU path
    chunk = weight.chunk
    for rows, columns in (((5, 30), (chunk, 3 * chunk)), ((16, 37), (0, 384)), ((0, 1), (384 - chunk, 384))):
        block = expected[rows[0]:rows[1], columns[0]:columns[1]]
        assert torch.equal(nf4_dequantize(weight, rows, columns, dtype, force_triton=True), block)
        assert torch.equal(nf4_dequantize(weight, rows, columns, dtype), block)


@pytest.fixture(scope="module", params=list(SHAPES))
def model_weights(request):
    """Each Linear shape of the model: (n, k, its bitsandbytes dequantisation in fp32, the repacked weight)."""
    weights = []
    for n, k in SHAPES[request.param]:
        packed, state = _random_nf4(n, k)
        weights.append((n, k, bnb_functional.dequantize_4bit(packed, state),
                        repack_nf4([NF4Weight.from_bnb(packed, state)])))
    return weights


def test_dequantise_exact_model_shapes_on_edge_tiles(model_weights):
    """Every Linear shape of the model, dequantised by the kernel (interpreter) on its first and last
    row tiles over the first and last chunks (the whole weight is too slow under the interpreter), and
    by the CPU path on a band of rows over all columns."""
    for n, k, dense, weight in model_weights:
        expected = dense.bfloat16()
        for rows in ((0, 24), (n - 40, n)):
            for columns in ((0, 128), (k - 192, k)):
                block = nf4_dequantize(weight, rows, columns, torch.bfloat16, force_triton=True)
                assert torch.equal(block, expected[rows[0]:rows[1], columns[0]:columns[1]]), (n, k, rows, columns)
        assert torch.equal(nf4_dequantize(weight, (n - 40, n), dtype=torch.float16), dense[n - 40:].half())


def test_grouped_members_and_bad_arguments():
    weights = [NF4Weight.from_bnb(*_quantise(n, 128)) for n in (40, 24)]
    dense = torch.cat([nf4_dequantize_reference(repack_nf4([w]), torch.float32) for w in weights])
    group = repack_nf4(weights)
    assert torch.equal(nf4_dequantize(group, (40, 64), dtype=torch.float32, force_triton=True), dense[40:64])
    with pytest.raises(ValueError, match="rows: expected 0 <= start <= stop <= 64"):
        nf4_dequantize(group, (0, 65))
    with pytest.raises(ValueError, match="columns: expected multiples of 64"):
        nf4_dequantize(group, columns=(0, 32))
    with pytest.raises(ValueError, match="dtype: expected float32, float16 or bfloat16"):
        nf4_dequantize(group, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"out: expected a contiguous \[64, 128\]"):
        nf4_dequantize(group, out=torch.empty(64, 64))


# ----------------------------------------------------------------------------------------------
# the product and its input gradient
# ----------------------------------------------------------------------------------------------


def _within_rounding(out, expected, dtype):
    """Equal up to a few roundings of the dtype relative to the output's size (fp32 sums in another order)."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    scale = expected.double().abs().max().item()
    error = (out.double() - expected.double()).abs().max().item()
    assert error <= 2 * eps * scale, (error, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_forward_and_input_gradient_equal_bitsandbytes_dequantise_then_matmul(dtype):
    packed, state = _quantise(200, 384)
    dense = bnb_functional.dequantize_4bit(packed, state).to(dtype)
    weight = repack_nf4([NF4Weight.from_bnb(packed, state)])
    bias = torch.randn(200, device=DEVICE).to(dtype)
    x = torch.randn(2, 3, 384, device=DEVICE).to(dtype)
    grad = torch.randn(2, 3, 200, device=DEVICE).to(dtype)
    ref_x = x.clone().requires_grad_(True)
    expected = torch.nn.functional.linear(ref_x, dense, bias)
    expected.backward(grad)
    # one block: bitsandbytes' own calls on the same dense weight, bit for bit
    mine = x.clone().requires_grad_(True)
    out = nf4_linear(mine, weight, bias=bias)
    out.backward(grad)
    assert torch.equal(out, expected) and torch.equal(mine.grad, ref_x.grad)
    # blocks of 48 output features (forward) and of 64 input features (backward): each output element
    # is still one whole dot product
    tile_bytes = 48 * 384 * dtype.itemsize
    blocked = x.clone().requires_grad_(True)
    out = nf4_linear(blocked, weight, bias=bias, max_tile_bytes=tile_bytes)
    out.backward(grad)
    _within_rounding(out, expected, dtype)
    _within_rounding(blocked.grad, ref_x.grad, dtype)
    # a member's rows of a grouped weight, bias with a gradient of its own
    group = repack_nf4([NF4Weight.from_bnb(*_quantise(24, 384)), NF4Weight.from_bnb(packed, state)])
    own_bias = bias.clone().requires_grad_(True)
    member = x.clone().requires_grad_(True)
    out = nf4_linear(member, group, (24, 224), own_bias, max_tile_bytes=tile_bytes)
    out.backward(grad)
    _within_rounding(out, expected, dtype)
    _within_rounding(member.grad, ref_x.grad, dtype)
    torch.testing.assert_close(own_bias.grad, grad.sum((0, 1)), rtol=0, atol=0)


def test_exact_model_shapes_forward_and_gradient_on_a_band_of_features(model_weights):
    """Each Linear shape at 3 rows of bf16 input: the product of x with the last 40 output features
    (every input feature) and its gradient to x, against bitsandbytes' dequantise-then-matmul."""
    for n, k, dense, weight in model_weights:
        dense = dense[n - 40:].bfloat16()
        x = torch.randn(3, k, device=DEVICE, dtype=torch.bfloat16)
        grad = torch.randn(3, 40, device=DEVICE, dtype=torch.bfloat16)
        ref_x = x.clone().requires_grad_(True)
        expected = ref_x @ dense.T
        expected.backward(grad)
        mine = x.clone().requires_grad_(True)
        out = nf4_linear(mine, weight, (n - 40, n), max_tile_bytes=40 * 2048 * 2)  # blocks of 2048 inputs
        out.backward(grad)
        assert torch.equal(out, expected)  # one block of features: the same call
        _within_rounding(mine.grad, ref_x.grad, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# the model: bitsandbytes' layers replaced, peft's untouched
# ----------------------------------------------------------------------------------------------


def _linear4bit(in_features, out_features, compute_dtype, bias=True):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features).to(compute_dtype), requires_grad=False)
    return layer.to(DEVICE).train()  # train mode: bitsandbytes' CPU repacking happens in eval mode only


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_layer_replaces_bitsandbytes_linear4bit_in_every_dtype(dtype):
    """fp32 / bf16 inputs compute in their own dtype, fp16 ones in the compute dtype (bitsandbytes'
    rule); forward and input gradient equal bitsandbytes' layer bit for bit, and its dequantise-then-matmul
    within the dtype's rounding."""
    compute = torch.bfloat16 if dtype == torch.float16 else torch.float32
    layer = _linear4bit(192, 40, compute)
    dense = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    model = torch.nn.Sequential(layer)
    assert single_copy_nf4(model) == 1 and isinstance(model[0], NF4Linear) and model[0].bias is layer.bias
    x = torch.randn(5, 192, device=DEVICE).to(dtype)
    mine, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = model(mine), layer(ref_x)  # the bitsandbytes layer itself, still whole outside the model
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert out.dtype == dtype and torch.equal(out, expected) and torch.equal(mine.grad, ref_x.grad)
    work = dtype if dtype != torch.float16 else compute
    _within_rounding(out, torch.nn.functional.linear(x.double(), dense.double(), layer.bias.double()), work)
    _within_rounding(mine.grad, grad.double() @ dense.double(), work)


def _tiny_qlora(single_copy):
    from grpo_fast.config import GRPOConfig
    from grpo_fast.model import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(GRPOConfig(load_in_4bit=True, lora_r=4, lora_alpha=8, nf4_single_copy=single_copy),
                                  torch.device(DEVICE))
    with torch.no_grad():  # peft starts B at zero; give the adapter an effect
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.train(), tokenizer


@pytest.fixture(scope="module")
def models():
    return _tiny_qlora(False)[0], *_tiny_qlora(True)


def _logits_and_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids=input_ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_trainer_model_holds_one_copy_and_trains_as_bitsandbytes(models):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from grpo_fast.model import reference_policy
    from grpo_fast.nf4 import NF4DecodeCache, fused_nf4_decode
    from grpo_fast.nf4_train import NF4Packed

    bnb_model, model, tokenizer = models
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any(isinstance(t, bnb.nn.Params4bit) for t in [*model.parameters(), *model.buffers()])
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora_layers) == 14 and all(isinstance(m.base_layer, NF4Linear) for m in lora_layers)
    assert len([m for m in model.modules() if isinstance(m, NF4Packed)]) == 8  # q/k/v, o, gate/up, down x 2
    input_ids = torch.randint(3, len(tokenizer), (2, 7), device=DEVICE)
    logits, grads = _logits_and_grads(model, input_ids)
    expected_logits, expected_grads = _logits_and_grads(bnb_model, input_ids)
    assert torch.equal(logits, expected_logits)  # fp32 on CPU: the same dense weights, the same calls
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)
    with torch.no_grad(), reference_policy(model), reference_policy(bnb_model):
        assert torch.equal(model(input_ids=input_ids).logits, bnb_model(input_ids=input_ids).logits)
    # the decode kernel reads the layers' own repacked weight: the cache holds only the LoRA snapshot
    cache = NF4DecodeCache()
    buffers = {p.data_ptr() for m in model.modules() if isinstance(m, NF4Packed) for p in m.buffers()}
    with torch.no_grad(), fused_nf4_decode(model, max_rows=16, force=True, cache=cache) as swapped:
        assert len(swapped) == 14
        fused = model(input_ids=input_ids).logits
    groups = list(cache.groups.values())
    assert len(groups) == 8 and all(group.weight.qweight.data_ptr() in buffers for group in groups)
    assert cache.nbytes == sum(g.lora_a.nbytes + g.lora_b.nbytes for g in groups)
    torch.testing.assert_close(fused, logits, rtol=2e-2, atol=2e-2)  # bf16 LoRA snapshot: roundings differ


def test_save_pretrained_writes_the_standard_adapter(models, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    bnb_model, model, tokenizer = models
    model.save_pretrained(str(tmp_path / "single"))
    bnb_model.save_pretrained(str(tmp_path / "bnb"))
    mine, theirs = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("single", "bnb"))
    assert mine.keys() == theirs.keys() and all("lora_" in key for key in mine)
    # bitsandbytes' base with the saved adapter computes what the single-copy model does
    base = _tiny_qlora(False)[0].get_base_model()
    for name, tensor in mine.items():
        theirs[name].copy_(tensor)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "single")).train()
    input_ids = torch.randint(3, len(tokenizer), (1, 6), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_merging_needs_bitsandbytes_layers_back_which_hold_the_same_values():
    model, tokenizer = _tiny_qlora(True)
    input_ids = torch.randint(3, len(tokenizer), (1, 6), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.up_proj.base_layer")
    with pytest.raises(AttributeError, match=r"restore_bitsandbytes\(model\)"):
        layer.weight
    assert restore_bitsandbytes(model) == 14
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, expected)
        with model.disable_adapter():
            reference = model(input_ids=input_ids).logits
        merged = model.merge_and_unload()  # peft's own merge on bitsandbytes' layers (it re-quantises: lossy)
        error = (merged(input_ids=input_ids).logits - expected).abs().max()
    assert error < 0.5 * (reference - expected).abs().max()


def test_a_dequantise_kernel_that_cannot_compile_falls_back_to_the_same_bits(monkeypatch):
    """The training path's dequantisation through grpo_fast.fallback: the kernel made to fail as Triton
    fails (a compile error) gives the PyTorch twin's result, bit for bit, with one warning; strict: an error."""
    import ast
    import functools
    import warnings

    from triton.compiler.errors import CompilationError

    import grpo_fast.kernels.nf4_dequant as dequant_module
    import grpo_fast.nf4_train as train_module
    from grpo_fast import fallback

    packed, state = _quantise(48, 128)
    weight = repack_nf4([NF4Weight.from_bnb(packed, state)])
    x = torch.randn(3, 128, device=DEVICE)
    expected = nf4_linear(x, weight)  # CPU: the PyTorch path
    monkeypatch.delenv(fallback.STRICT_ENV, raising=False)
    fallback.reset()
    monkeypatch.setattr(train_module, "nf4_dequantize", functools.partial(nf4_dequantize, force_triton=True))

    def broken(*args, **kwargs):
        raise CompilationError("x = tl.load(p)", ast.parse("x").body[0], "forced")

    monkeypatch.setattr(dequant_module._nf4_dequant_kernel, "run", broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(nf4_linear(x, weight), expected)
            assert torch.equal(nf4_linear(x, weight), expected)
        ours = [w for w in caught if issubclass(w.category, fallback.KernelFallbackWarning)]
        assert len(ours) == 1 and "'nf4_dequantize'" in str(ours[0].message)
        fallback.reset()
        monkeypatch.setenv(fallback.STRICT_ENV, "1")
        with pytest.raises(fallback.KernelFailure):
            nf4_linear(x, weight)
    finally:
        fallback.reset()
