"""A tiny causal LM and byte-level tokenizer built in code (no downloads), for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """Byte-level BPE with no merges: 256 byte tokens plus <pad> and <eos>, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "<eos>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, *, hidden_size: int = 32, seed: int = 0, bias: bool = False):
    """grpo-fast's tiny random Llama sized to ``tokenizer``; ``bias=True`` gives its lm_head a
    bias (which grpo_loss takes as ``bias``)."""
    from grpo_fast.model import build_tiny_model

    model = build_tiny_model(tokenizer, hidden_size=hidden_size, seed=seed)
    if bias:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = torch.nn.Linear(hidden_size, len(tokenizer), bias=True)
            torch.nn.init.normal_(head.bias, std=0.5)
        model.lm_head = head
    return model


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer to ``directory`` (loadable by from_pretrained)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


class RecordGradients(torch.optim.Optimizer):
    """An optimiser whose step keeps the gradients (and changes nothing)."""

    def __init__(self, parameters):
        super().__init__(parameters, {"lr": 0.0})
        self.gradients = []

    def step(self, closure=None):
        self.gradients.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
