"""Our Qwen2 against transformers' Qwen2ForCausalLM on the same weights, and the KV cache."""
import pytest
import torch
import transformers as hf

from model import Qwen2, Qwen2Config

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3)


def save_hf_qwen2(path, n_head=4, n_kv=2, theta=1e6, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = hf.Qwen2Config(**TINY, num_attention_heads=n_head, num_key_value_heads=n_kv, rope_theta=theta,
                         tie_word_embeddings=tied)
    ref = hf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them matter
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    ref.save_pretrained(path)
    return ref


@pytest.mark.parametrize("n_head,n_kv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_logits_match_transformers(tmp_path, n_head, n_kv, tied, theta):
    ref = save_hf_qwen2(tmp_path, n_head, n_kv, theta, tied)
    ours = Qwen2.from_pretrained(tmp_path).eval()
    assert ours.cfg.rope_theta == theta and ours.cfg.num_key_value_heads == n_kv
    assert (ours.lm_head is None) == tied
    idx = torch.randint(0, TINY["vocab_size"], (2, 23))
    with torch.no_grad():
        diff = (ours(idx)[0] - ref(idx).logits).abs().max().item()
    assert diff <= 1e-4


def tiny_qwen2(seed=0, **kw):
    torch.manual_seed(seed)
    return Qwen2(Qwen2Config(**{**TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e4, **kw})).eval()


def decode_in_pieces(m, idx, prefill, chunk=3):
    """Logits of idx (B, T) from a prefill of its first `prefill` tokens, then a chunk of `chunk` (the masked path),
    then single tokens, each over the KV cache; and the final cache."""
    with torch.no_grad():
        logits, cache = m(idx[:, :prefill], use_cache=True)
        steps = [logits]
        for a, b in [(prefill, prefill + chunk)] + [(t, t + 1) for t in range(prefill + chunk, idx.size(1))]:
            logits, cache = m(idx[:, a:b], cache=cache, use_cache=True)
            steps.append(logits)
    return torch.cat(steps, dim=1), cache


def test_kv_cache_decode_equals_full_forward():
    m = tiny_qwen2()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = m(idx)
    logits, cache = decode_in_pieces(m, idx, 12)
    assert cache[0][0].shape == (2, 2, 20, 16)
    assert torch.allclose(logits, full, atol=1e-5)


def test_shared_prefix_equals_separate_runs_with_gradients():
    """One batch-1 prefix (the video) serving N continuations (captions) equals N full forwards,
    in logits and in the gradients that reach the prefix embeddings and the weights."""
    m = tiny_qwen2().train()
    N, P, T = 3, 11, 6
    prefix = torch.randn(1, P, 64)
    conts = torch.randint(0, 97, (N, T))

    def loss_of(logits):
        return logits.float().pow(2).mean()

    pre1 = prefix.clone().requires_grad_(True)
    _, cache = m(embeds=pre1, use_cache=True)
    shared, _ = m(conts, cache=cache)
    loss_of(shared).backward()
    shared_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()

    pre2 = prefix.clone().requires_grad_(True)
    full = torch.cat([pre2.expand(N, -1, -1), m.embed_tokens(conts)], dim=1)
    separate, _ = m(embeds=full)
    loss_of(separate[:, P:]).backward()

    assert torch.allclose(shared, separate[:, P:], atol=1e-5)
    assert torch.allclose(pre1.grad, pre2.grad, atol=1e-6)
    for n, p in m.named_parameters():
        assert torch.allclose(shared_grads[n], p.grad, atol=1e-6), n


def test_generate_shared_prefill_matches_greedy_full_forward():
    m = tiny_qwen2()
    prompt = torch.randint(0, 97, (1, 9))
    seqs = m.generate(m.embed_tokens(prompt), n=2, max_new_tokens=6, greedy=True)
    assert seqs[0] == seqs[1] and len(seqs[0]) == 6
    idx = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy by full re-forward, no cache
            idx = torch.cat([idx, m(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert idx[0, 9:].tolist() == seqs[0]


def test_generate_stops_and_returns_untempered_logprobs():
    m = tiny_qwen2()
    prompt = m.embed_tokens(torch.randint(0, 97, (1, 5)))
    g = torch.Generator().manual_seed(0)
    seqs, lps = m.generate(prompt, n=4, max_new_tokens=8, temperature=1.5, top_p=0.9, generator=g,
                           stop_ids=(3, 5, 7), return_logprobs=True)
    g = torch.Generator().manual_seed(0)
    again = m.generate(prompt, n=4, max_new_tokens=8, temperature=1.5, top_p=0.9, generator=g, stop_ids=(3, 5, 7))
    assert seqs == again  # a fixed seed reproduces the samples
    for s, lp in zip(seqs, lps):
        assert len(s) == len(lp) and all(t not in (3, 5, 7) for t in s[:-1])
        with torch.no_grad():  # the recorded log-probs are those of the untempered model
            ids = torch.tensor([s])
            logits, _ = m(embeds=torch.cat([prompt, m.embed_tokens(ids)], 1))
            ref = torch.log_softmax(logits[0, 4:-1], -1).gather(1, ids[0, :, None])[:, 0]
        assert torch.allclose(torch.tensor(lp), ref, atol=1e-5)


def test_nucleus_keeps_only_the_top_p_mass():
    from engine import draw_noise, sample_next
    N = 4000
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(N, -1)
    noise = draw_noise(N, 4, torch.Generator().manual_seed(0), "cpu")
    toks = sample_next(logits, torch.ones(N), torch.full((N,), 0.75), torch.zeros(N, dtype=torch.bool), noise)
    assert set(toks.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75: tokens 2 and 3 never appear
    assert abs((toks == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # drawn from the renormalised nucleus
    greedy = torch.tensor([True, False])
    assert sample_next(logits[:2], torch.ones(2), torch.ones(2), greedy, noise[:2])[0].item() == 0
    assert sample_next(logits[:1], torch.ones(1), torch.ones(1), greedy[:1], None).item() == 0
