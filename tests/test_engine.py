"""engine.Engine: many prompts decoding together in one KV cache (ragged prefixes, per-row stops, slot refills, a
cache that grows mid-run) return exactly what generating each prompt alone (Qwen2.generate) returns."""
import pytest
import torch

from engine import Engine, Request, draw_noise
from test_qwen2 import tiny_qwen2

STOP = (3, 5, 7, 11, 13)
# (prefix length, samples, max new tokens, temperature, top_p, greedy): ragged prefixes, greedy and sampled
# requests mixed, one prefix longer than the cache's first size (it grows while other rows decode)
SPECS = [(9, 2, 12, 1.0, 0.9, False), (17, 2, 7, 1.3, 1.0, False), (4, 1, 10, 1.0, 1.0, True), (300, 2, 9, 0.7, 0.8, False),
         (12, 2, 12, 1.0, 0.9, False), (6, 1, 5, 1.0, 1.0, True), (23, 2, 11, 0.0, 1.0, False), (8, 2, 12, 1.0, 0.95, False),
         (15, 1, 0, 1.0, 1.0, False), (5, 2, 12, 1.0, 0.5, False)]


def make_requests(m, seed_of=lambda i: 1000 + i):
    torch.manual_seed(0)
    prefixes = [m.embed_tokens(torch.randint(0, 97, (1, P))).detach() for P, *_ in SPECS]
    return [Request(e, n, new, temp, top_p, greedy, STOP, torch.Generator().manual_seed(seed_of(i)), return_logprobs=True)
            for i, (e, (_, n, new, temp, top_p, greedy)) in enumerate(zip(prefixes, SPECS))]


def alone(m, r):
    return m.generate(r.embeds, r.n, r.max_new_tokens, r.temperature, r.top_p, r.greedy, r.stop_ids, r.generator, True)


@pytest.mark.parametrize("batch", [2, 3, 7])
def test_engine_equals_each_prompt_alone(batch):
    m = tiny_qwen2()
    want_reqs, got_reqs = make_requests(m), make_requests(m)
    want = [alone(m, r) for r in want_reqs]
    got = Engine(m, batch=batch).generate(got_reqs)
    for i, ((ws, wl), (gs, gl)) in enumerate(zip(want, got)):
        assert gs == ws, f"request {i}"
        for a, b in zip(wl, gl):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), f"request {i}"
    for w, g in zip(want_reqs, got_reqs):  # each generator drew exactly what the request alone draws
        assert torch.equal(w.generator.get_state(), g.generator.get_state())
    # the test covers what it claims: rows stopped early and at the limit, at different steps, in more rows than slots
    rows = [(s, r.max_new_tokens) for (seqs, _), r in zip(want, want_reqs) for s in seqs]
    assert any(s and s[-1] in STOP and len(s) < new for s, new in rows) and any(len(s) == new > 0 for s, new in rows)
    assert len({len(s) for s, _ in rows}) > 4 and len(rows) > 2 * batch


def test_samples_differ_by_seed_not_by_neighbours():
    """The same request among different neighbours gives the same samples; another seed gives others."""
    m = tiny_qwen2()
    base = Engine(m, batch=4).generate(make_requests(m))
    shuffled = Engine(m, batch=5).generate(make_requests(m, seed_of=lambda i: 1000 + i if i == 0 else 7 * i))
    assert shuffled[0] == base[0]
    reseeded = Engine(m, batch=4).generate(make_requests(m, seed_of=lambda i: 2000 + i))
    assert reseeded[0][0] != base[0][0]


def test_requests_are_read_as_slots_free_and_results_come_as_they_finish():
    m = tiny_qwen2()
    pulled = []

    def stream():
        for i, r in enumerate(make_requests(m)):
            pulled.append(i)
            yield r
    order = []
    for i, _ in Engine(m, batch=3).run(stream()):
        order.append((i, len(pulled)))
    assert sorted(i for i, _ in order) == list(range(len(SPECS)))
    assert order[0][1] < len(SPECS)  # the first result came before the last request was read


def test_a_draw_belongs_to_its_token_not_to_its_rank():
    """Relabelling the vocabulary (logits and noise alike) relabels the sample: the sort inside nucleus sampling has no
    say in which draw a token gets, so near-equal probabilities ordered differently in another batch draw the same."""
    from engine import sample_next
    N, V = 64, 50
    logits = torch.randn(N, V)
    logits[:, 1] = logits[:, 0]  # exact ties: torch.sort is free to order them either way
    noise = draw_noise(N, V, torch.Generator().manual_seed(5), "cpu")
    perm = torch.randperm(V)
    args = torch.ones(N), torch.full((N,), 0.8), torch.zeros(N, dtype=torch.bool)
    assert torch.equal(perm[sample_next(logits[:, perm], *args, noise[:, perm])], sample_next(logits, *args, noise))
    # and the draw is the exponential race, as torch.multinomial's one sample (the same generator calls)
    probs = torch.softmax(logits, dim=-1)
    a = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(a, sample_next(logits, torch.ones(N), torch.ones(N), args[2], noise))


def test_more_samples_than_slots_is_an_error():
    m = tiny_qwen2()
    with pytest.raises(ValueError, match="request 0: 3 samples"):
        Engine(m, batch=2).generate([Request(m.embed_tokens(torch.tensor([[1, 2]])).detach(), n=3)])


def test_mrope_prompts_equal_each_alone():
    """Prompts with M-RoPE positions (video-SALMONN 2+: a block's three rows, then text from its largest position)
    of different lengths and position shifts decode together as each alone (Qwen2.generate(position_ids=...))."""
    from test_mrope import tiny_mrope_qwen2
    m = tiny_mrope_qwen2(2)
    torch.manual_seed(3)
    reqs = []
    for i, (P, top) in enumerate([(9, 14), (15, 9), (6, 30), (12, 12)]):  # the last position: past, before or at P - 1
        pos = torch.stack([torch.randint(0, top, (P,)) for _ in range(3)]).sort(-1).values
        pos[:, -1] = top - 1
        reqs.append(dict(embeds=m.embed_tokens(torch.randint(0, 97, (1, P))).detach(), n=2, max_new_tokens=8,
                         temperature=1.0, top_p=0.9, stop_ids=STOP, return_logprobs=True, position_ids=pos[:, None]))
    want = [m.generate(**{k: v for k, v in r.items() if k != "embeds"}, embeds=r["embeds"],
                       generator=torch.Generator().manual_seed(i)) for i, r in enumerate(reqs)]
    got = Engine(m, batch=3).generate([Request(**r, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(reqs)])
    for (ws, wl), (gs, gl) in zip(want, got):
        assert gs == ws
        assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5) for a, b in zip(wl, gl))
    plain = Engine(m, batch=3).generate([Request(**{**r, "position_ids": None}, generator=torch.Generator().manual_seed(i))
                                         for i, r in enumerate(reqs)])
    assert max(abs(a[0][0] - b[0][0]) for (_, a), (_, b) in zip(plain, got)) > 1e-4  # and the positions matter
