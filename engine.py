"""
Batched generation: many prompts (videos) decoding together in one preallocated KV cache, with continuous batching.

Each request's prefix is prefilled alone (batch 1: compute-bound, no padding), and its keys and values are copied into
n slots of a KVCache (its n samples share the one prefill). All live rows then decode together, each at its own length
and rotary position, each with its own stop condition; a finished row's slot takes the next request (vLLM's continuous
batching). The decode step has the same shapes every step, so it can be compiled (gpt-fast).

Exact against generating each prompt alone (Qwen2.generate): a sample is the argmax of p / noise with noise ~ Exp(1),
one per token id (the exponential race, as torch.multinomial draws one sample), and each request draws its noise,
(n, vocab) a step while any of its rows is live, from its own generator, exactly as generating it alone draws. No row
draws from another's stream, so which requests share a step changes nothing, up to float rounding: a batch of 8 sums
in another order than a batch of 2, which can flip a draw within rounding of a tie: rare in fp32; bf16 rounds far
coarser, so on a GPU expect a batched caption and the same one alone to part after a while (same distribution).

The engine needs only what a Qwen2-like LLM has: embed_tokens, hidden(embeds, cache, use_cache[, position_ids])
returning per-layer keys and values of shape (1, n_kv, P, hd) from a prefill, and head.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch


class KVSlots(NamedTuple):
    """One layer of a KVCache: the cache interface Qwen2's attention uses (as its functional KV does)."""
    k: torch.Tensor  # (rows, n_kv, max_len, hd)
    v: torch.Tensor
    lens: torch.Tensor  # (rows,) tokens already cached per row
    offset: torch.Tensor  # (rows,) rotary position minus cache slot (not 0 after an M-RoPE prompt)

    def slots(self, T):
        """Cache slots (rows, T) of T new tokens: each row continues from its own length."""
        return self.lens[:, None] + torch.arange(T, device=self.lens.device)

    def positions(self, T):
        """Rotary positions (rows, T) of T new tokens."""
        return self.slots(T) + self.offset[:, None]

    def mask(self, T):
        """(rows, 1, T, max_len): each new token sees its row's past and itself, never another row's stale slot."""
        return (torch.arange(self.k.size(2), device=self.lens.device) <= self.slots(T)[:, :, None])[:, None]

    def update(self, k, v):
        """Write the new (rows, n_kv, T, hd) at each row's length, in place; returns the whole buffers."""
        rows = torch.arange(k.size(0), device=k.device)[:, None]  # (rows, 1)
        slots = self.slots(k.size(2))  # (rows, T)
        self.k[rows, :, slots], self.v[rows, :, slots] = k.transpose(1, 2), v.transpose(1, 2)  # (rows, T, n_kv, hd)
        return self.k, self.v


class KVCache:
    """Keys and values of `rows` sequences in buffers sized for all of generation, (layers, rows, n_kv, max_len, hd),
    each row at its own length: a step writes in place (torch.cat would copy the whole cache, the long video prefix,
    every step) and attends over the whole buffer, masked per row, so its shapes never change. The caller moves the
    lengths on (lens += 1 per decoded token)."""

    def __init__(self, prefix, rows, max_len):
        """prefix: a prefill's per-layer (k, v), each (1, n_kv, P, hd): the layer count, shapes, dtype and device."""
        k = prefix[0][0]
        shape = (len(prefix), rows, k.size(1), max_len, k.size(3))
        self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(rows, dtype=torch.long, device=k.device)
        self.offset = torch.zeros_like(self.lens)

    @property
    def max_len(self):
        return self.k.size(3)

    def __getitem__(self, i):
        return KVSlots(self.k[i], self.v[i], self.lens, self.offset)

    def fill(self, rows, prefix, offset=0):
        """Copy one prefill's per-layer (k, v), each (1, n_kv, P, hd), into `rows` (slot indices), whose new tokens
        then take rotary positions slot + offset (an M-RoPE prompt's text goes on from its largest position)."""
        P, idx = prefix[0][0].size(2), torch.tensor(rows, device=self.lens.device)
        for i, (k, v) in enumerate(prefix):
            self.k[i, idx, :, :P], self.v[i, idx, :, :P] = k, v  # broadcast over the rows
        self.lens[idx], self.offset[idx] = P, offset


def default_batch(prefix, max_len, most=32):
    """Rows decoding together by default, from the first request's prefill KV and the cache length: on a CPU 8; on a
    GPU, where decode reads all the weights every step and rows come nearly free, as many as fit in 80 % of its free
    memory (a 7B model's row for a 21,000-token video is about 1.2 GB), at most `most`."""
    k = prefix[0][0]
    if k.device.type != "cuda":
        return 8
    row = 2 * len(prefix) * k.size(1) * max_len * k.size(3) * k.element_size()  # keys and values, every layer
    return max(1, min(most, int(0.8 * torch.cuda.mem_get_info(k.device)[0]) // row))


def sample_next(logits, temperature, top_p, greedy, noise):
    """Next token of each row of logits (N, V) fp32: argmax where greedy (N,) is set, else nucleus sampling (Holtzman
    et al.) at the row's temperature (N,) and top_p (N,), drawn with noise (N, V) ~ Exp(1): the argmax of p / noise is a
    draw from p (the exponential race, as torch.multinomial draws one sample). noise is None when all are greedy.
    The noise belongs to token ids, not to sorted positions: two near-equal probabilities that sort the other way in
    another batch (float sums in another order) then cannot trade their draws, so rows decoding together draw what
    each alone draws unless a draw is within rounding of a tie."""
    if noise is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # keep the smallest set of tokens whose mass reaches top_p (the top token always survives)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]
    drop = torch.zeros_like(drop).scatter(1, order, drop)  # (N, V) in token order
    return torch.where(greedy, logits.argmax(-1), (probs.masked_fill(drop, 0.0) / noise).argmax(-1))


def draw_noise(n, vocab, generator, device):
    """One step's noise for the n samples of one request, one Exp(1) per token: the only draw from its generator."""
    return torch.empty(n, vocab, device=device).exponential_(generator=generator)


def trim(rows, logps, stop_ids):
    """Token lists cut after their first stop id (kept), and their log-probs alike."""
    seqs, lps = [], []
    for row, lp in zip(rows, logps):
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        seqs.append(row[:end])
        lps.append(lp[:end])
    return seqs, lps


@dataclass
class Request:
    embeds: torch.Tensor  # (1, P, D): the prompt prefix (for a video: the prompt around its audio-visual tokens)
    n: int = 1  # samples, sharing the one prefill
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # argmax (also when temperature is 0)
    stop_ids: tuple = ()
    generator: torch.Generator = None  # the request's own (on the device): its samples are those of generating it alone
    return_logprobs: bool = False  # also each token's log-probability under the untempered model
    position_ids: torch.Tensor = None  # (3, 1, P) M-RoPE positions of the prefix; new tokens count on as text

    def result(self, seqs, lps):
        return (seqs, lps) if self.return_logprobs else seqs


@dataclass
class Job:  # an admitted request: its rows' slots and what they have decoded
    i: int
    r: Request
    slots: list
    toks: list
    lps: list
    live: int

    @property
    def sampled(self):
        return not (self.r.greedy or self.r.temperature == 0)


class Engine:
    """Decodes up to `batch` rows at once (0: default_batch, set at the first request). run(requests) yields
    (index, result) as each request finishes; generate(requests) returns the results in order. A result is what
    Qwen2.generate returns for the request alone: n token lists (each ends at its first stop id, kept), with
    return_logprobs also their log-probs."""

    def __init__(self, llm, batch=0, compile=False):
        self.llm, self.batch = llm, batch
        # shapes (batch, 1) against a fixed cache: one compiled graph, compiled again only if the cache grows
        self.step = torch.compile(self._step, dynamic=False) if compile else self._step

    def _step(self, tok, cache):
        """(B,) tokens at each row's length -> (B, V) fp32 logits of the next; writes their keys and values."""
        h, _ = self.llm.hidden(self.llm.embed_tokens(tok[:, None]), cache=cache)
        return self.llm.head(h[:, -1]).float()

    def generate(self, requests):
        out = dict(self.run(requests))
        return [out[i] for i in range(len(out))]

    @torch.no_grad()
    def run(self, requests):
        """requests: any iterable of Request, read lazily: a request's prefix is built only when it can start."""
        B = self.batch
        pending = enumerate(requests)
        nxt = next(pending, None)
        cache = logits = None
        owner = []  # per slot: (job, its sample row), None when free
        while True:
            free = [b for b, o in enumerate(owner) if o is None]
            while nxt is not None:  # continuous batching: free slots take the next requests, in order
                i, r = nxt
                if B and r.n > B:
                    raise ValueError(f"request {i}: {r.n} samples need as many slots, the engine has batch={B}")
                if r.max_new_tokens <= 0:
                    yield i, r.result([[] for _ in range(r.n)], [[] for _ in range(r.n)])
                elif cache is None or r.n <= len(free):
                    # alone: no padding, compute-bound
                    h, prefix = self.llm.hidden(r.embeds, use_cache=True, **({} if r.position_ids is None else
                                                                             {"position_ids": r.position_ids}))
                    first = self.llm.head(h[:, -1]).float()  # (1, V): every sample starts from the one prefill
                    need = -(-(r.embeds.size(1) + r.max_new_tokens) // 256) * 256  # rounded up: grown rarely
                    if cache is None:  # the first request sets the rows
                        B = max(B or default_batch(prefix, need), r.n)
                        owner, free = [None] * B, list(range(B))
                    if cache is None or cache.max_len < need:  # the first request, or a longer one
                        cache, logits = self._grow(cache, logits, prefix, B, need, first.size(-1))
                    slots, free = free[:r.n], free[r.n:]
                    shift = 0 if r.position_ids is None else int(r.position_ids[0, 0, -1]) + 1 - r.embeds.size(1)
                    cache.fill(slots, prefix, shift)
                    logits[slots] = first
                    job = Job(i, r, slots, [[] for _ in range(r.n)], [[] for _ in range(r.n)], r.n)
                    for j, b in enumerate(slots):
                        owner[b] = (job, j)
                else:
                    break
                nxt = next(pending, None)
            if all(o is None for o in owner):
                return
            tok = self._sample(logits, owner)
            lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
            tok_l, lp_l = tok.tolist(), lp.tolist()
            for b, o in enumerate(owner):
                if o is None:
                    continue
                job, j = o
                job.toks[j].append(tok_l[b])
                job.lps[j].append(lp_l[b])
                if tok_l[b] in job.r.stop_ids or len(job.toks[j]) == job.r.max_new_tokens:
                    owner[b], job.live = None, job.live - 1
                    if job.live == 0:
                        yield job.i, job.r.result(*trim(job.toks, job.lps, job.r.stop_ids))
            going = [o is not None for o in owner]
            if any(going):
                logits = self.step(tok, cache)  # free slots decode too (fixed shapes); what they write is never read
            going = torch.tensor(going, device=cache.lens.device)
            cache.lens += going
            cache.lens.masked_fill_(~going, 0)  # a free slot writes at position 0 until it is filled again

    def _grow(self, cache, logits, prefix, B, max_len, vocab):
        """A cache of B rows of max_len positions, holding what the live rows have."""
        new = KVCache(prefix, B, max_len)
        new_logits = torch.zeros(B, vocab, device=new.lens.device)
        if cache is not None:
            new.k[..., :cache.max_len, :], new.v[..., :cache.max_len, :] = cache.k, cache.v
            new.lens.copy_(cache.lens)
            new.offset.copy_(cache.offset)
            new_logits.copy_(logits)
        return new, new_logits

    def _sample(self, logits, owner):
        """The next token of every slot. Each live request draws its step's noise, (n, V), from its own generator
        (greedy ones draw nothing), and its live rows take their rows of it."""
        B, V = logits.shape
        jobs = {id(o[0]): o[0] for o in owner if o is not None and o[0].sampled}
        if not jobs:
            return logits.argmax(-1)
        dev = logits.device
        noise = torch.ones(B, V, device=dev)
        temperature, top_p = torch.ones(B, device=dev), torch.ones(B, device=dev)
        greedy = torch.ones(B, dtype=torch.bool, device=dev)
        for job in jobs.values():
            e = draw_noise(job.r.n, V, job.r.generator, dev)
            slots = [b for b in job.slots if owner[b] is not None and owner[b][0] is job]
            noise[slots] = e[[owner[b][1] for b in slots]]
            temperature[slots], top_p[slots], greedy[slots] = job.r.temperature, job.r.top_p, False
        return sample_next(logits, temperature, top_p, greedy, noise)
