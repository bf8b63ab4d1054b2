"""Fail-safe Triton paths (grpo_fast/fallback.py): each kernel made to fail as Triton fails (a
compile error, too little shared memory) gives its torch path's result, one warning naming the
kernel, the device and the reason, once; GRPO_FAST_STRICT=1 makes it an error. Errors that are not
Triton's (the caller's ValueError, out of memory, torch's own RuntimeErrors) are never swallowed."""

from __future__ import annotations

import ast
import functools
import warnings

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import grpo_fast.kernels.decode_attention as attention_module
import grpo_fast.kernels.grpo_kernel as row_module
import grpo_fast.kernels.logprob_kernel as logprob_module
import grpo_fast.kernels.nf4_decode as nf4_module
import grpo_fast.kernels.sampling as sampling_module
from grpo_fast import fallback
from grpo_fast.loss import GRPOLossConfig, grpo_loss, token_logprobs
from helpers import DEVICE

DEVICE_NAME = fallback.describe_device(DEVICE)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(fallback.STRICT_ENV, raising=False)  # conftest sets it on CUDA machines
    fallback.reset()
    yield
    fallback.reset()


def _compile_error():
    return CompilationError("x = tl.dot(a, b)", ast.parse("x").body[0], "forced: unsupported layout")


ERRORS = {"compile": _compile_error, "resources": lambda: OutOfResources(232448, 101376, "shared memory")}


def _break(monkeypatch, kernel, make_error):
    """Every launch of the JIT function ``kernel`` raises as Triton does when it cannot compile it."""
    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        raise make_error()

    monkeypatch.setattr(kernel, "run", run)
    return calls


def _one_warning(records, kernel, reason):
    ours = [r for r in records if issubclass(r.category, fallback.KernelFallbackWarning)]
    assert len(ours) == 1, [str(r.message) for r in ours]
    text = str(ours[0].message)
    assert f"'{kernel}'" in text and DEVICE_NAME in text and reason in text and "\n" not in text


def _loss_case(dtype):
    generator = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 16, 40
    hidden = (torch.randn(B, T, H, generator=generator) * 0.5).to(DEVICE, dtype)
    weight = (torch.randn(V, H, generator=generator) * 0.5).to(DEVICE, dtype)
    ids = torch.randint(0, V, (B, T), generator=generator).to(DEVICE)
    mask = torch.ones(B, T, device=DEVICE)
    mask[1, 3:] = 0
    old = (torch.randn(B, T, generator=generator) * 0.1 - 3.7).to(DEVICE)
    advantages = torch.tensor([1.0, -0.5], device=DEVICE)
    return hidden, weight, ids, mask, old, advantages


def _loss_and_grads(backend, dtype):
    hidden, weight, ids, mask, old, advantages = _loss_case(dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = grpo_loss(hidden, weight, ids, mask, advantages=advantages, old_logps=old, backend=backend,
                    config=GRPOLossConfig(loss_type="grpo"))
    out.loss.backward()
    return out.loss.detach(), out.logps, hidden.grad, weight.grad


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_loss_training_pass_falls_back_to_the_torch_pass(monkeypatch, error, dtype):
    calls = _break(monkeypatch, row_module._grpo_row_kernel, ERRORS[error])
    expected = _loss_and_grads("torch", dtype)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        first = _loss_and_grads("triton", dtype)
        tries = len(calls)
        second = _loss_and_grads("triton", dtype)  # decided: not tried again, no second warning
    assert tries == 1 and len(calls) == 1
    for got in (first, second):
        for value, want in zip(got, expected):
            assert torch.equal(value, want)
    _one_warning(records, "grpo_loss", "CompilationError" if error == "compile" else "OutOfResources")


@pytest.mark.parametrize("on_chip", [False, True], ids=["chunked", "on_chip"])
def test_token_logprobs_fall_back_to_the_torch_pass(monkeypatch, on_chip):
    kernel = logprob_module._logprob_fwd_kernel if on_chip else row_module._grpo_row_kernel
    _break(monkeypatch, kernel, ERRORS["resources"])
    hidden, weight, ids, mask, _, _ = _loss_case(torch.float32)
    expected = token_logprobs(hidden, weight, ids, completion_mask=mask, backend="torch", return_entropy=True)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = token_logprobs(hidden, weight, ids, completion_mask=mask, backend="triton", on_chip=on_chip,
                             return_entropy=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    _one_warning(records, "token_logprobs_on_chip" if on_chip else "token_logprobs", "out of resource: shared memory")


def test_strict_makes_a_kernel_failure_an_error(monkeypatch):
    _break(monkeypatch, row_module._grpo_row_kernel, ERRORS["compile"])
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    with pytest.raises(fallback.KernelFailure, match=r"'grpo_loss' failed on .*CompilationError.*GRPO_FAST_STRICT=1"):
        _loss_and_grads("triton", torch.float32)
    hidden, weight, ids, mask, _, _ = _loss_case(torch.float32)
    with pytest.raises(fallback.KernelFailure, match="'token_logprobs'"):
        token_logprobs(hidden, weight, ids, backend="triton")


def test_the_callers_errors_are_not_swallowed():
    """Only Triton's failures fall back: a ValueError about the arguments, CUDA out of memory and
    torch's RuntimeErrors propagate, and the kernel stays enabled."""
    def torch_path():
        raise AssertionError("the torch path must not run")

    for error in (ValueError("x: expected a 2-D tensor"), torch.cuda.OutOfMemoryError("CUDA out of memory"),
                  RuntimeError("mat1 and mat2 shapes cannot be multiplied")):
        def fused(error=error):
            raise error

        with pytest.raises(type(error)):
            fallback.run("probe", DEVICE, fused, torch_path)
        assert fallback.usable("probe", DEVICE)


def test_runtime_errors_are_triton_failures_only_when_raised_inside_triton():
    """The launcher and the compiler passes raise plain RuntimeErrors from Triton's own files."""
    def raised(filename):
        try:
            exec(compile("raise RuntimeError('Triton Error [CUDA]: invalid argument')", filename, "exec"), {})
        except RuntimeError as error:
            return error

    assert fallback.kernel_failure(raised("/venv/site-packages/triton/backends/nvidia/driver.py"))
    assert not fallback.kernel_failure(raised("/work/grpo_fast/engine.py"))
    assert fallback.kernel_failure(NotImplementedError("sm_61 is not supported"))
    assert fallback.kernel_failure(_compile_error()) and fallback.kernel_failure(ERRORS["resources"]())


# ---- NF4 decode ---------------------------------------------------------------------------------


def test_nf4_decode_falls_back_to_bitsandbytes(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from grpo_fast.nf4 import FusedNF4Linear, kernel_works
    from test_nf4_decode import _linear4bit

    layer = _linear4bit(64, 24)
    x = torch.randn(3, 64, device=DEVICE)
    calls = _break(monkeypatch, nf4_module._nf4_decode_kernel, ERRORS["compile"])
    with torch.no_grad():
        expected = layer(x)
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            fused = FusedNF4Linear(layer, max_rows=8, force=True)
            first, second = fused(x), fused(x)
    assert len(calls) == 1 and torch.equal(first, expected) and torch.equal(second, expected)
    _one_warning(records, "nf4_decode", "CompilationError")
    # the rollout engine asks before compiling its decode step: the answer stays no in this process
    model = torch.nn.Sequential(layer)
    assert not kernel_works(model) and len(calls) == 1
    fallback.reset()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert not kernel_works(model) and not kernel_works(model)
    assert len(calls) == 2  # one probe launch
    _one_warning(records, "nf4_decode", "CompilationError")
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    fallback.reset()
    with pytest.raises(fallback.KernelFailure, match="'nf4_decode'"):
        kernel_works(model)


def test_nf4_probe_passes_for_a_working_kernel():
    pytest.importorskip("bitsandbytes")
    from grpo_fast.nf4 import kernel_works
    from test_nf4_decode import _linear4bit

    assert kernel_works(torch.nn.Sequential(_linear4bit(64, 24))) and fallback.usable("nf4_decode", DEVICE)
    assert kernel_works(torch.nn.Sequential(torch.nn.Linear(4, 4)))  # no NF4 layer: nothing to decide


def test_nf4_probe_reads_a_single_copy_model():
    """With nf4_single_copy the layers hold no bitsandbytes weight: the probe launches the kernel on the
    model's own repacked weight (and finds the device there), as the engine asks before compiling."""
    pytest.importorskip("bitsandbytes")
    from grpo_fast import nf4 as nf4_module
    from grpo_fast.nf4 import kernel_works
    from grpo_fast.nf4_train import NF4Linear, single_copy_nf4
    from test_nf4_decode import _linear4bit

    model = torch.nn.Sequential(_linear4bit(64, 24))
    assert single_copy_nf4(model) == 1 and isinstance(model[0], NF4Linear)
    launched = []
    decode = nf4_module.nf4_decode_matmul
    nf4_module_launch = lambda *a, **k: launched.append(a[1]) or decode(*a, **k)  # noqa: E731
    import unittest.mock

    with unittest.mock.patch.object(nf4_module, "nf4_decode_matmul", nf4_module_launch):
        assert kernel_works(model)
    assert launched == [model[0].nf4_packed.weight]


# ---- the engine: sampling and decode attention ------------------------------------------------


def test_sampling_falls_back_to_the_torch_sampler(monkeypatch):
    from grpo_fast.engine import _sample_one_pass, sample_tokens
    from grpo_fast.rollout import SamplingParams

    calls = _break(monkeypatch, sampling_module._sample_kernel, ERRORS["resources"])
    params = SamplingParams(num_generations=1, max_completion_length=4, eos_token_ids=(3,), pad_token_id=0,
                            temperature=0.8, min_completion_length=2)
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    steps = torch.tensor([0, 1, 2, 3, 0], device=DEVICE)
    rows = torch.arange(5, device=DEVICE)
    eos = torch.tensor([3], device=DEVICE)

    def draw(fused: bool):
        generator = torch.Generator(device=DEVICE).manual_seed(7)
        torch_path = functools.partial(_torch_sample, params=params, eos=eos, generator=generator)
        if not fused:
            return torch_path(logits, steps, rows)
        return _sample_one_pass(logits, steps, rows, params, eos, False, 11,
                                torch.zeros(5, dtype=torch.int32, device=DEVICE), torch_path)

    def _torch_sample(logits, steps, rows, params, eos, generator):
        return sample_tokens(logits, params, steps, eos, generator)

    expected = draw(fused=False)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        got = [draw(fused=True) for _ in range(2)]
    assert len(calls) == 1
    assert all(torch.equal(a, b) for pair in got for a, b in zip(pair, expected))
    _one_warning(records, "sampling", "OutOfResources")


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_lm import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval(), tokenizer


def test_decode_attention_is_decided_before_the_decode_loop(monkeypatch, gqa_model):
    from grpo_fast.engine import RolloutEngine
    from test_engine import _params

    class Fused(RolloutEngine):
        def _fused_attention(self, config, implementation, device, dtype=None):
            return implementation == "sdpa"

    model, tokenizer = gqa_model
    prompts = [tokenizer.encode(text) for text in ("the cat", "a b c")]
    params = _params(tokenizer, max_completion_length=3)
    expected = RolloutEngine(sync_every=2)(model, prompts, params)  # the sdpa paths
    calls = _break(monkeypatch, attention_module._decode_attention_kernel, ERRORS["compile"])
    used = []
    original = RolloutEngine._decode

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        used.append(self._cache.fused_attention if self._cache is not None else None)
        return result

    monkeypatch.setattr(RolloutEngine, "_decode", spy)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        first = Fused(sync_every=2, cuda_graphs=False)(model, prompts, params)
        second = Fused(sync_every=2, cuda_graphs=False)(model, prompts, params)
    assert first == expected and second == expected and used == [False, False]
    assert len(calls) == 1  # the probe's first launch, once per process
    _one_warning(records, "decode_attention", "CompilationError")
    monkeypatch.setenv(fallback.STRICT_ENV, "1")
    fallback.reset()
    with pytest.raises(fallback.KernelFailure, match="'decode_attention'"):
        Fused(sync_every=2, cuda_graphs=False)(model, prompts, params)


def test_a_working_attention_kernel_is_probed_once_and_used(monkeypatch, gqa_model):
    from grpo_fast.engine import RolloutEngine
    from test_engine import _params

    class Fused(RolloutEngine):
        def _fused_attention(self, config, implementation, device, dtype=None):
            return implementation == "sdpa"

    model, tokenizer = gqa_model
    prompts = [tokenizer.encode(text) for text in ("the cat", "a b c")]  # two rows decode; the probe has one
    params = _params(tokenizer, max_completion_length=2)
    launches = []
    original = attention_module._launch
    monkeypatch.setattr(attention_module, "_launch", lambda *a, **k: launches.append(a[0].shape[0]) or original(*a, **k))
    Fused(sync_every=2, cuda_graphs=False)(model, prompts, params)
    Fused(sync_every=2, cuda_graphs=False)(model, prompts, params)
    probes = [rows for rows in launches if rows == 1]
    assert len(probes) == 2 and len(launches) > 2  # the probe's two launches (once per process), the steps'
    assert fallback.usable("decode_attention", DEVICE)
