"""The fused GRPO loss in a plain PyTorch loop: a tiny policy learns to say token 3.

    python examples/plain_pytorch_loop.py --steps 30

Each step: sample `group_size` completions per prompt from the policy, reward each completion by
the fraction of its tokens equal to TARGET_TOKEN, then take `num_iterations` optimiser steps on
that batch with `grpo_fast.grpo_loss`, which turns the rewards into group-normalised advantages
and computes the clipped policy-gradient loss from the hidden states and the head weight without
materialising logits for the backward. The sampling policy's log-probs (`old_logps`) come from
`token_logprobs`, a no-grad pass. Runs on CPU in a few seconds; the mean reward climbs from
about 1/VOCAB towards 1.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from grpo_fast import GRPOLossConfig, grpo_loss, token_logprobs

VOCAB, HIDDEN, PROMPT_LENGTH, COMPLETION_LENGTH, TARGET_TOKEN = 16, 32, 4, 8, 3


class TinyPolicy(nn.Module):
    """A one-layer causal transformer; `body` returns the final (normed) hidden states and `head`
    is the output projection, the two things the fused loss needs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(PROMPT_LENGTH + COMPLETION_LENGTH, HIDDEN)
        self.layer = nn.TransformerEncoderLayer(HIDDEN, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def body(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        x = self.embed(tokens) + self.position(torch.arange(length))
        return self.norm(self.layer(x, src_mask=causal, is_causal=True))

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor) -> torch.Tensor:
        tokens = prompts
        for _ in range(COMPLETION_LENGTH):
            logits = self.head(self.body(tokens)[:, -1])
            tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
        return tokens[:, prompts.size(1):]


def reward(completions: torch.Tensor) -> torch.Tensor:
    return (completions == TARGET_TOKEN).float().mean(dim=1)


def main(steps: int = 30, num_prompts: int = 4, group_size: int = 8, num_iterations: int = 2, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    policy = TinyPolicy()
    optimiser = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    config = GRPOLossConfig(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28)
    history = []
    for step in range(steps):
        # Rollout: group_size completions per prompt, rows of a group contiguous.
        prompts = torch.randint(0, VOCAB, (num_prompts, PROMPT_LENGTH)).repeat_interleave(group_size, dim=0)
        completions = policy.sample(prompts)
        completion_mask = torch.ones_like(completions)
        rewards = reward(completions)
        sequence = torch.cat([prompts, completions], dim=1)

        def completion_hidden() -> torch.Tensor:
            # The hidden state at position t predicts token t + 1: shift by one onto the completion.
            return policy.body(sequence)[:, PROMPT_LENGTH - 1 : -1]

        with torch.no_grad():
            old_logps = token_logprobs(completion_hidden(), policy.head.weight, completions)

        for _ in range(num_iterations):  # several updates on one batch: the ratio moves off 1 and clips
            out = grpo_loss(
                completion_hidden(), policy.head.weight, completions, completion_mask,
                rewards=rewards, group_size=group_size, old_logps=old_logps, config=config,
            )
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()

        history.append(rewards.mean().item())
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  reward {history[-1]:.3f}  loss {out.loss.item():+.4f}  "
                  f"entropy {out.metrics['entropy'].item():.3f}  clip {out.metrics['clip_ratio/region_mean'].item():.3f}")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # tensors this small run slower when split across threads
    main(steps=arguments.steps, seed=arguments.seed)
