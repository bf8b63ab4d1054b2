"""The decode attention kernel (kernels/decode_attention.py) against per-row sdpa over the shared prompt
slot and the row's own completion, and the engine with it against Hugging Face generate (greedy, fp32,
grouped-query attention)."""

import pytest
import torch

import grpo_fast.kernels.decode_attention as attention_module
from grpo_fast.engine import RolloutEngine
from helpers import DEVICE


ROW_PROMPT = [1, 0, 1, 2]  # rows of different groups, not in slot order (as after compaction)
ROW_START = [3, 0, 3, 17]  # each row's first prompt column: its prompt right-aligned in the slot
ROW_POSITION = [5, 0, 13, 19]  # each row's completion tokens so far: rows at different steps


def _case(heads=8, kv_heads=2, prompt_length=24, completion_length=20, head_dim=16, dtype=torch.float32, seed=0):
    """Three prompt slots (and a spare) of 24 columns, four rows (and a spare) of 20 completion columns."""
    generator = torch.Generator().manual_seed(seed)
    rows, slots = len(ROW_PROMPT), max(ROW_PROMPT) + 1

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    prompt = [random(slots + 1, kv_heads, prompt_length, head_dim) for _ in range(2)]
    completion = [random(rows + 1, kv_heads, completion_length, head_dim) for _ in range(2)]
    q = random(rows, heads, head_dim)
    k_new, v_new = random(rows, kv_heads, head_dim), random(rows, kv_heads, head_dim)
    index = [torch.tensor(values, dtype=torch.int32, device=DEVICE) for values in (ROW_PROMPT, ROW_START, ROW_POSITION)]
    return q, k_new, v_new, prompt, completion, index


def _expected(q, k_new, v_new, prompt, completion, index, scale):
    """Per row, in float64: sdpa of every query head (K/V repeated per head) over the row's prompt slot's
    columns [start, P), its completion columns [0, position) and the new token."""
    out = []
    group = q.shape[1] // k_new.shape[1]
    for row, (slot, first, position) in enumerate(zip(*(tensor.tolist() for tensor in index))):
        keys, values = (torch.cat([segment[slot, :, first:], own[row, :, :position], new[row, :, None]], dim=1).double()
                        for segment, own, new in ((prompt[0], completion[0], k_new), (prompt[1], completion[1], v_new)))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q[row, :, None].double(), keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), scale=scale))
    return torch.stack(out)[:, :, 0]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: the interpreter casts its loads to fp32 (UPCAST)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_kernel_reads_the_shared_prompt_and_each_rows_completion_and_writes_the_new_token(splits, dtype):
    q, k_new, v_new, prompt, completion, index = _case(dtype=dtype)
    scale = 0.25
    before = [tensor.clone() for tensor in (*prompt, *completion)]
    expected = _expected(q, k_new, v_new, prompt, completion, index, scale)
    tickets = torch.zeros(4 * 2, dtype=torch.int32, device=DEVICE)
    out = attention_module._launch(q, k_new, v_new, *prompt, *completion, *index, tickets, scale, splits=splits)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit: the probabilities meet V in 16 bits
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    # completion column `position` of rows 0..3 now holds the new token; nothing else changed (the
    # prompt segment is only read; row 4 is not decoded)
    rows = torch.arange(4, device=DEVICE)
    position = index[2].long()
    assert torch.equal(completion[0][rows, :, position], k_new) and torch.equal(completion[1][rows, :, position], v_new)
    for buffer, old in zip((*prompt, *completion), before):
        changed = buffer != old
        if buffer.shape[2] == completion[0].shape[2]:
            changed[rows, :, position] = False
        assert not changed.any()
    assert not tickets.any()  # the merging program reset them


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_columns_outside_the_rows_spans_are_never_read(splits):
    """NaN in each slot's columns before the row's start, past each row's position, and in the unused slot
    and row: a read of any would poison the output."""
    q, k_new, v_new, prompt, completion, index = _case()
    expected = _expected(q, k_new, v_new, prompt, completion, index, 0.25)
    slot_of, first_of, position_of = (tensor.tolist() for tensor in index)
    for buffer in prompt:
        buffer[-1] = float("nan")
        for slot, first in zip(slot_of, first_of):
            buffer[slot, :, :first] = float("nan")
    for buffer in completion:
        buffer[-1] = float("nan")
        for row, position in enumerate(position_of):
            buffer[row, :, position:] = float("nan")
    out = attention_module._launch(q, k_new, v_new, *prompt, *completion, *index,
                                   torch.zeros(8, dtype=torch.int32, device=DEVICE), 0.25, splits=splits)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_what_it_cannot_index():
    q, k_new, v_new, prompt, completion, index = _case()
    tickets = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="row_prompt: expected an int32 tensor of at least 4 rows"):
        attention_module._launch(q, k_new, v_new, *prompt, *completion, index[0].long(), *index[1:], tickets, 0.25)
    with pytest.raises(ValueError, match="keys: expected a contiguous"):
        attention_module._launch(q, k_new, v_new, *prompt, completion[0].transpose(1, 2), completion[1], *index,
                                 tickets, 0.25)


def test_engine_with_the_attention_kernel_equals_generate_with_grouped_query_attention():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from test_engine import _eos_mid_generation, _hf_greedy, _params, _prompts
    from tiny_lm import tiny_tokenizer

    class Fused(RolloutEngine):
        def _fused_attention(self, config, implementation, device, dtype=None):
            return implementation == "sdpa"

    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    prompts = _prompts(tokenizer)[:3]  # 11, 1 and 11 tokens: rows start at different columns
    eos_ids = _eos_mid_generation(model, _prompts(tokenizer), tokenizer.pad_token_id)
    expected = _hf_greedy(model, prompts, tokenizer.pad_token_id, eos_ids, max_new=8)
    completions = Fused(sync_every=2)(model, prompts, _params(tokenizer, eos_token_ids=eos_ids, max_completion_length=8))
    assert completions == expected


def test_compaction_moves_each_rows_completion_and_state_not_the_prompt_slots():
    from grpo_fast.engine import SlotCache

    cache = SlotCache(num_layers=1, slots=2, capacity=4, prompt_length=8, completion_length=8,
                      device=torch.device(DEVICE))
    cache.prefill_slots = torch.tensor([0, 1], device=DEVICE)
    prompt = torch.arange(2, dtype=torch.float32, device=DEVICE).view(2, 1, 1, 1).expand(2, 1, 3, 2)
    cache.layers[0].update(prompt, prompt)
    cache.prefill_slots = None
    layer = cache.layers[0]
    assert layer.prompt_keys.shape == (2, 1, 8, 2) and layer.keys.shape == (4, 1, 8, 2)
    assert layer.prompt_keys[:, 0, 5:, 0].tolist() == [[0.0] * 3, [1.0] * 3]  # right-aligned in the slot
    cache.set_batch(4)
    cache.start_rows(torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=DEVICE),
                     torch.tensor([5, 5, 6, 6], dtype=torch.int32, device=DEVICE), group=2)
    cache.row_position[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    layer.keys[:4] = torch.arange(4, dtype=torch.float32, device=DEVICE).view(4, 1, 1, 1) + 10
    cache.compact(torch.tensor([2, 0], device=DEVICE))
    assert cache.batch == 2 and not cache.slot_major  # the masked path gathers each row's prompt from now on
    assert (cache.row_prompt[:2].tolist(), cache.row_start[:2].tolist(), cache.row_position[:2].tolist()) == (
        [1, 0], [6, 5], [3, 1])
    assert layer.keys[:2, 0, 0, 0].tolist() == [12.0, 10.0]
    assert layer.prompt_keys[:, 0, 7, 0].tolist() == [0.0, 1.0]
    # the masked path's columns: prompt from the row's start, completion up to its position
    assert cache.attention_mask().int().tolist() == [[0] * 6 + [1] * 2 + [1] * 4 + [0] * 4,
                                                     [0] * 5 + [1] * 3 + [1] * 2 + [0] * 6]
