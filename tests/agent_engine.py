"""The engine's multi-turn contract, done the slow and obvious way, for the agent tests: each row decoded alone
with a full forward per token (no cache), a turn handler's appended tokens added when its future is done.

``EagerTurnsEngine().generate(model, prompt_ids, params, turns=...)`` returns what ``RolloutEngine.generate``
returns under the contract: completion ids (cut at ``max_completion_length``, appended tokens counted),
the sampled tokens' log-probs (0.0 on appended tokens) and ``tool_mask``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TurnsOutput:
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    tool_mask: list[list[int]] | None
    logit_thresholds: None = None  # samples untruncated: records no truncation
    kept_logprobs: None = None


class EagerTurnsEngine:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __call__(self, model, prompt_ids, params):
        return self.generate(model, prompt_ids, params).completion_ids

    @torch.no_grad()
    def generate(self, model, prompt_ids, params, *, seed=None, tokenizer=None, turns=None) -> TurnsOutput:
        """Every row advances one sampled token per step (a full forward over each row's whole sequence,
        left-padded); a row whose turn ended waits for its appended tokens, which join its sequence at once."""
        self.calls += 1
        was_training = model.training
        model.eval()
        group = params.num_generations
        prompts = [list(prompt) for prompt in prompt_ids for _ in range(group)]
        ids = [[] for _ in prompts]
        logps = [[] for _ in prompts]
        masks = [[] for _ in prompts]
        live = list(range(len(prompts)))
        while live:
            sequences = [prompts[row] + ids[row] for row in live]
            width = max(map(len, sequences))
            tokens = torch.tensor([[params.pad_token_id] * (width - len(seq)) + seq for seq in sequences])
            attention = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences])
            positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(input_ids=tokens, attention_mask=attention, position_ids=positions).logits[:, -1].float()
            log_probs = torch.log_softmax(logits / params.temperature, dim=-1)
            if params.top_k == 1:
                drawn = log_probs.argmax(dim=-1)
            else:
                drawn = torch.multinomial(log_probs.exp(), 1, generator=self.generator)[:, 0]
            still = []
            for index, row in enumerate(live):
                token = int(drawn[index])
                ids[row].append(token), logps[row].append(float(log_probs[index, token])), masks[row].append(1)
                if self._continues(row, token, ids, logps, masks, params, turns):
                    still.append(row)
            live = still
        model.train(was_training)
        return TurnsOutput(ids, logps, masks if turns is not None else None)

    @staticmethod
    def _continues(row, token, ids, logps, masks, params, turns) -> bool:
        room = params.max_completion_length - len(ids[row])
        if token not in params.eos_token_ids:
            return room > 0
        future = turns.turn_ended(row, list(ids[row])) if turns is not None else None
        if future is None or room == 0:
            return False
        appended = future.result()[:room]
        ids[row] += appended
        logps[row] += [0.0] * len(appended)
        masks[row] += [0] * len(appended)
        return len(ids[row]) < params.max_completion_length
