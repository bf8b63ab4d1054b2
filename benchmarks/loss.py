"""Fused GRPO loss benchmark: grpo-fast's backends against the eager reference and the peers.

    python -m benchmarks.loss                                   # full sweep (GPU)
    python -m benchmarks.loss --quick                           # tiny sizes, CPU smoke run
    python -m benchmarks.loss --heads qwen2.5-7b --tokens 4096,16384 --modes full,logprobs

Providers (same inputs, same loss options; peers only when installed):
  reference   grpo_fast backend="reference": eager, [tokens, vocab] logits materialised (baseline)
  torch       grpo_fast backend="torch": chunked PyTorch
  triton      grpo_fast backend="triton": chunked fp32 logits, fused Triton row pass (the no-grad
              log-probs: the same chunks, the pass's first half)
  triton_on_chip  logprobs mode only: token_logprobs(on_chip=True), the forward-only kernel whose
              logit tiles never leave the chip (no chunk buffer)
  liger       Liger-Kernel's LigerFusedLinearGRPOLoss (chunked per sequence, torch.compile on GPU)
  trl         what TRL's GRPOTrainer runs: its fused LM head (trl.kernels.ChunkedLogProbFunction,
              the chunk TRL uses) on the active tokens, then GRPOTrainer's loss formula
  trl_logits  TRL's selective_log_softmax on materialised logits, then the same formula
              (the logits path of earlier TRL releases)
Modes: forward (loss), backward (loss.backward() after an untimed forward), full (both), and
logprobs (no-grad per-token log-probs: grpo_fast.token_logprobs and each peer's equivalent).
torch, triton and liger compute the gradient inside the forward (their backward only scales it),
so split forward/backward figures are not comparable across providers: compare "full".

Inputs: B = tokens / seq_len sequences; completion mask with random lengths in [T/2, T]
(`--padding random`, the active fraction is recorded) or none; flat logits (random weights) or,
with --peaked, hidden states pushed towards the target token's weight row so that it takes most of
the probability mass, as in a trained model (the measured mean target probability is recorded).
FLOP rates count useful work on the active tokens N: 4·N·H·V for full (6·N·H·V with
--train-head), 2·N·H·V for logprobs, against a same-run bf16 torch.matmul; "ms at matmul rate" is
that work at the same-run matmul rate (what a pass as fast as cuBLAS's GEMMs would take).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs
from grpo_fast.kernels import triton_usable_on

from . import common

# (H, V) of each model's lm_head, from the models' config.json (hidden_size, vocab_size)
HEADS = {
    "qwen2.5-0.5b": (896, 151936),
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
    "tiny": (40, 1003),  # --quick: odd sizes so that every tile edge is exercised
}


def head_dims(name: str) -> tuple[int, int]:
    """(H, V) of a named head, or of a custom one written "<H>x<V>" (e.g. "16x67")."""
    if name in HEADS:
        return HEADS[name]
    h, _, v = name.partition("x")
    if h.isdigit() and v.isdigit() and int(h) > 0 and int(v) > 0:
        return int(h), int(v)
    raise ValueError(f"--heads: expected names from {', '.join(HEADS)} or <H>x<V>, got {name!r}")


PROVIDERS = ("reference", "torch", "triton", "triton_on_chip", "liger", "trl", "trl_logits")
MODES = ("forward", "backward", "full", "logprobs")
GRAD_IN_FORWARD = {"torch", "triton", "liger"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H], requires grad
    weight: torch.Tensor  # [V, H]
    ids: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] float 0/1
    advantages: torch.Tensor  # [B] fp32
    old_logps: Optional[torch.Tensor]  # [B, T] fp32 or None (on-policy)
    ref_logps: Optional[torch.Tensor]  # [B, T] fp32 or None (beta = 0)
    bias: Optional[torch.Tensor] = None

    @property
    def active(self) -> int:
        return int(self.mask.sum())

    def grads(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight) if t.requires_grad]


def make_weight(H: int, V: int, dtype: torch.dtype, device: torch.device, *, train_head: bool,
                seed: int = 0) -> torch.Tensor:
    """[V, H] lm_head with rows of norm ~1: standard-normal hidden states give logits ~ N(0, 1),
    the flat softmax of random weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(V, H, generator=gen, device=device, dtype=dtype).div_(math.sqrt(H))
    return weight.requires_grad_(train_head)


def make_inputs(tokens: int, seq_len: int, weight: torch.Tensor, *, peaked: bool, padding: str, beta: float,
                off_policy: bool, seed: int = 1) -> Inputs:
    if tokens % seq_len:
        raise ValueError(f"--tokens: expected multiples of --seq-len {seq_len}, got {tokens}")
    B, T = tokens // seq_len, seq_len
    (V, H), device, dtype = weight.shape, weight.device, weight.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen, device=device)
    hidden = torch.randn(B, T, H, generator=gen, device=device)
    if peaked:
        # push each hidden state along its target's row: the target logit gains log(V) + 2 over the
        # others, so it takes about e^2 / (e^2 + e^0.5) ~ 0.8 of the mass
        rows = weight.detach()[ids].float()
        hidden += (math.log(V) + 2.0) * rows / rows.pow(2).sum(-1, keepdim=True)
        del rows
    hidden = hidden.to(dtype).requires_grad_(True)
    if padding == "random":
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gen, device=device).clamp(min=1)
        mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    else:
        mask = torch.ones(B, T, device=device)
    advantages = torch.randn(B, generator=gen, device=device)
    old = ref = None
    if off_policy or beta != 0.0:
        # the current policy's log-probs plus noise: ratios and KL away from their trivial values
        base = token_logprobs(hidden.detach(), weight.detach(), ids, completion_mask=mask)
        old = base + 0.05 * torch.randn(B, T, generator=gen, device=device) * mask if off_policy else None
        ref = base + 0.05 * torch.randn(B, T, generator=gen, device=device) * mask if beta != 0.0 else None
    return Inputs(hidden, weight, ids, mask, advantages, old, ref)


@torch.no_grad()
def target_mass(x: Inputs, sample: int = 256) -> float:
    """Mean probability of the target token over the first `sample` tokens (how peaked the logits are)."""
    h = x.hidden.detach().reshape(-1, x.hidden.shape[-1])[:sample]
    logits = (h @ x.weight.detach().T).float()
    return float(torch.softmax(logits, -1).gather(1, x.ids.reshape(-1)[:sample, None]).mean())


# ----------------------------------------------------------------------------------------------
# providers: each returns a callable computing the scalar loss (or [B, T] log-probs under no_grad)
# ----------------------------------------------------------------------------------------------


def trl_formula(logps: torch.Tensor, x: Inputs, cfg: GRPOLossConfig) -> torch.Tensor:
    """GRPOTrainer._compute_loss (trl 1.16) from per-token log-probs, for the options grpo-fast
    has (clipped ratio, token or sequence level, delta, k3 KL, the four normalisations)."""
    mask = x.mask
    old = logps.detach() if x.old_logps is None else x.old_logps
    log_w = logps - old
    if cfg.importance_sampling_level == "sequence":
        log_w = ((log_w * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_w)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.resolved_epsilon_high)
    if cfg.delta is not None:
        ratio = torch.clamp(ratio, max=cfg.delta)
    adv = x.advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if cfg.beta != 0.0:
        diff = x.ref_logps - logps
        per_token = per_token + cfg.beta * (torch.exp(diff) - diff - 1)
    if cfg.loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if cfg.loss_type == "dr_grpo":
        return (per_token * mask).sum() / (mask.shape[0] * (cfg.max_completion_length or mask.shape[1]))
    normaliser = cfg.num_items_in_batch if cfg.loss_type == "dapo" and cfg.num_items_in_batch else mask.sum()
    return (per_token * mask).sum() / max(float(normaliser), 1.0)


def grpo_fast_provider(backend: str, on_chip: bool = False):
    def loss(x: Inputs, cfg: GRPOLossConfig):
        return lambda: grpo_loss(x.hidden, x.weight, x.ids, x.mask, advantages=x.advantages, old_logps=x.old_logps,
                                 ref_logps=x.ref_logps, bias=x.bias, config=cfg, backend=backend).loss

    def logprobs(x: Inputs, cfg: GRPOLossConfig):
        return lambda: token_logprobs(x.hidden, x.weight, x.ids, bias=x.bias, temperature=cfg.temperature,
                                      backend=backend, completion_mask=x.mask, on_chip=on_chip)

    return (None if on_chip else loss), logprobs


def liger_provider():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    def loss(x: Inputs, cfg: GRPOLossConfig):
        module = LigerFusedLinearGRPOLoss(
            beta=cfg.beta, compiled=x.hidden.is_cuda, use_ref_model=cfg.beta != 0.0, epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.resolved_epsilon_high, loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length or x.mask.shape[1],
            importance_sampling_level=cfg.importance_sampling_level, temperature=cfg.temperature, delta=cfg.delta,
        )
        return lambda: module(x.hidden, x.weight, x.ids, x.mask, x.advantages, bias=x.bias,
                              ref_per_token_logps=x.ref_logps, old_per_token_logps=x.old_logps)[0]

    def logprobs(x: Inputs, cfg: GRPOLossConfig):  # what Liger runs for reference-model log-probs
        return lambda: LigerFusedLinearPPOBase.chunk_forward(x.hidden, x.weight, x.ids, bias=x.bias,
                                                             temperature=cfg.temperature) * x.mask

    return loss, logprobs


def trl_provider():
    from trl.kernels import ChunkedLogProbFunction

    try:  # the vocabulary chunk GRPOTrainer passes (a private constant of trl 1.16)
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError:
        chunk = 32768

    def head(x: Inputs, cfg: GRPOLossConfig, outputs: tuple[str, ...]):
        keep = x.mask.bool()
        log_probs = ChunkedLogProbFunction.apply(x.hidden[keep], x.weight, x.bias, x.ids[keep], cfg.temperature,
                                                 chunk, None, 1.0, outputs)[0]
        return log_probs.new_zeros(keep.shape).masked_scatter(keep, log_probs)

    def loss(x: Inputs, cfg: GRPOLossConfig):  # the policy head computes log-probs and entropy
        return lambda: trl_formula(head(x, cfg, ("log_probs", "entropy")), x, cfg)

    def logprobs(x: Inputs, cfg: GRPOLossConfig):  # the reference-model head: log-probs only
        return lambda: head(x, cfg, ("log_probs",))

    return loss, logprobs


def trl_logits_provider():
    from trl.trainer.utils import selective_log_softmax

    def logits(x: Inputs):
        z = x.hidden @ x.weight.T
        return z if x.bias is None else z + x.bias

    def loss(x: Inputs, cfg: GRPOLossConfig):
        return lambda: trl_formula(selective_log_softmax(logits(x), x.ids, cfg.temperature), x, cfg)

    def logprobs(x: Inputs, cfg: GRPOLossConfig):
        return lambda: selective_log_softmax(logits(x), x.ids, cfg.temperature) * x.mask

    return loss, logprobs


def load_provider(name: str, device: torch.device):
    """(loss, logprobs) factories, or a string saying why the provider cannot run here."""
    try:
        if name in ("reference", "torch"):
            return grpo_fast_provider(name)
        if name in ("triton", "triton_on_chip"):
            if not triton_usable_on(device):
                return "needs CUDA (or TRITON_INTERPRET=1 on CPU)"
            return grpo_fast_provider("triton", on_chip=name == "triton_on_chip")
        if name == "liger":
            return liger_provider()
        if name == "trl":
            return trl_provider()
        if name == "trl_logits":
            return trl_logits_provider()
    except Exception as exc:  # noqa: BLE001 - a missing or broken peer is reported, not fatal
        return f"not importable: {type(exc).__name__}: {exc}"
    raise ValueError(f"--providers: expected names from {', '.join(PROVIDERS)}, got {name!r}")


# ----------------------------------------------------------------------------------------------
# one measurement per (provider, mode)
# ----------------------------------------------------------------------------------------------


def run_case(factories, mode: str, x: Inputs, cfg: GRPOLossConfig, device, timing: dict) -> dict:
    loss_factory, logprobs_factory = factories
    grads = x.grads()
    if mode == "logprobs":
        logps_fn = logprobs_factory(x, cfg)

        def fn():
            with torch.no_grad():
                return logps_fn()

        check = lambda out: float((out.float() * x.mask).sum() / x.mask.sum().clamp(min=1))  # noqa: E731
        return common.measure(fn, device, check=check, **timing)
    loss_fn = loss_factory(x, cfg)
    if mode == "forward":
        return common.measure(loss_fn, device, grad_to_none=grads, check=_scalar, **timing)
    if mode == "full":
        def fn():
            loss = loss_fn()
            loss.backward()
            return loss.detach()

        return common.measure(fn, device, grad_to_none=grads, check=_scalar, **timing)
    held = {}

    def setup():
        held["loss"] = loss_fn()

    def backward():
        loss = held.pop("loss")
        loss.backward()
        return loss.detach()

    return common.measure(backward, device, setup=setup, grad_to_none=grads, check=_scalar, **timing)


def useful_flops(mode: str, n: int, H: int, V: int, train_head: bool) -> Optional[float]:
    if mode == "full":
        return (6 if train_head else 4) * n * H * V
    if mode == "logprobs":
        return 2 * n * H * V
    return None  # forward / backward: the fused providers move work between them


def add_derived(rows: list[dict], matmul_tflops: Optional[float]) -> None:
    """Ratios to the same-case reference, FLOP rates and fractions of the matmul rate."""
    ref = {(r["head"], r["tokens"], r["mode"]): r for r in rows if r["provider"] == "reference" and r["status"] == "ok"}
    for r in rows:
        base = ref.get((r["head"], r["tokens"], r["mode"]))
        ok = r["status"] == "ok"
        r["time_vs_ref"] = r["ms_median"] / base["ms_median"] if ok and base else None
        r["mem_vs_ref"] = (r["peak_mib"] / base["peak_mib"]
                           if ok and base and r["peak_mib"] is not None and base["peak_mib"] else None)
        r["tflops"] = r["flops"] / (r["ms_median"] * 1e-3) / 1e12 if ok and r["flops"] else None
        r["frac_matmul"] = r["tflops"] / matmul_tflops if r["tflops"] and matmul_tflops else None
        # the pass's GEMM FLOPs at the same-run matmul rate: the time a kernel at cuBLAS's rate would take,
        # so that a figure published for the same GPU model can be set beside this run's matmul rate
        r["ms_at_matmul"] = r["flops"] / (matmul_tflops * 1e12) * 1e3 if ok and r["flops"] and matmul_tflops else None


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=lambda s: [int(t) for t in common.comma_list(s)], default=None,
                   help="comma-separated token counts (B*T); default 1024,...,32768 (quick: 64,128)")
    p.add_argument("--heads", type=common.comma_list, default=None, help=f"from {', '.join(HEADS)}, or <H>x<V>; default the three models")
    p.add_argument("--providers", type=common.comma_list, default=list(PROVIDERS))
    p.add_argument("--modes", type=common.comma_list, default=list(MODES))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--seq-len", type=int, default=None, help="T, tokens per completion (default 1024; quick 32)")
    p.add_argument("--padding", choices=["random", "none"], default="random",
                   help="random completion lengths in [T/2, T], or a full mask")
    p.add_argument("--peaked", action="store_true", help="peaked logits (target token takes ~80%% of the mass)")
    p.add_argument("--train-head", action="store_true", help="lm_head weight requires grad (default frozen)")
    p.add_argument("--off-policy", action="store_true", help="pass old_logps (default on-policy, TRL's default)")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--epsilon-low", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=None)
    p.add_argument("--importance-sampling-level", default="token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up per measurement (default 25; quick 1)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per measurement (default 100; quick 5)")
    p.add_argument("--min-reps", "--reps", dest="min_reps", type=int, default=None,
                   help="least timed calls per measurement where do_bench does not choose (default 3; quick 2)")
    p.add_argument("--matmul-size", type=int, default=None, help="reference matmul size (8192 on GPU, 512 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", default=None, help='default benchmarks/results/<device>/; "{device}" in it becomes the device slug')
    p.add_argument("--name", default=None, help="file stem (default loss-<date>-<time>)")
    p.add_argument("--commit", default=None,
                   help="commit to record where the checkout has no .git (e.g. a copied working tree)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    args = p.parse_args(argv)
    q = args.quick
    args.tokens = args.tokens or ([64, 128] if q else [1024, 2048, 4096, 8192, 16384, 32768])
    args.heads = args.heads or (["tiny"] if q else ["qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b"])
    args.seq_len = args.seq_len or (32 if q else 1024)
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (1.0 if q else 25.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (5.0 if q else 100.0)
    args.min_reps = args.min_reps if args.min_reps is not None else (2 if q else 3)
    for head in args.heads:
        try:
            head_dims(head)
        except ValueError as exc:
            p.error(str(exc))
    for name, given, allowed in (("--providers", args.providers, PROVIDERS),
                                 ("--modes", args.modes, MODES)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"{name}: expected names from {', '.join(allowed)}, got {', '.join(bad)}")
    return args


COLUMNS = [
    ["provider", "provider", "s"], ["status", "status", "s"], ["ms_median", "median ms", ".3f"],
    ["ms_p20", "p20 ms", ".3f"], ["ms_p80", "p80 ms", ".3f"], ["time_vs_ref", "time ×ref", ".2f"],
    ["peak_mib", "peak MiB above inputs", ".1f"], ["mem_vs_ref", "mem ×ref", ".3f"],
    ["tflops", "TFLOP/s", ".4g"], ["frac_matmul", "of matmul", ".2f"], ["ms_at_matmul", "ms at matmul rate", ".3f"],
    ["check", "loss / mean logp", ".5f"],
    ["error", "note", "s60"],
]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = GRPOLossConfig(loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon_low,
                         epsilon_high=args.epsilon_high, temperature=args.temperature,
                         importance_sampling_level=args.importance_sampling_level)
    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": args.min_reps}
    size = args.matmul_size or (8192 if device.type == "cuda" else (256 if args.quick else 512))
    matmul = common.matmul_tflops(device, dtype, size, **timing)
    print(f"{env['device']}: {args.dtype} matmul {size}^3 {matmul['tflops']:.4g} TFLOP/s", flush=True)

    factories = {name: load_provider(name, device) for name in args.providers}
    rows: list[dict] = []
    out_dir = common.results_dir(env, args.out_dir)
    stem = args.name or common.default_stem("loss", env)

    def save(partial: bool) -> tuple[dict, dict]:
        add_derived(rows, matmul["tflops"])
        payload = {
            "benchmark": "loss",
            "title": "Fused GRPO loss: grpo-fast vs the eager reference and peers",
            "env": env,
            "settings": {k: v for k, v in vars(args).items()},
            "config": {k: getattr(cfg, k) for k in ("loss_type", "beta", "epsilon_low", "epsilon_high", "temperature",
                                                     "importance_sampling_level")},
            "matmul": matmul,
            "notes": notes(args, rows, matmul),
            "group_by": ["head", "tokens", "mode"],
            "columns": COLUMNS,
            "plot": {"group_by": ["head", "mode"], "x": "tokens", "series": "provider",
                     "panels": [["ms_median", "median time (ms)"], ["peak_mib", "peak memory above inputs (MiB)"]]},
            "rows": rows,
        }
        return payload, common.write_results(payload, out_dir, stem, partial=partial)

    for head in args.heads:
        H, V = head_dims(head)
        weight = make_weight(H, V, dtype, device, train_head=args.train_head)
        for tokens in args.tokens:
            case = {"head": head, "H": H, "V": V, "tokens": tokens, "seq_len": args.seq_len, "dtype": args.dtype}
            try:
                x = make_inputs(tokens, args.seq_len, weight, peaked=args.peaked, padding=args.padding,
                                beta=args.beta, off_policy=args.off_policy)
            except Exception as exc:  # noqa: BLE001 - inputs that do not fit are a row too
                if not common.is_oom(exc):
                    raise
                rows += [{**case, "provider": p, "mode": m, "status": "oom", "error": "inputs", "flops": None,
                          "ms_median": None, "peak_mib": None} for p in args.providers for m in args.modes]
                common.free_memory(device)
                continue
            case.update(active_tokens=x.active, active_fraction=x.active / tokens,
                        target_mass=target_mass(x))
            for mode in args.modes:
                for name in args.providers:
                    row = {**case, "provider": name, "mode": mode, "grad_in_forward": name in GRAD_IN_FORWARD,
                           "flops": useful_flops(mode, x.active, H, V, args.train_head)}
                    if isinstance(factories[name], str):
                        row.update(status="unavailable", error=factories[name], ms_median=None, peak_mib=None)
                    elif mode != "logprobs" and factories[name][0] is None:
                        continue  # a log-prob-only provider (triton_on_chip): its loss is triton's
                    else:
                        row.update(run_case(factories[name], mode, x, cfg, device, timing))
                    rows.append(row)
                    print(f"{head:>13} {tokens:>6} {mode:>8} {name:>10}: {row['status']:>11} "
                          f"{_short(row.get('ms_median'), 'ms')} {_short(row.get('peak_mib'), 'MiB')} "
                          f"{row.get('error') or ''}", flush=True)
            del x
            common.free_memory(device)
            save(partial=True)  # each finished case survives a run stopped on a time limit
        del weight
        common.free_memory(device)
    payload, paths = save(partial=False)
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plot(s)")
    return payload


def notes(args, rows, matmul) -> list[str]:
    active = [r["active_fraction"] for r in rows if "active_fraction" in r]
    mass = [r["target_mass"] for r in rows if "target_mass" in r]
    return [
        f"{'peaked' if args.peaked else 'flat'} logits (mean target-token probability "
        f"{sum(mass) / max(len(mass), 1):.3f}); padding {args.padding} "
        f"(active fraction {min(active, default=1):.2f}-{max(active, default=1):.2f}); "
        f"lm_head {'trained' if args.train_head else 'frozen'}; {'off' if args.off_policy else 'on'}-policy",
        f"same-run {matmul['dtype']} torch.matmul {matmul['size']}^3: {matmul['tflops']:.4g} TFLOP/s "
        "(the 'of matmul' column; 'ms at matmul rate': the pass's GEMM FLOPs at that rate)",
        f"TFLOP/s count useful work on active tokens N: {'6' if args.train_head else '4'}·N·H·V for full, "
        "2·N·H·V for logprobs; none for forward/backward alone",
        "torch, triton and liger compute the gradient in the forward pass (backward only scales it): "
        "compare them with the others on 'full'",
        "peak memory: CUDA allocator peak during one call minus what was allocated before it "
        "(inputs; for backward also the saved forward); '–' on CPU, where it is not measured",
        "check: the loss (or the masked mean log-prob) each provider computed, to compare across providers",
    ]


def _scalar(out: torch.Tensor) -> float:
    return float(out.detach())


def _short(value, unit):
    return f"{value:10.3f} {unit}" if value is not None else f"{'–':>10} {unit}"


if __name__ == "__main__":
    main()
