"""``grpo-fast doctor``: the environment, and each fused path checked on this machine against its eager twin.

What a user pastes into a bug report. It prints the versions that matter (Python, torch, CUDA, the
GPU, Triton, transformers, peft, bitsandbytes, flash-attn, grpo-fast's commit), then runs each fused
path once at a small shape against the eager reference and prints one table row per path: the
largest error (relative to the reference's largest magnitude), pass or fail, the implementation the
trainer will use here (``triton``; ``torch`` / ``bitsandbytes`` / ``sdpa`` where the trainer does not
run the kernel, or after it failed), and on CUDA the fused path's speed against the eager one at a
medium shape. The exit code is 1 when a check fails.

Without CUDA the kernels run in the Triton interpreter (slow, small shapes only, no timings): the
interpreter must be chosen before the kernels are defined, so ``main`` re-runs itself in a child
process with TRITON_INTERPRET=1. A kernel that cannot compile or launch is a failed check (the
checks run with GRPO_FAST_STRICT=1: a silent fallback would check the torch path instead).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass
class Check:
    path: str
    error: Optional[float]  # max |fused - eager| / max |eager|; None when it did not run
    tolerance: float
    uses: str  # the implementation the trainer runs on this machine
    speedup: Optional[float] = None  # eager time / fused time at a medium shape (CUDA only)
    failure: Optional[str] = None  # why it did not run (the kernel failed, an exception)

    @property
    def passed(self) -> bool:
        return self.failure is None and self.error is not None and self.error <= self.tolerance


# ---- environment --------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    for name in (distribution, distribution.replace("-", "_")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def package_commit() -> str:
    """The checkout's commit (with '+modified' for uncommitted changes), or 'unknown' (a wheel, no git)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+modified" if dirty else "") if commit else "unknown"


def environment() -> list[tuple[str, str]]:
    rows = [("python", platform.python_version()), ("platform", platform.platform()),
            ("torch", torch.__version__), ("cuda (torch built for)", str(torch.version.cuda))]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [("gpu", props.name), ("capability", "sm_%d%d" % (props.major, props.minor)),
                 ("gpu memory", f"{props.total_memory / 2**30:.1f} GiB")]
    else:
        rows.append(("gpu", "none (kernels checked in the Triton interpreter)"))
    rows += [(name, _version(name)) for name in ("triton", "transformers", "peft", "bitsandbytes", "flash-attn")]
    rows.append(("grpo-fast", f"{_version('grpo-fast')} at commit {package_commit()}"))
    return rows


# ---- checks -------------------------------------------------------------------------------------


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    return (got.double() - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0


def _timed(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


class Doctor:
    """The checks on one device; ``dtype``: the trainer's (bf16 on CUDA, fp16 without bf16; fp32 on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[self.dtype]
        self.generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(self, *shape, scale=1.0, dtype=None):
        return (torch.randn(*shape, generator=self.generator) * scale).to(self.device, dtype or self.dtype)

    def fused_name(self, trainer_runs_kernel: bool, kernel: str, otherwise: str) -> str:
        from . import fallback

        if not trainer_runs_kernel:
            return otherwise
        return "triton" if fallback.usable(kernel, self.device) else f"{otherwise} (kernel failed)"

    # -- the loss and the log-probs
    def loss_inputs(self, B, T, H, V):
        from .loss import GRPOLossConfig

        hidden, weight = self.randn(B, T, H, scale=0.5), self.randn(V, H, scale=H ** -0.5)
        ids = torch.randint(0, V, (B, T), generator=self.generator).to(self.device)
        mask = torch.ones(B, T, device=self.device)
        mask[-1, T // 2:] = 0
        old = (torch.randn(B, T, generator=self.generator) * 0.05).to(self.device) - torch.log(torch.tensor(float(V)))
        advantages = torch.linspace(-1, 1, B, device=self.device)
        return hidden, weight, ids, mask, dict(advantages=advantages, old_logps=old.to(self.device),
                                               config=GRPOLossConfig(loss_type="grpo"))

    def loss_pass(self, backend, hidden, weight, ids, mask, kwargs):
        from .loss import grpo_loss

        hidden, weight = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        out = grpo_loss(hidden, weight, ids, mask, backend=backend, **kwargs)
        out.loss.backward()
        return out, hidden.grad, weight.grad

    def check_loss(self) -> list[Check]:
        uses = self.fused_name(self.cuda, "grpo_loss", "torch")
        hidden, weight, ids, mask, kwargs = self.loss_inputs(2, 12, 64, 300)
        fused, d_hidden, d_weight = self.loss_pass("triton", hidden, weight, ids, mask, kwargs)
        # the eager oracle in fp32 from the same (rounded) inputs: what the fused pass computes exactly
        eager, e_hidden, e_weight = self.loss_pass("reference", hidden.float(), weight.float(), ids, mask, kwargs)
        forward = max(_error(fused.loss.detach(), eager.loss.detach()), _error(fused.logps, eager.logps))
        backward = max(_error(d_hidden, e_hidden), _error(d_weight, e_weight))
        speed = None
        if self.cuda:
            args = self.loss_inputs(8, 512, 2048, 32768)
            speed = (_timed(lambda: self.loss_pass("reference", *args))
                     / _timed(lambda: self.loss_pass("triton", *args)))
        return [Check("loss forward", forward, self.tolerance, uses, speed),
                Check("loss backward", backward, self.tolerance, uses, speed)]

    def check_truncated(self) -> list[Check]:
        """The loss over a truncating sampler's kept tokens (``logit_threshold``: top-p 0.8 here), the
        kernels' separately compiled variant that the trainer runs under top-k / top-p / min-p."""
        from .truncation import truncation_threshold

        uses = self.fused_name(self.cuda, "grpo_loss", "torch")
        hidden, weight, ids, mask, kwargs = self.loss_inputs(2, 12, 64, 300)
        logits = hidden.float() @ weight.float().T
        kwargs = dict(kwargs, logit_threshold=truncation_threshold(logits, 0, 0.8, 0.0))
        fused, d_hidden, d_weight = self.loss_pass("triton", hidden, weight, ids, mask, kwargs)
        eager, e_hidden, e_weight = self.loss_pass("reference", hidden.float(), weight.float(), ids, mask, kwargs)
        error = max(_error(fused.loss.detach(), eager.loss.detach()), _error(fused.logps, eager.logps),
                    _error(d_hidden, e_hidden), _error(d_weight, e_weight))
        return [Check("loss, truncated sampling", error, self.tolerance, uses)]

    def check_logprobs(self) -> list[Check]:
        from .loss import token_logprobs
        from .reference import reference_logprobs

        uses = self.fused_name(self.cuda, "token_logprobs", "torch")
        hidden, weight, ids, mask, _ = self.loss_inputs(2, 12, 64, 300)
        fused = token_logprobs(hidden, weight, ids, backend="triton")
        eager, _ = reference_logprobs(hidden.float(), weight.float(), ids, None, 1.0)
        speed = None
        if self.cuda:
            hidden, weight, ids, _, _ = self.loss_inputs(8, 512, 2048, 32768)
            speed = (_timed(lambda: reference_logprobs(hidden, weight, ids, None, 1.0))
                     / _timed(lambda: token_logprobs(hidden, weight, ids, backend="triton")))
        return [Check("log-probs", _error(fused, eager), self.tolerance, uses, speed)]

    # -- NF4 decode
    def check_nf4(self) -> list[Check]:
        import bitsandbytes.functional as bnb_functional

        from .kernels.nf4_decode import nf4_decode_matmul, repack_nf4
        from .kernels.nf4_matmul import NF4Weight

        def case(rows, out_features, in_features):
            packed, state = bnb_functional.quantize_4bit(self.randn(out_features, in_features, dtype=torch.float32),
                                                         blocksize=64, compress_statistics=True, quant_type="nf4")
            weight = repack_nf4([NF4Weight.from_bnb(packed, state)])
            x = self.randn(rows, in_features)
            return x, weight, lambda: x @ bnb_functional.dequantize_4bit(packed, state).to(x.dtype).T

        x, weight, eager = case(3, 96, 256)
        fused = nf4_decode_matmul(x, weight)
        # bitsandbytes' dequantise-then-matmul rounds each weight to x's dtype: half an ulp per weight
        error = _error(fused, eager())
        speed = None
        if self.cuda:
            x, weight, eager = case(8, 4096, 4096)
            speed = _timed(eager) / _timed(lambda: nf4_decode_matmul(x, weight))
        uses = self.fused_name(self.cuda, "nf4_decode", "bitsandbytes")
        return [Check("NF4 decode matmul", error, max(self.tolerance, 2e-3 if self.dtype != torch.float32 else 0),
                      uses, speed)]

    # -- decode attention
    def attention_case(self, rows, heads, kv_heads, head_dim, prompt, completion):
        q = self.randn(rows, heads, head_dim)
        k_new, v_new = self.randn(rows, kv_heads, head_dim), self.randn(rows, kv_heads, head_dim)
        prompt_kv = [self.randn(rows, kv_heads, prompt, head_dim) for _ in range(2)]  # one slot per row
        completion_kv = [self.randn(rows, kv_heads, completion, head_dim) for _ in range(2)]
        row_prompt = torch.arange(rows, dtype=torch.int32, device=self.device)
        start = torch.randint(0, prompt // 2, (rows,), generator=self.generator).to(self.device, torch.int32)
        position = torch.randint(0, completion - 1, (rows,), generator=self.generator).to(self.device, torch.int32)
        return q, k_new, v_new, prompt_kv, completion_kv, (row_prompt, start, position)

    def attention_sdpa(self, q, k_new, v_new, prompt_kv, completion_kv, index, scale):
        """Per row: SDPA of every query head over its prompt columns [start, P), its completion columns
        [0, position) and the new token (K / V repeated per query head)."""
        rows, heads, _ = q.shape
        group = heads // k_new.shape[1]
        out = []
        for row, (slot, first, position) in enumerate(zip(*(t.tolist() for t in index))):
            keys, values = (torch.cat([p[slot, :, first:], c[row, :, :position], new[row, :, None]], dim=1)
                            for p, c, new in ((prompt_kv[0], completion_kv[0], k_new), (prompt_kv[1], completion_kv[1], v_new)))
            out.append(torch.nn.functional.scaled_dot_product_attention(
                q[row, :, None], keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0), scale=scale)[:, 0])
        return torch.stack(out)

    def check_attention(self) -> list[Check]:
        from .kernels.decode_attention import decode_attention

        def fused(case, scale):
            q, k_new, v_new, prompt_kv, completion_kv, index = case
            tickets = torch.zeros(q.shape[0] * k_new.shape[1], dtype=torch.int32, device=self.device)
            return decode_attention(q, k_new, v_new, *prompt_kv, *completion_kv, *index, tickets, scale)

        case = self.attention_case(3, 8, 2, 16, 40, 24)
        scale = 16 ** -0.5
        got = fused(case, scale)
        error = _error(got, self.attention_sdpa(*case, scale))
        speed = None
        if self.cuda:
            case = self.attention_case(32, 28, 4, 128, 512, 256)
            speed = (_timed(lambda: self.attention_sdpa(*case, 128 ** -0.5))
                     / _timed(lambda: fused(case, 128 ** -0.5)))
        return [Check("decode attention", error, self.tolerance, self.fused_name(self.cuda, "decode_attention", "sdpa"),
                      speed)]

    # -- sampling
    def check_sampling(self) -> list[Check]:
        from .engine import sample_tokens
        from .kernels.sampling import sample_fused
        from .rollout import SamplingParams

        rows, vocab, temperature = 6, 500, 0.7
        logits = self.randn(rows, vocab, scale=3.0, dtype=torch.float32)
        eos = torch.tensor([vocab - 1], device=self.device)

        def draw(greedy, seed, logits=logits):
            tickets = torch.zeros(logits.shape[0], dtype=torch.int32, device=self.device)
            return sample_fused(logits, temperature, eos, False, greedy, seed, 0, tickets)

        log_softmax = torch.log_softmax(logits / temperature, dim=-1)
        tokens, logprobs = draw(True, 0)
        errors = [(tokens != logits.argmax(-1)).any().item() * 1.0,  # greedy: the argmax
                  _error(logprobs, log_softmax.gather(1, tokens[:, None])[:, 0])]
        tokens, logprobs = draw(False, 1234)
        again, _ = draw(False, 1234)
        valid = bool(((tokens >= 0) & (tokens < vocab)).all()) and torch.equal(tokens, again)  # seeded: reproducible
        errors += [0.0 if valid else 1.0, _error(logprobs, log_softmax.gather(1, tokens.clamp(0, vocab - 1)[:, None])[:, 0])]
        speed = None
        if self.cuda:
            big = self.randn(64, 152064, scale=3.0, dtype=torch.float32)
            params = SamplingParams(num_generations=1, max_completion_length=8, eos_token_ids=(0,), pad_token_id=0,
                                    temperature=temperature)
            generator = torch.Generator(device=self.device).manual_seed(0)
            speed = (_timed(lambda: sample_tokens(big, params, 5, eos, generator))
                     / _timed(lambda: draw(False, 7, big)))
        return [Check("sampling", max(errors), 1e-5, self.fused_name(self.cuda, "sampling", "torch"), speed)]

    CHECKS = ("check_loss", "check_truncated", "check_logprobs", "check_nf4", "check_attention", "check_sampling")
    PATHS = {"check_loss": ("loss forward", "loss backward"), "check_truncated": ("loss, truncated sampling",),
             "check_logprobs": ("log-probs",),
             "check_nf4": ("NF4 decode matmul",), "check_attention": ("decode attention",), "check_sampling": ("sampling",)}

    def run(self) -> list[Check]:
        from . import fallback

        results = []
        for name in self.CHECKS:
            try:
                with _strict():
                    results += getattr(self, name)()
            except Exception as error:  # noqa: BLE001 - a check that cannot run is a failed check, reported
                failure = fallback.describe_error(error.__cause__ if isinstance(error, fallback.KernelFailure) else error)
                uses = "torch (kernel failed)" if isinstance(error, fallback.KernelFailure) or fallback.kernel_failure(error) else "?"
                results += [Check(path, None, 0.0, uses, failure=failure) for path in self.PATHS[name]]
        return results


@contextlib.contextmanager
def _strict():
    from . import fallback

    before = os.environ.get(fallback.STRICT_ENV)
    os.environ[fallback.STRICT_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[fallback.STRICT_ENV]
        else:
            os.environ[fallback.STRICT_ENV] = before


def table(checks: list[Check], checked_with: str) -> str:
    header = ("path", f"max error ({checked_with})", "tolerance", "result", "trainer uses", "speed vs eager")
    lines = []
    for check in checks:
        error = f"{check.error:.2e}" if check.error is not None else "-"
        result = "pass" if check.passed else ("FAIL: " + check.failure if check.failure else "FAIL")
        speed = f"{check.speedup:.2f}x" if check.speedup is not None else "n/a"
        lines.append((check.path, error, f"{check.tolerance:.0e}", result, check.uses, speed))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    render = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([render(header), render(tuple("-" * w for w in widths)), *map(render, lines)])


def run() -> int:
    """Print the environment and the checks; 0 when every check passes, else 1. Runs where it is (no re-exec)."""
    from .console import import_bitsandbytes

    started = time.perf_counter()
    import_bitsandbytes()  # the NF4 check's; quietly (grpo_fast.console)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in environment():
        print(f"{key + ':':24s}{value}", flush=True)
    checked_with = "triton" if device.type == "cuda" else "interpreter"
    print(f"\nfused paths on {device} ({'compiled Triton' if device.type == 'cuda' else 'Triton interpreter'}):",
          flush=True)
    checks = Doctor(device).run()
    print(table(checks, checked_with), flush=True)
    failed = [check.path for check in checks if not check.passed]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {time.perf_counter() - started:.1f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main() -> int:
    """``grpo-fast doctor``: without CUDA, in a child process with TRITON_INTERPRET=1 (set before the
    kernels are defined), unless this process already interprets."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return run()
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "grpo_fast.doctor"], env=env).returncode


if __name__ == "__main__":
    sys.exit(run() if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else main())
