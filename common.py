"""The one shared helper of the course: sampling and log-probs, what every lesson needs to do RL
and none of them teaches. No RL algorithm is in here: each lesson file holds its whole algorithm.
- `Batch`: prompts and completions, the layout every lesson trains on
- `sample`: G completions per prompt, token by token with the KV cache, all rows in one batch
- `token_logprobs`: log pi(o_t | q, o_<t) of every completion token, with a graph (an update's
  micro-batch) or without (pi_ref, pi_old: micro-batches and length buckets inside)
- `micro_batches`: the rows of each forward/backward pass of gradient accumulation
The task, its verifier and the evaluation: task.py. Loading models, the SFT warm start, the command
line and run folders: plumbing.py. Reading runs back and judging them: findings.py.
"""

import functools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Sampling and log-probs


@dataclass
class Batch:
    """Prompts and completions, the layout every lesson trains on. Row i*G + g is the g-th
    completion of prompt i. Prompts are left-padded, completions right-padded."""
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    texts: list  # N decoded completions, without the EOS
    step_ends: list  # N lists: the completion position where each line (step) ends

    def __len__(self):
        return self.completion_ids.shape[0]

    def select(self, rows) -> "Batch":
        """The rows `rows` (a list or a tensor of indices) of the batch, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        rows = idx.tolist()
        return Batch(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                     self.completion_mask[idx], [self.texts[i] for i in rows],
                     [self.step_ends[i] for i in rows])


@functools.lru_cache(maxsize=None)
def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _finish(tokenizer, prompt_ids, prompt_mask, completion_ids) -> Batch:
    """Completion mask up to and including the first EOS; texts and step ends from the tokens."""
    is_eos = completion_ids == tokenizer.eos_token_id  # [N, T]
    T = completion_ids.shape[1]
    no_eos = torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), no_eos)  # [N]
    positions = torch.arange(T, device=completion_ids.device)[None]  # [1, T]
    completion_mask = (positions <= first_eos[:, None]).long()  # [N, T]
    texts, step_ends = [], []
    for row, end in zip(completion_ids.tolist(), first_eos.tolist()):
        pieces = [_piece(tokenizer, t) for t in row[:end]]  # tokens before the EOS
        ends = [t for t, piece in enumerate(pieces) for _ in range(piece.count("\n"))]
        text = "".join(pieces)
        if text and not text.endswith("\n"):
            ends.append(len(pieces) - 1)  # a last line cut short still ends somewhere
        texts.append(text)
        step_ends.append(ends)
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, step_ends)


def build_batch(tokenizer, prompts: list[str], completions: list[str], device) -> Batch:
    """A Batch from given texts (demonstrations, stored samples): each completion gets an EOS."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    eos = [tokenizer.eos_token_id]
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in completions]
    T = max(len(r) for r in rows)
    completion_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        completion_ids[i, :len(r)] = torch.tensor(r)
    return _finish(tokenizer, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                   completion_ids.to(device))


def _cache_argument(model) -> str:
    """The name under which this transformers passes the KV cache to forward ("cache" from 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], group_size: int = 1, temperature: float = 1.0,
           max_new_tokens: int = 64, greedy: bool = False) -> Batch:
    """G completions per prompt, token by token with the KV cache, all rows in one batch.

    The prompt's keys and values are computed once and repeated G times. Each step draws
    o_t ~ softmax(logits / temperature) over the whole vocabulary (no top-k, no top-p): exactly the
    pi_theta of token_logprobs, so the ratios pi_theta / pi_old start at 1. A row that has written
    EOS leaves the batch and its cache. The draws are `generate`'s on the G-times repeated prompts
    under the same seed, token for token (tests/test_common.py checks it); greedy: the argmax.
    On a GPU this loop would wait on Python at every token: sample_static does the same there.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if device.type == "cuda":  # the same draws, the decode step replayed as one CUDA graph
        return sample_static(model, tokenizer, prompts, group_size, temperature, max_new_tokens,
                             greedy, capture=True)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    was_training = model.training
    model.eval()
    cache = DynamicCache(config=model.config)
    kv = {_cache_argument(model): cache, "use_cache": True}
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)  # [B, P]
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=position_ids, logits_to_keep=1, **kv).logits[:, -1]
    logits = logits.float().repeat_interleave(group_size, 0)  # [n, V]: n rows still writing
    cache.batch_repeat_interleave(group_size)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [N, P], N = B*G
    prompt_mask = mask = enc["attention_mask"].repeat_interleave(group_size, 0)  # [N, P]
    N, position = mask.shape[0], mask.sum(1) - 1  # [N] each row's last prompt position
    completion_ids = torch.full((N, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long,
                                device=device)  # [N, T]
    writing = torch.arange(N, device=device)  # [n] the rows that have not written EOS yet
    scores = torch.zeros(N, logits.shape[-1], device=device)  # [N, V]; done rows' draws are dropped
    for t in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)  # [n]
        else:
            scores[writing] = logits / temperature if temperature != 1.0 else logits
            token = torch.multinomial(F.softmax(scores, -1), 1).squeeze(1)[writing]  # [n]
        completion_ids[writing, t] = token
        still = token != tokenizer.eos_token_id  # [n]
        if t == max_new_tokens - 1 or not still.any():
            break
        if not still.all():  # rows that wrote EOS leave the batch and the cache
            writing, token, mask = writing[still], token[still], mask[still]
            position = position[still]
            cache.batch_select_indices(still.nonzero().squeeze(1))
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)  # [n, P+t+1]
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask,
                       position_ids=position[:, None], **kv).logits[:, -1].float()  # [n, V]
    model.train(was_training)
    return _finish(tokenizer, prompt_ids, prompt_mask, completion_ids[:, :t + 1])


@torch.no_grad()
def sample_static(model, tokenizer, prompts: list[str], group_size: int = 1,
                  temperature: float = 1.0, max_new_tokens: int = 64, greedy: bool = False,
                  capture: bool = False, check_every: int = 8) -> Batch:
    """`sample` for a GPU: the same draws in the same order, with shapes that never change, so that
    the decode step can be captured once in a CUDA graph and replayed (capture=True, CUDA only).

    A static KV cache with a slot for every prompt and completion token; all N rows decode to the
    end (a row past its EOS writes padding, dropped); a 4-D additive mask passed in (the model's own
    mask code would wait on the host every token); EOS checked every `check_every` tokens, the only
    wait on the GPU. On the CPU (capture=False) it gives `sample`'s tokens (tests/test_common.py).
    """
    from transformers import DynamicCache, StaticCache

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    was_training = model.training
    model.eval()
    prefill = DynamicCache(config=model.config)  # the prompt once per question, as in sample
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)  # [B, P]
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=position_ids, logits_to_keep=1, use_cache=True,
                   **{_cache_argument(model): prefill}).logits[:, -1]
    logits = logits.float().repeat_interleave(group_size, 0)  # [N, V]
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [N, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, 0)  # [N, P]
    (N, P), T = prompt_ids.shape, max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=P + T)  # slots 0..P-1: the prompt
    for i, layer in enumerate(prefill.layers):
        cache.update(layer.keys.repeat_interleave(group_size, 0),
                     layer.values.repeat_interleave(group_size, 0), i)
    # the decode step's inputs and output live at fixed addresses: what a CUDA graph replays
    token = torch.zeros(N, 1, dtype=torch.long, device=device)  # [N, 1] the token just written
    position = prompt_mask.sum(1, keepdim=True) - 1  # [N, 1] its position
    mask = torch.full((N, 1, 1, P + T), torch.finfo(dtype).min, dtype=dtype, device=device)
    mask[:, 0, 0, :P].masked_fill_(prompt_mask.bool(), 0)  # [N, 1, 1, P+T]: 0 where attended
    kv = {_cache_argument(model): cache, "use_cache": True}

    def forward():  # [N, V]: the next token's logits, from the fixed inputs above
        return model(input_ids=token, attention_mask=mask, position_ids=position,
                     **kv).logits[:, -1].float()

    graph = None
    completion_ids = torch.full((N, T), tokenizer.pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)  # [N] rows that wrote EOS
    for t in range(T):
        if greedy:
            drawn = logits.argmax(-1)  # [N]
        else:  # torch.multinomial's draw of one sample (exponential race), without its checks
            probs = F.softmax(logits / temperature if temperature != 1.0 else logits, -1)
            drawn = (probs / torch.empty_like(probs).exponential_()).argmax(-1)  # [N]
        drawn = drawn.masked_fill(done, tokenizer.pad_token_id)
        completion_ids[:, t] = drawn
        done |= drawn == tokenizer.eos_token_id
        if t == T - 1 or ((t + 1) % check_every == 0 and bool(done.all())):  # a host sync
            break
        token.copy_(drawn[:, None])
        position += 1
        mask[:, 0, 0, P + t] = 0  # the key just written
        if capture and graph is None and t >= 2:  # two eager steps warm up, then capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the kernels, runs none of them
                static_logits = forward()
        if graph is not None:
            graph.replay()  # the step's ~1,300 kernels in one launch
            logits = static_logits
        else:
            logits = forward()
    model.train(was_training)
    is_eos = completion_ids == tokenizer.eos_token_id  # [N, T]
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, t + 1)  # [N]
    return _finish(tokenizer, prompt_ids, prompt_mask, completion_ids[:, :int(ends.max())])


def token_logprobs(model, batch: Batch, temperature: float = 1.0, grad: bool = True,
                   micro_batch_size: int = 0, buckets: int = 1) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token of the batch; 0 where masked.  # [N, T]

    The one entry point for log-probs. grad=True: a pass over these rows that keeps its graph (an
    update calls it on each micro-batch and backpropagates before the next). grad=False: no graph,
    in micro-batches of at most micro_batch_size outputs (0: all at once): the log-probs of pi_ref
    or of the policy that sampled (pi_old). buckets > 1: each pass runs as `buckets` passes over
    rows sorted by length, each cut to its longest row: the same log-probs (up to rounding)
    without the padding a long row forces on all."""
    if grad:
        return _logprobs_by_length(model, batch, temperature, buckets)
    return no_grad_pass(_logprobs_by_length, model, batch, micro_batch_size, temperature, buckets)


def _one_pass_logprobs(model, batch: Batch, temperature: float) -> torch.Tensor:
    """token_logprobs in one forward pass.  # [N, T]

    Position ids come from the attention mask so left padding does not shift them; the logits are
    divided by the sampling temperature: the log-probs of the distribution that sampled."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    P = batch.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1].float() / temperature  # [N, T, V]: position P-1 predicts token 0
    logp = torch.gather(F.log_softmax(logits, -1), 2, batch.completion_ids.unsqueeze(-1))
    return logp.squeeze(-1) * batch.completion_mask


def _logprobs_by_length(model, batch: Batch, temperature: float, buckets: int) -> torch.Tensor:
    """token_logprobs in `buckets` passes over rows sorted by length (1: one pass).  # [N, T]"""
    if buckets <= 1:
        return _one_pass_logprobs(model, batch, temperature)
    P = batch.prompt_ids.shape[1]
    prompt_len, completion_len = batch.prompt_mask.sum(1), batch.completion_mask.sum(1)  # [N]
    logp = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)  # [N, T]
    for rows in torch.argsort(prompt_len + completion_len).chunk(buckets):
        p, c = int(prompt_len[rows].max()), int(completion_len[rows].max())  # prompts: left-padded
        part = Batch(batch.prompt_ids[rows, P - p:], batch.prompt_mask[rows, P - p:],
                     batch.completion_ids[rows, :c], batch.completion_mask[rows, :c], [], [])
        logp[rows, :c] = _one_pass_logprobs(model, part, temperature)  # [len(rows), c]
    return logp


def micro_batches(batch: Batch, size: int) -> list[torch.Tensor]:
    """The rows of each forward/backward pass of gradient accumulation: chunks of at most `size`
    outputs, rows of similar length together. size 0 (or >= the batch): one chunk, every row."""
    if size <= 0 or size >= len(batch):
        return [torch.arange(len(batch), device=batch.completion_ids.device)]
    lengths = batch.prompt_mask.sum(1) + batch.completion_mask.sum(1)  # [N]
    return list(torch.argsort(lengths, stable=True).split(size))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The mean of x over the positions where mask is 1: of each row (dim=1) or of the whole batch
    (dim=None); 0 where the mask has none."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@torch.no_grad()
def no_grad_pass(per_token, model, batch: Batch, micro_batch_size: int, *args) -> torch.Tensor:
    """per_token(model, rows of batch, *args) ([n, T]) for every micro-batch of at most
    micro_batch_size outputs (0: all at once), with no graph: token_logprobs without a graph, or a
    value model's values (lessons 01 and 05).  # [N, T]"""
    out = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)  # [N, T]
    for rows in micro_batches(batch, micro_batch_size):
        out[rows] = per_token(model, batch.select(rows), *args)
    return out
