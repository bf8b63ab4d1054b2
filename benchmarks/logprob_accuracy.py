"""Log-prob accuracy in bf16: grpo-fast's paths and TRL's against a float64 answer.

    python -m benchmarks.logprob_accuracy                       # Qwen2.5-7B's head, 256 tokens (GPU), 32 (CPU)
    python -m benchmarks.logprob_accuracy --tokens 64 --max-logits 18,32
    python -m benchmarks.logprob_accuracy --tiny                # small head, CPU smoke run

Inputs: bf16 hidden states and lm_head weight (default H=3584, V=152064) whose logits look like a
trained model's: a spread of N(0, ~2-8) over the vocabulary and, per token, four contenders within
2.5 of the row maximum (`--max-logits`, 18 and 32 by default), with the targets sampled from the
softmax as rollouts sample them (so often not the top token). The answer is the float64
log-softmax of the same bf16 inputs; every path's error is |logp - answer| over the tokens.

Paths:
  grpo_fast/<backend>/train     grpo_loss(...).logps (the training pass: fp32 logits per chunk)
  grpo_fast/<backend>/no_grad   token_logprobs(...) (old / reference policy passes)
  grpo_fast/triton/on_chip      token_logprobs(..., on_chip=True) (the forward-only kernel)
  eager/bf16_logits             logits = hidden @ W.T in bf16, then log_softmax in fp32
  trl/selective_log_softmax     TRL's selective_log_softmax on the bf16 logits (what GRPOTrainer
                                computes from a bf16 model's logits); "unavailable" without TRL
Also reported: max |train - no_grad| per backend (0 means a first iteration's ratio is exactly 1).
On CPU the Triton paths run under TRITON_INTERPRET=1 (set here when CUDA is absent): the same
arithmetic as the compiled kernels up to the order of fp32 sums.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402

from . import common  # noqa: E402


def realistic_head(n: int, H: int, V: int, max_logit: float, dtype: torch.dtype, seed: int = 0,
                   contenders: int = 4, device: torch.device | str = "cpu"):
    """(hidden [1, n, H], weight [V, H], ids [1, n]) in `dtype` with logits like a trained model's: a
    spread over the vocabulary and, per token, `contenders` tokens within 2.5 of `max_logit`;
    targets sampled from the float64 softmax of the rounded inputs."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64) * 2.0
    for row in range(n):  # the least change of the hidden state that puts the contenders' logits in place
        tokens = torch.randperm(V, generator=g)[:contenders]
        wanted = max_logit - torch.cat([torch.zeros(1, dtype=torch.float64),
                                        2.5 * torch.rand(contenders - 1, generator=g, dtype=torch.float64)])
        rows = weight[tokens]
        hidden[row] += torch.linalg.lstsq(rows, wanted - rows @ hidden[row]).solution
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    probs = torch.softmax(hidden.double() @ weight.double().T, dim=-1)
    ids = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return hidden[None].to(device), weight.to(device), ids[None].to(device)


def _errors(got: torch.Tensor, exact: torch.Tensor) -> dict:
    err = (got.double() - exact).abs()
    return {"max_abs_error": err.max().item(), "mean_abs_error": err.mean().item()}


def measure_case(hidden, weight, ids, backends, chunk_size=None) -> list[dict]:
    """One row per path for one input (see the module docstring)."""
    from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
    from grpo_fast.reference import reference_logprobs

    with torch.no_grad():
        exact = (torch.log_softmax(hidden[0].double() @ weight.double().T, dim=-1)
                 .gather(-1, ids[0, :, None]).squeeze(-1))
    rows = []
    mask = torch.ones_like(ids)
    for backend in backends:
        out = grpo_loss(hidden.detach().clone().requires_grad_(True), weight, ids, mask,
                        advantages=torch.ones(1, device=hidden.device),
                        config=GRPOLossConfig(chunk_size=chunk_size), backend=backend)
        train = out.logps[0]
        no_grad = token_logprobs(hidden, weight, ids, backend=backend, chunk_size=chunk_size)[0]
        gap = (train - no_grad).abs().max().item()
        rows.append({"path": f"grpo_fast/{backend}/train", **_errors(train, exact), "train_vs_no_grad": gap})
        rows.append({"path": f"grpo_fast/{backend}/no_grad", **_errors(no_grad, exact), "train_vs_no_grad": gap})
        if backend == "triton":
            on_chip = token_logprobs(hidden, weight, ids, backend="triton", on_chip=True)[0]
            rows.append({"path": "grpo_fast/triton/on_chip", **_errors(on_chip, exact),
                         "train_vs_no_grad": (train - on_chip).abs().max().item()})
    with torch.no_grad():
        eager, _ = reference_logprobs(hidden, weight, ids, None, 1.0)
        rows.append({"path": "eager/bf16_logits", **_errors(eager[0], exact)})
        try:
            from trl.trainer.utils import selective_log_softmax
        except ImportError:
            rows.append({"path": "trl/selective_log_softmax", "status": "unavailable"})
        else:
            logits = hidden[0] @ weight.T  # the model's logits, in its dtype
            rows.append({"path": "trl/selective_log_softmax", **_errors(selective_log_softmax(logits, ids[0]), exact)})
    return rows


@contextlib.contextmanager
def _interpreter_tiles():
    """Wide tiles under the CPU interpreter (a 152k vocabulary in tiles of 32 would take hours)."""
    from grpo_fast import loss as loss_module
    from grpo_fast.kernels.config import default_kernel_config

    def wide(device, dtype=torch.bfloat16):
        cfg = default_kernel_config(device, dtype)
        if device.type == "cuda":
            return cfg
        return dataclasses.replace(cfg, row_block_v=4096, fwd_block_n=32, fwd_block_v=1024, fwd_block_h=256,
                                   fwd_splits=4)

    loss_module.default_kernel_config = wide
    try:
        yield
    finally:
        loss_module.default_kernel_config = default_kernel_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="3584x152064", help="<H>x<V> of the lm_head (default: Qwen2.5-7B's)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per case (default: 256 on CUDA, 32 on CPU)")
    parser.add_argument("--max-logits", default="18,32", help="row maxima of the logits, one case each")
    parser.add_argument("--backends", default="triton,torch", help="grpo-fast backends to measure")
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="a 64x2000 head and 16 tokens (CPU smoke run)")
    parser.add_argument("--out-dir", default=None, help='default benchmarks/results/<device>/; "{device}" in it becomes the device slug')
    parser.add_argument("--name", default=None, help="file stem (default logprob-accuracy-<date>-<time>)")
    parser.add_argument("--commit", default=None,
                        help="commit to record where the checkout has no .git (e.g. a copied working tree)")
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    H, _, V = ("64x2000" if args.tiny else args.head).partition("x")
    H, V = int(H), int(V)
    n = 16 if args.tiny else (args.tokens or (256 if device.type == "cuda" else 32))
    backends = common.comma_list(args.backends)
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    rows = []
    with _interpreter_tiles() if device.type != "cuda" else contextlib.nullcontext():
        for max_logit in (float(x) for x in common.comma_list(args.max_logits)):
            hidden, weight, ids = realistic_head(n, H, V, max_logit, torch.bfloat16, device=device)
            for row in measure_case(hidden, weight, ids, backends):
                rows.append({"head": f"{H}x{V}", "tokens": n, "dtype": "bf16", "max_logit": max_logit, **row})
                shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in rows[-1].items()}
                print(shown, flush=True)
            del hidden, weight
    payload = {
        "benchmark": "logprob_accuracy",
        "title": "bf16 log-prob error against float64",
        "env": env,
        "notes": ["bf16 inputs; error = |logp - float64 log-softmax of the same bf16 inputs| over the tokens; "
                  "train_vs_no_grad = max |grpo_loss logps - token_logprobs| (0: ratio exactly 1)"],
        "rows": rows,
        "columns": [["path", "path", "s"], ["max_abs_error", "max abs error", ".2e"],
                    ["mean_abs_error", "mean abs error", ".2e"], ["train_vs_no_grad", "train vs no-grad", ".1e"],
                    ["status", "status", "s"]],
        "group_by": ["head", "tokens", "dtype", "max_logit"],
    }
    out_dir = common.results_dir(env, args.out_dir)
    written = common.write_results(payload, out_dir, args.name or common.default_stem("logprob-accuracy", env))
    print("wrote", ", ".join(str(p) for p in written.values()))
    return payload


if __name__ == "__main__":
    main()
