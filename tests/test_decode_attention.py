"""The decode attention kernel (kernels/decode_attention.py) against sdpa on the expanded cache, and the
engine with it against Hugging Face generate (greedy, fp32, grouped-query attention)."""

import pytest
import torch

import grpo_fast.kernels.decode_attention as attention_module
from grpo_fast.engine import RolloutEngine
from helpers import DEVICE


def _case(rows=3, heads=8, kv_heads=2, length=40, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cache = [torch.randn(rows + 1, kv_heads, length, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(2)]
    q = torch.randn(rows, heads, head_dim, generator=generator).to(DEVICE, dtype)
    k_new, v_new = (torch.randn(rows, kv_heads, head_dim, generator=generator).to(DEVICE, dtype) for _ in range(2))
    start = torch.tensor([0, 7, 21][:rows], dtype=torch.int32, device=DEVICE)  # left padding of each row
    return q, k_new, v_new, cache, start


def _expected(q, k_new, v_new, keys, values, start, position, scale):
    """sdpa over every query head with K/V repeated per head, columns outside [start, position] masked,
    the new token at column position."""
    rows, heads, _ = q.shape
    keys, values = keys[:rows].clone(), values[:rows].clone()
    keys[:, :, position], values[:, :, position] = k_new, v_new
    group = heads // keys.shape[1]
    columns = torch.arange(keys.shape[2], device=q.device)
    mask = (columns[None, :] >= start[:, None]) & (columns[None, :] <= position)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].double(), keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double(),
        attn_mask=mask[:, None, None], scale=scale)
    return out[:, :, 0]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_reads_each_rows_columns_and_writes_the_new_token(splits, dtype):
    q, k_new, v_new, (keys, values), start = _case(dtype=dtype)
    position, scale = 33, 0.25
    before = keys.clone(), values.clone()
    expected = _expected(q, k_new, v_new, keys, values, start, position, scale)
    tickets = torch.zeros(3 * 2, dtype=torch.int32, device=DEVICE)
    out = attention_module._launch(q, k_new, v_new, keys, values, start, torch.tensor([position], device=DEVICE),
                                   tickets, scale, splits=splits)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the probabilities meet V in bf16
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    # column `position` of rows 0..2 now holds the new token; nothing else changed (row 3 is not decoded)
    assert torch.equal(keys[:3, :, position], k_new) and torch.equal(values[:3, :, position], v_new)
    for buffer, old in zip((keys, values), before):
        changed = buffer != old
        changed[:3, :, position] = False
        assert not changed.any()
    assert not tickets.any()  # the merging program reset them


def test_columns_outside_the_rows_span_are_never_read():
    """NaN in the left padding and past the new token: a read of either would poison the output."""
    q, k_new, v_new, (keys, values), start = _case()
    position = 30
    expected = _expected(q, k_new, v_new, keys, values, start, position, 0.25)
    for buffer in (keys, values):
        buffer[:, :, position + 1:] = float("nan")
        for row, first in enumerate(start.tolist()):
            buffer[row, :, :first] = float("nan")
    out = attention_module._launch(q, k_new, v_new, keys, values, start, torch.tensor([position], device=DEVICE),
                                   torch.zeros(6, dtype=torch.int32, device=DEVICE), 0.25, splits=2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_engine_with_the_attention_kernel_equals_generate_with_grouped_query_attention():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from test_engine import _eos_mid_generation, _hf_greedy, _params, _prompts
    from tiny_lm import tiny_tokenizer

    class Fused(RolloutEngine):
        def _fused_attention(self, config, implementation, device):
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


def test_compaction_moves_each_rows_first_column_with_its_keys():
    from grpo_fast.engine import SlotCache

    cache = SlotCache(num_layers=1, capacity=4, length=8, device=torch.device(DEVICE))
    cache.prefill_group = 1
    states = torch.arange(4, dtype=torch.float32, device=DEVICE).view(4, 1, 1, 1).expand(4, 1, 3, 2)
    cache.layers[0].update(states, states)
    cache.prefill_group = None
    cache.set_batch(4)
    cache.use_fused_attention(torch.tensor([3, 0, 2, 1], dtype=torch.int32, device=DEVICE), kv_heads=1)
    cache.compact(torch.tensor([2, 0], device=DEVICE))
    assert cache.batch == 2 and cache.row_start[:2].tolist() == [2, 3]
    assert cache.layers[0].keys[:2, 0, 0, 0].tolist() == [2.0, 0.0]
