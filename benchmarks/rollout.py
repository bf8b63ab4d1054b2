"""Rollout throughput: grpo-fast's engine against Hugging Face ``generate`` on the same model.

(and, with ``--providers engine,hf,hf_cb``, transformers' continuous batching, ``generate_batch``)

    python -m benchmarks.rollout                                  # Qwen2.5-7B shape, NF4 + LoRA r16, 8..64 sequences
    python -m benchmarks.rollout --model qwen2.5-0.5b --quant none --lora-r 0
    python -m benchmarks.rollout --tiny --out-dir /tmp/rollout    # the same code path on CPU, in seconds

The model is a Qwen2.5 architecture with random weights built on the device (``benchmarks.models``),
in NF4 (double quantisation, bf16 compute) with a LoRA adapter (peft, unmerged, B nonzero) unless
told otherwise. Each of ``--concurrency`` sequences counts: ``concurrency / num_generations`` prompts
of ``--prompt-length`` random tokens, ``num_generations`` completions each, every completion forced
to ``--completion-length`` tokens (EOS suppressed until then: random weights would stop at random).
``--hf-completion-length`` shortens ``generate``'s forced length where its 512 tokens would not fit
a time budget (``benchmarks.suite``): its rate is then measured on the shorter completions (its
per-token cost is mostly per-step launch overhead, and the shorter context only favours it), and
the notes say so.

Per provider and concurrency: completion tokens/s (one untimed warm-up call, then ``--reps`` timed
calls, median), peak memory above the model during the warm-up call, and the fraction of the
memory-bandwidth limit: the bytes a decode step must read (every weight once: packed NF4 data and
its scales, LoRA, norms, the head; plus the keys and values of the context so far, averaged over
the steps) per decode step (call time / completion length, prefill included), divided by the
bandwidth of a device-to-device tensor copy measured in the same run (read + write bytes / time).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Callable

import torch

from benchmarks import common
from benchmarks.models import BLOCK_LINEARS, EOS_ID, PAD_ID, SHAPES, build_random_model
from grpo_fast.engine import RolloutEngine
from grpo_fast.rollout import SamplingParams, hf_generate

PROVIDERS = ("engine", "hf", "hf_cb")
DEFAULT_PROVIDERS = ("engine", "hf")  # hf_cb on request (--providers engine,hf,hf_cb)
COLUMNS = [
    ["provider", "provider", "s"], ["concurrency", "sequences", "d"], ["status", "status", "s"],
    ["tokens_per_s", "tokens/s", ".1f"], ["speedup_vs_hf", "x HF", ".2f"], ["ms_per_step", "ms/step", ".2f"],
    ["bytes_per_step_mib", "MiB read/step", ".0f"], ["read_gbps", "GB/s", ".1f"],
    ["frac_bandwidth", "of copy GB/s", ".1%"], ["peak_mib", "peak MiB", ".0f"],
    ["completion_length", "forced length", "d"], ["mean_length", "mean length", ".1f"], ["error", "error", "s60"],
]


def log(message: str) -> None:
    print(f"[rollout {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# model and workload
# ----------------------------------------------------------------------------------------------


def build_policy(model_name: str, device: torch.device, quant: str, lora_r: int):
    """The random-weight model, NF4 or not, with an unmerged LoRA adapter of rank ``lora_r`` (0: none)."""
    model = build_random_model(SHAPES[model_name], device, quant == "nf4", log=log)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=BLOCK_LINEARS,
                                                 task_type="CAUSAL_LM"))
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():  # B = 0 at init would make the adapter's products trivially skippable
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.01)
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes one decode step reads from the weights: every parameter once (NF4: the packed data
    and its quantisation statistics), except the input embeddings, of which it reads one row per
    sequence (unless they are tied to the head, which reads them whole)."""
    head = model.get_output_embeddings().weight
    embeddings = model.get_input_embeddings().weight
    total = 0
    for parameter in model.parameters():
        if parameter is embeddings and parameter is not head:
            continue
        total += parameter.numel() * parameter.element_size()
        state = getattr(parameter, "quant_state", None)
        while state is not None:  # absmax (uint8 with double quantisation) and the nested state's
            total += state.absmax.numel() * state.absmax.element_size()
            state = getattr(state, "state2", None)
    return total


def kv_bytes_per_token(model) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = model.get_input_embeddings().weight.element_size()  # the cache holds the compute dtype
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (count, length), generator=generator).tolist()


def providers(args) -> dict[str, Callable]:
    engine = RolloutEngine(sync_every=args.sync_every, cuda_graphs=not args.no_cuda_graphs,
                           fused_nf4=not args.no_fused_nf4, seed=0)
    return {"engine": engine, "hf": hf_generate, "hf_cb": continuous_batching_generate}


def _continuous_batching_config(requests: list[list[int]], max_new: int) -> dict:
    """A paged cache sized to the call's requests (its defaults on a CPU size the cache, and a mask
    beside it, to tens of GB); {} where this transformers has no ContinuousBatchingConfig."""
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return {}
    page = 32
    pages = sum(-(-(len(request) + max_new) // page) for request in requests)
    fields = ContinuousBatchingConfig.__dataclass_fields__ if dataclasses.is_dataclass(ContinuousBatchingConfig) else {}
    size = {"page_size": page} if "page_size" in fields else {"block_size": page}
    tokens = min(sum(len(request) for request in requests) + len(requests), 8192)
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=pages + 1, max_batch_tokens=tokens,
                                                                   **size)}


def continuous_batching_generate(model, prompt_ids, params: SamplingParams) -> list[list[int]]:
    """transformers' continuous batching (``model.generate_batch``: a paged KV cache, requests
    scheduled as slots free) as a ``Generate``, a peer to compare with, not a sampler grpo-fast trains
    with: it renormalises log-probs after filtering, drops ``min_new_tokens``, has no stop strings
    and seeds torch's global RNG. Each completion is its own request (the prompt repeated
    ``num_generations`` times). Forced lengths: with ``min_completion_length`` equal to the length,
    EOS is not given to it, so every request runs ``max_completion_length`` tokens."""
    from transformers import GenerationConfig

    forced = params.min_completion_length >= params.max_completion_length
    config = GenerationConfig(
        max_new_tokens=params.max_completion_length, do_sample=params.top_k != 1, temperature=params.temperature,
        top_k=params.top_k or None, top_p=params.top_p, min_p=params.min_p or None,
        eos_token_id=None if forced else list(params.eos_token_ids), pad_token_id=params.pad_token_id)
    requests = [list(prompt) for prompt in prompt_ids for _ in range(params.num_generations)]
    outputs = model.generate_batch(inputs=requests, generation_config=config, progress_bar=False,
                                   **_continuous_batching_config(requests, params.max_completion_length))
    order = sorted(outputs, key=lambda request: int(str(request).rsplit("_", 1)[-1]))  # req_0, req_1, ...
    return [list(outputs[request].generated_tokens) for request in order]


# ----------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------


def run_case(generate: Callable, model, prompts, params: SamplingParams, warmup_params: SamplingParams,
             device: torch.device, reps: int, samplers_to_release=()) -> dict:
    row: dict = {"status": "ok", "error": None, "ms_median": None, "peak_mib": None, "mean_length": None}
    for sampler in samplers_to_release:
        sampler.release()  # the previous case's kept KV cache is not this case's baseline
    try:
        common.free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        generate(model, prompts, warmup_params)  # compiles (engine: CUDA graphs for this shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        completions: list = []
        (median, p20, p80), _ = common.time_loop(lambda: completions.append(generate(model, prompts, params)), device,
                                                 warmup_ms=0.0, rep_ms=0.0, min_reps=reps)
        lengths = [len(ids) for ids in completions[-1]]
        row.update(ms_median=median, ms_p20=p20, ms_p80=p80, mean_length=sum(lengths) / len(lengths),
                   min_length=min(lengths))
    except Exception as error:  # noqa: BLE001 - a failure is a row, the sweep goes on
        row["status"] = "oom" if common.is_oom(error) else "error"
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    common.free_memory(device)
    return row


def add_derived(rows: list[dict], weights: int, kv_per_token: int, prompt_length: int, copy_gbps: float) -> None:
    """Per row, at its own forced completion length: tokens/s, time and bytes per decode step, the
    fraction of the copy bandwidth, and the speed-up over HF generate at the same concurrency."""
    for row in rows:
        if row["status"] != "ok":
            continue
        completion_length = row["completion_length"]
        context = prompt_length + (completion_length - 1) / 2  # mean context over the decode steps
        seconds = row["ms_median"] / 1e3
        step_bytes = weights + row["concurrency"] * context * kv_per_token
        row["tokens_per_s"] = row["concurrency"] * completion_length / seconds
        row["ms_per_step"] = row["ms_median"] / completion_length
        row["bytes_per_step_mib"] = step_bytes / 2**20
        row["read_gbps"] = step_bytes / (seconds / completion_length) / 1e9
        row["frac_bandwidth"] = row["read_gbps"] / copy_gbps
    hf = {row["concurrency"]: row for row in rows if row["provider"] == "hf" and row["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok" and row["concurrency"] in hf:
            row["speedup_vs_hf"] = row["tokens_per_s"] / hf[row["concurrency"]]["tokens_per_s"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[name for name in SHAPES if name != "tiny"], default="qwen2.5-7b")
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 and short sequences: a CPU smoke run")
    parser.add_argument("--quant", choices=["nf4", "none"], default=None,
                        help="base weights (default nf4 on CUDA, none on CPU)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the adapter (0: no adapter)")
    parser.add_argument("--concurrency", type=lambda text: [int(v) for v in common.comma_list(text)], default=[8, 16, 32, 64],
                        help="sequences sampled at once (comma-separated)")
    parser.add_argument("--num-generations", type=int, default=8, help="completions per prompt (shared prefill)")
    parser.add_argument("--prompt-length", type=int, default=None, help="tokens per prompt (default 128; tiny 8)")
    parser.add_argument("--completion-length", type=int, default=None,
                        help="forced tokens per completion (default 512; tiny 16)")
    parser.add_argument("--hf-completion-length", type=int, default=None,
                        help="forced tokens per completion for HF generate (default --completion-length): "
                             "shorter where its full length would not fit a time budget")
    parser.add_argument("--providers", type=common.comma_list, default=list(DEFAULT_PROVIDERS),
                        help="engine, hf (generate), hf_cb (transformers' continuous batching: generate_batch)")
    parser.add_argument("--reps", type=int, default=1, help="timed calls per measurement (after one warm-up call)")
    parser.add_argument("--sync-every", type=int, default=8, help="engine: decode steps between host checks")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="engine: eager decode step")
    parser.add_argument("--no-fused-nf4", action="store_true", help="engine: bitsandbytes' NF4 path for decode")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the bandwidth copy (default 1024; CPU 64)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out-dir", default=None,
                        help='default benchmarks/results/<device>/; "{device}" becomes the device slug')
    parser.add_argument("--name", default=None, help="file stem (default rollout-<date>-<time>)")
    parser.add_argument("--commit", default=None, help="commit to record where the checkout has no .git")
    args = parser.parse_args(argv)
    for name in args.providers:
        if name not in PROVIDERS:
            parser.error(f"--providers: expected names from {list(PROVIDERS)}, received {name!r}")
    for name in ("prompt_length", "completion_length", "hf_completion_length"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected > 0, received {value}")
    for value in args.concurrency:
        if value < args.num_generations or value % args.num_generations:
            parser.error(f"--concurrency: expected multiples of --num-generations={args.num_generations}, "
                         f"received {value}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    model_name = "tiny" if args.tiny else args.model
    quant = args.quant or ("nf4" if device.type == "cuda" else "none")
    prompt_length = args.prompt_length or (8 if args.tiny else 128)
    completion_length = args.completion_length or (16 if args.tiny else 512)
    hf_length = args.hf_completion_length or completion_length
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    copy = common.copy_bandwidth(device, args.copy_mib or (1024 if device.type == "cuda" else 64))
    log(f"{env['device']}: device-to-device copy {copy['gbps']:.1f} GB/s")

    torch.manual_seed(0)
    model = build_policy(model_name, device, quant, args.lora_r)
    weights, kv_per_token = weight_bytes(model), kv_bytes_per_token(model)
    log(f"{model_name}, {quant}, LoRA r{args.lora_r}: {weights / 2**20:.0f} MiB of weights read per decode step, "
        f"{kv_per_token / 2**10:.1f} KiB of KV per token")
    lengths = {name: hf_length if name in ("hf", "hf_cb") else completion_length for name in PROVIDERS}
    params = {name: SamplingParams(num_generations=args.num_generations, max_completion_length=length,
                                   eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID, min_completion_length=length)
              for name, length in lengths.items()}
    samplers = providers(args)
    rows: list[dict] = []
    out_dir = common.results_dir(env, args.out_dir)
    stem = args.name or common.default_stem("rollout", env)

    def save(partial: bool) -> tuple[dict, dict]:
        add_derived(rows, weights, kv_per_token, prompt_length, copy["gbps"])
        shortened = (f"; HF generate's completions forced to {hf_length} tokens instead (to fit a time budget: its "
                     "per-token cost is mostly per-step overhead, and its shorter context only favours it)"
                     if "hf" in args.providers and hf_length != completion_length else "")
        payload = {
            "benchmark": "rollout",
            "title": "Rollouts: grpo-fast's engine vs Hugging Face generate (completion tokens/s)",
            "env": env,
            "settings": {**vars(args), "model": model_name, "quant": quant, "prompt_length": prompt_length,
                         "completion_length": completion_length, "hf_completion_length": hf_length,
                         "shape": SHAPES[model_name]},
            "copy": copy,
            "weight_bytes_per_step": weights,
            "kv_bytes_per_token": kv_per_token,
            "notes": [
                f"random-weight {model_name} ({quant}, LoRA r{args.lora_r} unmerged), {args.num_generations} completions "
                f"per prompt, prompts of {prompt_length} tokens, completions forced to {completion_length} tokens"
                + shortened,
                "bandwidth fraction: (weights {:.0f} MiB + KV of the mean context) per decode step (call time / forced "
                "length, prefill included) vs a same-run copy at {:.1f} GB/s".format(weights / 2**20, copy["gbps"]),
                "peak MiB: above the model, during the warm-up call (CUDA only)",
            ],
            "group_by": ["model", "quant"],
            "columns": COLUMNS,
            "plot": {"group_by": ["model", "quant"], "x": "concurrency", "series": "provider",
                     "panels": [["tokens_per_s", "completion tokens/s"], ["frac_bandwidth", "fraction of copy bandwidth"]]},
            "rows": rows,
        }
        return payload, common.write_results(payload, out_dir, stem, partial=partial)

    for concurrency in args.concurrency:
        prompts = random_prompts(concurrency // args.num_generations, prompt_length, model.config.vocab_size)
        for name in args.providers:
            # HF generate has nothing to compile: a short warm-up call; the engine's must be the
            # timed shape (its CUDA graphs are per batch size and cache length).
            warmup = params[name] if name == "engine" else dataclasses.replace(
                params[name], max_completion_length=min(8, lengths[name]), min_completion_length=min(8, lengths[name]))
            row = {"provider": name, "concurrency": concurrency, "model": model_name, "quant": quant,
                   "lora_r": args.lora_r, "completion_length": lengths[name],
                   **run_case(samplers[name], model, prompts, params[name], warmup, device, args.reps,
                              samplers_to_release=[sampler for sampler in samplers.values()
                                                   if isinstance(sampler, RolloutEngine)])}
            rows.append(row)
            log(f"{name:>6} x{concurrency:<3}: {row['status']} "
                + (f"{concurrency * lengths[name] / (row['ms_median'] / 1e3):.1f} tokens/s" if row["status"] == "ok"
                   else row["error"]))
        save(partial=True)  # each finished concurrency survives a run stopped on a time limit
    payload, paths = save(partial=False)
    log(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plot(s)")
    return payload


if __name__ == "__main__":
    main()
