"""NF4 decode kernel (kernels/nf4_decode.py) and its module swap (grpo_fast/nf4.py).

Oracles: bitsandbytes' own dequantize_4bit (then x @ W.T in float64), and nf4_decode_reference (the
kernel's arithmetic in float64). The kernel rounds the 16 NF4 levels to x's dtype and scales fp32
partial sums; bitsandbytes rounds level * scale to x's dtype per weight: both are within half an
ulp of x's dtype per weight of the exact product. On CPU the kernel runs in the Triton interpreter
(conftest.py), where the lookup is a table load; its in-register PTX form is run by ptx_model.py.
"""

import random

import pytest
import torch
import triton
import triton.language as tl

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

import grpo_fast.kernels.nf4_decode as decode_module  # noqa: E402
from grpo_fast.kernels.nf4_decode import (NF4_LEVELS, DecodeConfig, default_decode_config,  # noqa: E402
                                          StreamSchedule, nf4_decode_matmul, nf4_decode_reference, plan_launch,
                                          repack_nf4)
from grpo_fast.kernels.nf4_matmul import NF4Weight, nf4_matmul_reference  # noqa: E402
from grpo_fast.nf4 import FusedNF4Linear, NF4DecodeCache, fused_nf4_decode  # noqa: E402
from helpers import DEVICE  # noqa: E402
import ptx_model  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantise(out_features, in_features, *, blocksize=64, nested=True, quant_type="nf4"):
    weight = torch.randn(out_features, in_features, device=DEVICE)
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                        quant_type=quant_type)


def _check(out, x, dense, bias=None):
    """|out - x @ W.T - bias| (float64, W bitsandbytes' fp32 dequantisation) within half an ulp of x's
    dtype per weight (the levels' or the products' rounding), half an ulp of the output and fp32
    accumulation; bitsandbytes' own dequantise-then-matmul meets the same bound."""
    w = dense.double()
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    eps = torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 0.0
    bound = eps / 2 * (scale + ref.abs()) + 1e-5 * scale + 1e-30
    excess = ((out.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "plain"])
def test_kernel_matches_bitsandbytes_dequantise_then_matmul(dtype, nested):
    packed, state = _quantise(37, 192, nested=nested)  # odd N; K spans 3 quantisation blocks
    dense = bnb_functional.dequantize_4bit(packed, state)
    weight = NF4Weight.from_bnb(packed, state)
    bias = torch.randn(37, device=DEVICE)
    decode = repack_nf4([weight], [bias])
    for rows in (1, 5):
        x = torch.randn(rows, 192, device=DEVICE).to(dtype)
        out = nf4_decode_matmul(x, decode)
        assert out.shape == (rows, 37) and out.dtype == dtype
        _check(out, x, dense, bias)
        _check(nf4_matmul_reference(x, weight, bias).to(dtype), x, dense, bias)  # bitsandbytes' route, same bound
        # the kernel's own arithmetic: only the output rounding and fp32 sums differ
        ref = nf4_decode_reference(x, decode)
        tolerance = (torch.finfo(dtype).eps / 2 if dtype != torch.float32 else 0) * ref.abs() + 1e-5 * ref.abs().max()
        assert ((out.double() - ref).abs() <= tolerance + 1e-30).all()


@pytest.mark.parametrize("blocksize,in_features", [(32, 96), (128, 384)])
def test_block_sizes_and_transposed_storage(blocksize, in_features):
    packed, state = _quantise(21, in_features, blocksize=blocksize)
    dense = bnb_functional.dequantize_4bit(packed, state)
    x = torch.randn(3, in_features, device=DEVICE).to(torch.bfloat16)
    decode = repack_nf4([NF4Weight.from_bnb(packed, state)])
    assert decode.chunk == min(64, blocksize)
    _check(nf4_decode_matmul(x, decode), x, dense)
    # Params4bit data may arrive transposed ([1, N*K/2], as in older bnb call sites): same bytes, same layout
    assert torch.equal(repack_nf4([NF4Weight.from_bnb(packed.t(), state)]).qweight, decode.qweight)


def test_high_nibble_is_the_even_position():
    """One-hot rows pick single weight columns: a swapped nibble order would return W[:, k ^ 1]."""
    packed, state = _quantise(8, 64, nested=False)
    dense = bnb_functional.dequantize_4bit(packed, state)
    out = nf4_decode_matmul(torch.eye(64, device=DEVICE)[:6], repack_nf4([NF4Weight.from_bnb(packed, state)]))
    torch.testing.assert_close(out, dense[:, :6].T, rtol=0, atol=0)
    assert not torch.equal(dense[:, 0], dense[:, 1])


def _group(sizes=(40, 24, 24), in_features=128, biases=(True, False, True)):
    weights, dense = [], []
    for n in sizes:
        packed, state = _quantise(n, in_features)
        weights.append(NF4Weight.from_bnb(packed, state))
        dense.append(bnb_functional.dequantize_4bit(packed, state))
    bias = [torch.randn(n, device=DEVICE) if b else None for n, b in zip(sizes, biases)]
    return weights, dense, bias


def _check_members(out, x, decode, dense, biases, xa, lora_b, rank):
    """Each member of a grouped launch: its weight, its bias, its own adapter, against float64."""
    for g, (d, b) in enumerate(zip(dense, biases)):
        lo, hi = decode.segments[g], decode.segments[g + 1]
        expected = x.double() @ d.double().T + xa[:, g * rank:(g + 1) * rank].double() @ lora_b[lo:hi].double().T
        if b is not None:
            expected += b.double()
        torch.testing.assert_close(out[:, lo:hi].double(), expected, rtol=1e-5, atol=1e-4)


def test_grouped_weights_with_bias_and_lora_in_the_epilogue():
    weights, dense, biases = _group()
    decode = repack_nf4(weights, biases)
    assert decode.segments == (0, 40, 64, 88) and decode.padded_rows == 128
    rank, rows = 16, 5
    x = torch.randn(rows, 128, device=DEVICE)
    xa = torch.randn(rows, 3 * rank, device=DEVICE)
    lora_b = torch.zeros(decode.padded_rows, rank, device=DEVICE)
    lora_b[:88] = torch.randn(88, rank, device=DEVICE)
    out = nf4_decode_matmul(x, decode, xa, lora_b)
    _check_members(out, x, decode, dense, biases, xa, lora_b, rank)


@pytest.mark.parametrize("features, rows", [(24, 3), (32, 16)], ids=["masked", "even"])
def test_split_k_reduces_in_a_fixed_order_and_resets_its_tickets(features, rows):
    """Split-K; "even": rows and features multiples of the tile (EVEN_M, EVEN_N: no masks)."""
    weights, dense, biases = _group(sizes=(features,), in_features=256, biases=(True,))
    decode = repack_nf4(weights, biases)
    x = torch.randn(rows, 256, device=DEVICE)
    whole = nf4_decode_matmul(x, decode, config=DecodeConfig(block_ns=(16,), block_mx=16, num_warps=1,
                                                             num_stages=1, chunks_per_iteration=1, splits=1))
    split_cfg = DecodeConfig(block_ns=(16,), block_mx=16, num_warps=1, num_stages=1, chunks_per_iteration=1,
                             splits=4)
    first = nf4_decode_matmul(x, decode, config=split_cfg)
    assert int(decode.counters.abs().sum()) == 0  # the last split of each tile reset its ticket
    second = nf4_decode_matmul(x, decode, config=split_cfg)
    assert torch.equal(first, second)  # the same order of sums every call
    torch.testing.assert_close(first, whole, rtol=1e-5, atol=1e-5)
    _check(first, x, dense[0], biases[0])


def test_split_k_reducer_groups_leave_the_bits_unchanged():
    """The split-K reducer loads its partials REDUCE_GROUP at a time (a loop over groups, the last one
    masked when the group does not divide the splits) and adds them in split order: the same bits
    whatever the group, tickets reset after each call."""
    weights, dense, biases = _group(sizes=(24,), in_features=512, biases=(True,))
    decode = repack_nf4(weights, biases)
    x = torch.randn(5, 512, device=DEVICE)
    base = dict(block_ns=(16,), block_mx=16, num_warps=1, num_stages=1, chunks_per_iteration=1, splits=8)
    outs = []
    for group in (1, 3, 8):  # 8 rounds; 3 rounds, the last masked; 1 round (straight-line code)
        outs.append(nf4_decode_matmul(x, decode, config=DecodeConfig(**base, reduce_group=group)))
        assert int(decode.counters.abs().sum()) == 0
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    _check(outs[0], x, dense[0], biases[0])


def test_reduce_group_fills_the_register_budget_in_even_rounds():
    from grpo_fast.kernels.nf4_decode import REDUCE_REGISTERS, reduce_group

    assert reduce_group(1, 128, 16, 4) == 1
    assert reduce_group(7, 128, 16, 4) == 7  # 16 registers a split: all 7 in one round
    assert reduce_group(28, 128, 16, 4) == 7  # at most 8 a round: 4 rounds of 7, not 8 + 8 + 8 + 4
    assert reduce_group(7, 64, 64, 4) == 4  # 32 registers a split: 2 rounds (4 + 3, the last masked)
    for splits in range(1, 40):
        for block_n, block_mx in ((64, 16), (128, 16), (64, 64), (128, 64)):
            group = reduce_group(splits, block_n, block_mx, 4)
            per_thread = block_n * block_mx // 128
            assert 1 <= group <= splits
            assert group * per_thread <= max(REDUCE_REGISTERS, per_thread)
            fewest = -(-splits // max(1, REDUCE_REGISTERS // per_thread))  # rounds the budget allows
            assert -(-splits // group) == fewest


def test_several_chunks_per_iteration_with_split_k_and_stream_k():
    """The sm_90 launches of 1-16 rows take 2 or 4 chunks per loop iteration (CPI): the same results
    as one chunk per iteration, with split-K and with stream-K (K = 512: 8 chunks), LoRA included."""
    weights, dense, biases = _group(sizes=(40, 24, 24), in_features=512)
    decode = repack_nf4(weights, biases)
    rank, rows = 16, 3
    x = torch.randn(rows, 512, device=DEVICE)
    xa = torch.randn(rows, 3 * rank, device=DEVICE)
    lora_b = torch.zeros(decode.padded_rows, rank, device=DEVICE)
    lora_b[:88] = torch.randn(88, rank, device=DEVICE)
    base = dict(block_ns=(16,), block_mx=16, num_warps=1, num_stages=1)
    one = nf4_decode_matmul(x, decode, xa, lora_b, config=DecodeConfig(**base, chunks_per_iteration=1, splits=1))
    for cpi, extra in ((2, dict(splits=2)), (4, dict(splits=1)), (4, dict(splits=2)), (2, dict(programs=5))):
        out = nf4_decode_matmul(x, decode, xa, lora_b, config=DecodeConfig(**base, chunks_per_iteration=cpi, **extra))
        assert int(decode.counters.abs().sum()) == 0
        torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-5)
    _check_members(out, x, decode, dense, biases, xa, lora_b, rank)


def test_stream_k_shares_tiles_between_programs_in_a_fixed_order():
    """Stream-K: programs take equal shares of all tiles' chunks; a tile cut between 2-4 programs is
    reduced by its last piece in program order: the same bits every call, tickets reset, the
    unsplit result within fp32 rounding. Members at multiples of BLOCK_N (one LoRA product per
    tile) and across tiles (a product per member, masked); 16 rows and 64 features: rows and features
    multiples of the tile (EVEN_M, EVEN_N: no masks)."""
    for sizes, rows in (((40, 24, 24), 5), ((32, 16, 16), 5), ((32, 16, 16), 16)):
        weights, dense, biases = _group(sizes=sizes, in_features=256)
        decode = repack_nf4(weights, biases)
        rank = 16
        x = torch.randn(rows, 256, device=DEVICE)
        xa = torch.randn(rows, 3 * rank, device=DEVICE)
        lora_b = torch.zeros(decode.padded_rows, rank, device=DEVICE)
        lora_b[:sum(sizes)] = torch.randn(sum(sizes), rank, device=DEVICE)
        base = dict(block_ns=(16,), block_mx=16, num_warps=1, num_stages=1, chunks_per_iteration=1)
        whole = nf4_decode_matmul(x, decode, xa, lora_b, config=DecodeConfig(**base, splits=1))
        tiles = -(-sum(sizes) // 16)
        for programs in (tiles - 1, tiles + 1, 2 * tiles + 1, 3 * tiles + 2):
            cfg = DecodeConfig(**base, programs=programs)
            schedule = StreamSchedule.of(tiles, 4, programs)
            assert schedule.max_units == -(-4 * tiles // programs)
            first = nf4_decode_matmul(x, decode, xa, lora_b, config=cfg)
            assert int(decode.counters.abs().sum()) == 0
            assert torch.equal(first, nf4_decode_matmul(x, decode, xa, lora_b, config=cfg))
            torch.testing.assert_close(first, whole, rtol=1e-5, atol=1e-5)
        _check_members(first, x, decode, dense, biases, xa, lora_b, rank)


def test_launch_plan_charges_the_warps_an_sm_holds():
    from grpo_fast.kernels.launch import busiest_sm_cycles

    # one 2-warp program per SM issues 2 instructions per clock: twice its cycles at the SM's 4
    assert busiest_sm_cycles(132, 132, 4, 2, 100.0) == 200.0
    assert busiest_sm_cycles(264, 132, 4, 2, 100.0) == 200.0  # two resident together: 4 warps
    assert busiest_sm_cycles(264, 132, 1, 2, 100.0) == 400.0  # one at a time
    assert busiest_sm_cycles(132, 132, 1, 4, 100.0) == 100.0
    # so on sm_90 the launches up to 16 rows (about one program per SM) run 4-warp programs
    for rows in (1, 16):
        assert default_decode_config(rows, torch.device("meta"), (9, 0)).num_warps == 4


def test_launch_plan_balances_programs_over_the_sms():
    cfg = default_decode_config(1, torch.device("meta"), (9, 0))
    for n, k in ((4608, 3584), (3584, 18944), (37888, 3584)):
        plan = plan_launch(n, k, 64, 1, cfg, 132)
        if plan.programs:  # stream-K: every program within one unit of the same share
            units = k // 64 // plan.chunks_per_iteration
            schedule = StreamSchedule.of(-(-n // plan.block_n), units, plan.programs)
            total = -(-n // plan.block_n) * units  # the largest share of 132 programs, maybe with fewer
            assert schedule.max_units == -(-total // 132) and schedule.max_units * plan.programs <= (
                total + plan.programs), (n, k, plan)
            continue
        programs = -(-n // plan.block_n) * plan.splits
        assert programs >= 0.8 * 132 and (k // 64) % plan.splits == 0, (n, k, plan)  # unsplit: 28-72
        assert plan.chunks_per_split * plan.splits == k // 64
    # at 64 rows the fp32 partials cost 512 bytes per feature and split: fewer splits than at one row
    wide = default_decode_config(64, torch.device("meta"), (9, 0))
    assert plan_launch(3584, 3584, 64, 64, wide, 132).splits < plan_launch(3584, 3584, 64, 1, cfg, 132).splits
    # the engine's q/k/v launch at 64 rows: too few tiles of 64 features (72) for 132 SMs, so stream-K;
    # 126 programs take 8 units (of 4 chunks) each, as the largest shares of 132 do, and cut fewer tiles
    assert plan_launch(4608, 3584, 64, 64, wide, 132).programs == 126
    assert StreamSchedule.of(72, 14, 126).partial_pieces < StreamSchedule.of(72, 14, 132).partial_pieces


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pack", [2, 4])
@pytest.mark.parametrize("register_words", [False, True], ids=["immediate", "registers"])
def test_in_register_lookup_ptx_returns_the_levels(dtype, pack, register_words):
    """The PTX the GPU runs, executed on ptx_model: every byte value in every position of the packed
    register gives the two levels of its nibbles, rounded to the dtype, in the output registers (the
    table words as immediates, or in the operands after the packed bytes, each ``pack`` registers)."""
    asm = decode_module._ASM[(dtype, pack, register_words)]
    levels = [b & 0xFFFF for b in torch.tensor(NF4_LEVELS).to(dtype).view(torch.int16).tolist()]
    generator = random.Random(0)
    words = [b * (0x01010101 if pack == 4 else 0x0101) for b in range(256)]
    words += [generator.getrandbits(8 * pack) for _ in range(300)]
    source = "$4" if pack == 4 else "$2"
    table = {}
    if register_words:  # operand pack + 1 + pack * j holds word j; its other registers are junk
        for j, value in enumerate(decode_module.lut_words(NF4_LEVELS, dtype)):
            for r in range(pack):
                table[f"${pack + 1 + pack * j + r}"] = value if r == 0 else 0xDEADBEEF
    for word in words:
        registers = ptx_model.run(asm, {source: word, **table})
        outputs = [registers[f"${i}"] for i in range(pack)]  # pack / 2 registers of high nibbles, then low
        values = [half for reg in outputs for half in (reg & 0xFFFF, reg >> 16)]
        data = [(word >> (8 * i)) & 0xFF for i in range(pack)]
        assert values == [levels[b >> 4] for b in data] + [levels[b & 15] for b in data], hex(word)


@triton.jit
def _words_kernel(lut_ptr, out_ptr):
    words = decode_module._lut_words(lut_ptr, False)
    for j in tl.static_range(8):
        tl.store(out_ptr + j, words[j])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lookup_table_words_built_in_the_kernel_match(dtype):
    """_lut_words (the kernel's table words, from the level table) gives lut_words' 8 words."""
    out = torch.zeros(8, dtype=torch.int64)
    _words_kernel[(1,)](torch.tensor(NF4_LEVELS).to(dtype), out)
    assert [w & 0xFFFFFFFF for w in out.tolist()] == decode_module.lut_words(NF4_LEVELS, dtype)


def test_repacked_copy_memory_is_stated():
    weights, _, biases = _group()
    decode = repack_nf4(weights, biases)
    n_pad, k = decode.padded_rows, decode.in_features
    assert decode.nbytes == n_pad * k // 2 + 4 * n_pad * k // 64 + 4 * 88


def test_bad_inputs_raise_value_errors_naming_the_argument():
    weights, _, _ = _group(sizes=(8,), in_features=128, biases=(False,))
    decode = repack_nf4(weights)
    x = torch.randn(2, 128, device=DEVICE)
    with pytest.raises(ValueError, match="x: expected in_features=128"):
        nf4_decode_matmul(torch.randn(2, 64, device=DEVICE), decode)
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        nf4_decode_matmul(torch.randn(128, device=DEVICE), decode)
    with pytest.raises(ValueError, match="x: expected dtype"):
        nf4_decode_matmul(x.double(), decode)
    with pytest.raises(ValueError, match="xa, lora_b: expected both"):
        nf4_decode_matmul(x, decode, xa=torch.randn(2, 16, device=DEVICE))
    with pytest.raises(ValueError, match=r"lora_b: expected \[128, R\] with R a multiple of 16"):
        nf4_decode_matmul(x, decode, torch.randn(2, 8, device=DEVICE), torch.randn(128, 8, device=DEVICE))
    other, _, _ = _group(sizes=(8,), in_features=64, biases=(False,))
    with pytest.raises(ValueError, match=r"weights\[1\]: expected in_features=128"):
        repack_nf4(weights + other)
    fp4_packed, fp4_state = _quantise(8, 128, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_state.quant_type: expected 'nf4', received 'fp4'"):
        NF4Weight.from_bnb(fp4_packed, fp4_state)
    with pytest.raises(ValueError, match="layer: expected a quantised bitsandbytes Linear4bit"):
        FusedNF4Linear(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_rows: expected a positive number"):
        FusedNF4Linear(_linear4bit(64, 8), max_rows=0)


# ----------------------------------------------------------------------------------------------
# the module swap
# ----------------------------------------------------------------------------------------------


def _linear4bit(in_features, out_features, *, bias=True, quant_type="nf4"):
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     compress_statistics=True, quant_type=quant_type)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features))
    # bitsandbytes repacks CPU weights for its AVX512 kernel on the first eval-mode forward; in
    # training mode it keeps the standard packing that the fused kernel reads.
    return layer.to(DEVICE).train()


@pytest.fixture
def launches(monkeypatch):
    calls = []
    launch = decode_module._launch
    monkeypatch.setattr(decode_module, "_launch", lambda *a: calls.append(a[1].segments) or launch(*a))
    return calls


def test_fused_linear_matches_the_wrapped_layer(launches):
    layer = _linear4bit(128, 19)
    fused = FusedNF4Linear(layer, max_rows=8, force=True)
    x = torch.randn(2, 3, 128, device=DEVICE)
    with torch.no_grad():
        expected = layer(x)
        out = fused(x)
    assert launches and out.shape == (2, 3, 19) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert fused.weight is layer.weight and fused.bias is layer.bias and fused.original is layer
    launches.clear()
    with torch.no_grad():  # more rows than max_rows: the wrapped layer itself
        assert fused(torch.randn(9, 128, device=DEVICE)).shape == (9, 19) and not launches
    x.requires_grad_(True)  # inputs that need a gradient stay on bitsandbytes' differentiable path
    fused(x).sum().backward()
    assert not launches and x.grad is not None


def _tiny_qlora_model():
    from grpo_fast.config import GRPOConfig
    from grpo_fast.model import load_model

    model, tokenizer = load_model(GRPOConfig(load_in_4bit=True, lora_r=4, lora_alpha=8), torch.device(DEVICE))
    with torch.no_grad():  # peft starts B at zero; give the adapter an effect to preserve
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return model.train(), tokenizer  # train mode: see _linear4bit (lora_dropout is 0)


@pytest.fixture(scope="module")
def qlora():
    return _tiny_qlora_model()


def test_fused_nf4_decode_groups_lora_layers_keeps_logits_and_restores(qlora, launches):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model, tokenizer = qlora
    before = dict(model.named_modules())
    lora_layers = {name: module for name, module in before.items() if isinstance(module, LoraLinear4bit)}
    assert len(lora_layers) == 2 * 7
    input_ids = torch.randint(3, len(tokenizer), (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        with fused_nf4_decode(model, max_rows=16, force=True) as swapped:
            assert sorted(swapped) == sorted(lora_layers)  # the peft layers, adapters included
            for name in swapped:
                module = model.get_submodule(name)
                assert isinstance(module, FusedNF4Linear) and module.original is lora_layers[name]
                assert module.group.rank == 16  # r = 4, padded to the tensor-core op's 16
            fused = model(input_ids=input_ids).logits
        # per layer: q/k/v in one launch, o, gate/up in one launch, down
        assert sorted(map(len, launches)) == sorted([4, 2, 3, 2] * 2)
    torch.testing.assert_close(fused, expected, rtol=2e-2, atol=2e-2)  # bf16 compute: roundings differ
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)


def test_lora_snapshot_follows_the_adapters_and_the_cache_keeps_the_repacked_copy(qlora):
    model, tokenizer = qlora
    input_ids = torch.randint(3, len(tokenizer), (1, 4), device=DEVICE)
    cache = NF4DecodeCache()
    lora_b = next(p for n, p in model.named_parameters() if "q_proj.lora_B" in n)
    with torch.no_grad():
        with fused_nf4_decode(model, force=True, cache=cache):
            first = model(input_ids=input_ids).logits
        groups = dict(cache.groups)
        assert cache.nbytes > 0 and len(groups) == 8
        saved = lora_b.clone()
        lora_b.mul_(3.0)  # a training step changed the adapter
        try:
            expected = model(input_ids=input_ids).logits
            with fused_nf4_decode(model, force=True, cache=cache):
                second = model(input_ids=input_ids).logits
        finally:
            lora_b.copy_(saved)
    assert all(cache.groups[key] is group for key, group in groups.items())  # repacked once, reused
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected, rtol=2e-2, atol=2e-2)
    cache.clear()
    assert cache.nbytes == 0


def test_fused_nf4_decode_restores_after_an_exception(qlora):
    model, _ = qlora
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


def test_fused_group_traces_as_one_graph(launches):
    """torch.compile sees the kernel as one opaque op (grpo_fast::nf4_decode) and the grouped members'
    hand-off as plain Python: three Linears, one launch, no graph break (fullgraph=True)."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = _linear4bit(64, 32), _linear4bit(64, 16), _linear4bit(64, 16)

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x) * 2, self.v_proj(x)], dim=-1)

    model = Attention()
    x = torch.randn(3, 64, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        with fused_nf4_decode(model, force=True):
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert launches == [(0, 32, 48, 64)]


def test_benchmark_tiny_run_writes_results(tmp_path):
    from benchmarks import nf4 as nf4_bench

    grouped = "tiny_qkv (grouped) + LoRA"
    args = ["--tiny", "--shapes", f"tiny_qo,{grouped}", "--rows", "2", "--warmup-ms", "0", "--rep-ms", "0",
            "--min-reps", "1", "--out-dir", str(tmp_path), "--name", "smoke"]
    if torch.cuda.is_available():
        args.append("--no-graphs")
    payload = nf4_bench.main(args)
    assert {(row["shape"], row["provider"]) for row in payload["rows"]} == {
        (shape, provider) for shape in ("tiny_qo", grouped) for provider in ("fused", "bnb", "bf16")}
    for row in payload["rows"]:
        assert row["status"] == "ok" and row["ms_median"] > 0 and row["packed_gbps"] > 0, row
        # every provider computes the same product: x @ W.T (+ the biases and each member's LoRA, whose
        # terms are as large as the product's: a provider that dropped or misplaced one would be off by ~1)
        assert row["check"] < 1e-2, row
        assert row.get("static_ceiling") is None  # the report models no CPU
    assert next(r for r in payload["rows"] if r["shape"] == grouped)["N"] == 40 + 24 + 24
    assert (tmp_path / "smoke.json").exists() and (tmp_path / "smoke.md").exists()


def test_benchmark_reads_the_static_reports_ceilings_for_the_gpus_it_models(tmp_path):
    """A GPU run puts the committed report's ceiling beside each measured case of the fused kernel:
    the report covers every shape and default row count the benchmark measures on every GPU it
    models; other GPUs (and a missing report) get none."""
    import json

    from benchmarks import nf4 as nf4_bench
    from benchmarks.static.static_model import DEVICES

    report = json.loads(nf4_bench.STATIC_REPORT.read_text())
    for gpu, key in (("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
                     ("NVIDIA GeForce RTX 4090", "rtx4090")):
        model_name, ceilings = nf4_bench.static_ceilings(gpu)
        assert model_name == DEVICES[key].name
        assert {(shape, rows) for shape in nf4_bench.shape_table(False) for rows in (1, 8, 16, 32, 64)} <= set(ceilings)
        case = next(c for c in report["cases"] if c["device"] == model_name and c["group"] == "nf4"
                    and c["params"]["shape"] == "qkv (grouped) + LoRA" and c["params"]["rows"] == 64)
        assert ceilings[("qkv (grouped) + LoRA", 64)] == case["ceiling"]
    assert nf4_bench.static_ceilings("Tesla T4") == (None, {})
    assert nf4_bench.static_ceilings("NVIDIA H100 PCIe") == (None, {})  # 114 SMs, 2 TB/s: not the model's part
    assert nf4_bench.static_ceilings("NVIDIA H200", tmp_path / "missing.json") == (None, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal only applies without CUDA")
def test_benchmark_without_cuda_exits_with_a_clear_message():
    from benchmarks import nf4 as nf4_bench

    with pytest.raises(SystemExit, match="needs a CUDA device; use --tiny"):
        nf4_bench.main([])
