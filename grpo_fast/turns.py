"""Multi-turn rollouts in the engine: the bookkeeping of rows that pause on a ``TurnHandler``.

A row that samples an EOS ends a turn. At the engine's next host sync it is offered to the handler
(``turn_ended``); a returned future pauses it. A paused row is ``done`` on the device (it does not
decode: its draws go to the discarded column, like a finished row's) but it is not *finished*: its
slot is not refilled, it is not compacted out, it counts as live. When its future is done (seen at
a later sync), the appended tokens go into ``forced`` ([output rows, max_new + 1] token ids, -1:
sample), indexed by output row and column as ``out_tokens`` is, so that slot refill and compaction
move nothing and a decode step does no host work for them. The row then resumes at the column
after its EOS with that EOS as its input token (the step writes the EOS's keys and values, which
the pause skipped), and the following steps take the forced ids in place of their draws, one per
step, through the same decode step (no new shapes, CUDA graphs stay valid), before it samples again.

Forced ids never end a row by being EOS (tool turns hold EOS ids); they count against
``max_completion_length``: a row whose appended tokens reach it is finished right there (its forced
ids written straight into the output, as it would sample nothing after them). A row's steps stop
counting while it is done, so at a sync its ``steps`` is its length. Stop strings are matched on
the text of each model turn (the tokens since the last appended ones), never on appended text.
Sampled draws (other than the one-pass kernel's, already keyed so) are keyed by output row, step and
token (``keyed_exponentials``): when a row decodes depends on when its tools finish, and its tokens
must not.
"""

from __future__ import annotations

import concurrent.futures
from typing import Sequence

import torch

from .rollout import SamplingParams, TurnHandler, cut_at_stop_strings


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xor-shift-multiply, products below 2**59: no int64 overflow) of ``x`` in [0, 2**32)."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def keyed_exponentials(seed: int, rows: torch.Tensor, steps: torch.Tensor, vocab: int,
                       chunk_bytes: int = 1 << 26) -> torch.Tensor:
    """[B, vocab] float32 Exp(1) draws that depend only on (seed, output row, step, token): with tools
    a row decodes a step at an iteration that depends on when its tool finished, so batch-order draws
    (the generator's) would make a sampled rollout depend on tool timing; these do not. The int64 hash's
    temporaries are made a few rows at a time (``chunk_bytes`` each), so the peak is the fp32 result's,
    as the generator's draws."""
    steps = steps.expand_as(rows) if isinstance(steps, torch.Tensor) else torch.full_like(rows, steps)
    keys = _hash32((_hash32(torch.full_like(rows, seed & _M32) ^ (rows & _M32)) + steps) & _M32)[:, None]
    tokens = torch.arange(vocab, device=rows.device)[None, :]
    out = torch.empty(rows.shape[0], vocab, dtype=torch.float32, device=rows.device)
    per = max(1, chunk_bytes // (8 * vocab))
    for start in range(0, rows.shape[0], per):
        key = keys[start:start + per]
        bits = _hash32((_hash32(key ^ tokens) + key) & _M32)
        out[start:start + per] = -torch.log(((bits >> 8).float() + 0.5) * 2.0 ** -24)  # 24 bits: (0, 1)
    return out


class TurnState:
    """One ``_decode`` call's turns: per output row its end, its appended spans, its pending future."""

    def __init__(self, handler: TurnHandler, out_tokens: torch.Tensor, out_logprobs: torch.Tensor,
                 params: SamplingParams, eos_ids: torch.Tensor, tokenizer):
        rows, device = out_tokens.shape[0], out_tokens.device
        self.handler, self.out_tokens, self.out_logprobs = handler, out_tokens, out_logprobs
        self.max_new, self.eos_ids, self.eos = params.max_completion_length, eos_ids, set(params.eos_token_ids)
        self.stop_strings, self.tokenizer = params.stop_strings, tokenizer
        self.forced = torch.full_like(out_tokens, -1)  # its column max_new (finished rows' draws) stays -1
        self.paused = torch.zeros(rows, dtype=torch.bool, device=device)  # per output row
        self.pending: dict[int, tuple[concurrent.futures.Future, int]] = {}  # row -> (future, length at pause)
        self.ends: dict[int, int] = {}  # finished rows -> their final length
        self.turn_start = [0] * rows  # the first column of the row's current model turn
        self.spans: list[list[tuple[int, int]]] = [[] for _ in range(rows)]  # appended [start, end) columns

    # ---- on the device, every decode step ----------------------------------------------------------

    def step(self, tokens, logprobs, row_ids, column, done, steps):
        """One decode step's draws with the forced ids put in, written to the outputs -> (tokens, done, steps)."""
        forced = self.forced[row_ids, column]
        is_forced = forced >= 0
        tokens = torch.where(is_forced, forced, tokens)
        self.out_tokens[row_ids, column] = tokens
        # logprobs [n] or, recording truncation, [n, 3] (full, threshold, kept): forced tokens get zeros
        self.out_logprobs[row_ids, column] = logprobs.masked_fill(is_forced.view(-1, *[1] * (logprobs.dim() - 1)), 0.0)
        ended = done | (torch.isin(tokens, self.eos_ids) & ~is_forced) | (steps + 1 >= self.max_new)
        return tokens, ended, steps + (~done).long()

    def finished(self, done: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """Cache rows that are done and not paused (free for refill and compaction)."""
        return done & ~self.paused[row_ids]

    # ---- on the host, at the engine's syncs ---------------------------------------------------------

    def sync(self, row_ids, done, steps, tokens, iteration: int, deadline: dict):
        """Rows that ended a turn since the last sync go to the handler (paused or finished); live rows
        that met a stop string in their turn finish; paused rows whose future is done resume.
        -> (done, tokens) with those changes."""
        stopped = []  # live rows whose turn met a stop string
        ids_host, done_host, steps_host = torch.stack([row_ids, done.long(), steps]).tolist()
        ended = [(row, n) for row, is_done, n in zip(ids_host, done_host, steps_host)
                 if is_done and row not in self.ends and row not in self.pending]
        live = [(row, n) for row, is_done, n in zip(ids_host, done_host, steps_host) if not is_done]
        read = ended + (live if self.stop_strings else [])
        rows = self.out_tokens[[row for row, _ in read]].tolist() if read else []
        for index, ((row, n), ids) in enumerate(zip(read, rows)):
            ids = ids[:n]
            stop = self._stop_string_end(row, ids)
            if index >= len(ended):  # a live row
                if stop is not None:
                    self.ends[row] = stop
                    stopped.append(row)
            elif stop is not None or n >= self.max_new or ids[-1] not in self.eos:
                self.ends[row] = stop if stop is not None else n
            else:
                self._offer(row, ids)
        if stopped:
            done = done | torch.isin(row_ids, torch.tensor(stopped, device=done.device))
        return self._resume_ready(row_ids, done, steps, tokens, iteration, deadline)

    def wait(self) -> None:
        """Block until a pending future is done (every live row is paused: nothing to decode meanwhile)."""
        concurrent.futures.wait([future for future, _ in self.pending.values()],
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def _stop_string_end(self, row: int, ids: Sequence[int]) -> int | None:
        """The row's end when its current turn's text holds a stop string (right after the token that completes it)."""
        if not self.stop_strings:
            return None
        turn = ids[self.turn_start[row]:]
        if not any(text in self.tokenizer.decode(turn) for text in self.stop_strings):
            return None
        return self.turn_start[row] + len(cut_at_stop_strings(turn, self.stop_strings, self.tokenizer))

    def _offer(self, row: int, ids: list[int]) -> None:
        future = self.handler.turn_ended(row, ids)
        if future is None:
            self.ends[row] = len(ids)
        else:
            self.pending[row] = (future, len(ids))
            self.paused[row] = True

    def _resume_ready(self, row_ids, done, steps, tokens, iteration: int, deadline: dict):
        ready = [row for row, (future, _) in self.pending.items() if future.done()]
        if not ready:
            return done, tokens
        forced_at, forced_ids, resumed = [], [], []
        for row in ready:
            future, n = self.pending.pop(row)
            appended = list(future.result())[: self.max_new - n]  # an exception here is the handler's bug
            if not appended:  # nothing to append: the row ends at its turn's EOS
                self.ends[row] = n
                continue
            columns = range(n, n + len(appended))
            forced_at += [(row, column) for column in columns]
            forced_ids += appended
            self.spans[row].append((n, n + len(appended)))
            if n + len(appended) >= self.max_new:  # nothing left to sample: finished inside its tool turn
                self.ends[row] = self.max_new
                continue
            self.turn_start[row] = n + len(appended)
            resumed.append(row)
            deadline[("turn", row)] = iteration + self.max_new - n  # decode steps until its length limit
        device = done.device
        self.paused[torch.tensor(ready, device=device)] = False
        if forced_at:
            index = tuple(torch.tensor(forced_at, device=device).T)
            values = torch.tensor(forced_ids, dtype=torch.long, device=device)
            self.forced.index_put_(index, values)
            # also the output now (the decode steps write the same ids): a row finished inside its tool turn
            # takes no more steps
            self.out_tokens.index_put_(index, values)
        if resumed:
            hit = torch.isin(row_ids, torch.tensor(resumed, device=device))
            last = self.out_tokens[row_ids, (steps - 1).clamp(min=0)]  # the EOS it paused on: fed at its column
            done, tokens = done & ~hit, torch.where(hit, last, tokens)
        return done, tokens

    def tool_masks(self, lengths: Sequence[int]) -> list[list[int]]:
        """Per output row, per completion token (``lengths`` each): 1 sampled by the model, 0 appended."""
        masks = []
        for row, length in enumerate(lengths):
            mask = [1] * length
            for start, end in self.spans[row]:
                end = min(end, length)
                mask[start:end] = [0] * max(0, end - start)
            masks.append(mask)
        return masks
