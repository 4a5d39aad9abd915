"""Our backbones against transformers in bf16 on CUDA, as they run in training and captioning (the other parity
tests run fp32 on the CPU): the same small random models as tests/test_qwen2.py, test_whisper.py and
test_siglip.py, the same weights and inputs, ours and transformers' both in bf16 on the GPU, each compared with
transformers in fp32 on the CPU (exact fp32: no TF32 there).

Tolerances. bf16 keeps 8 significant bits, so neither side is close to fp32, and the two round differently
(other SDPA backends, other op orders); a fixed atol would be loose or flaky. So our bf16 error against the
fp32 reference is measured against transformers' bf16 error on the same reference: the mean absolute error at
most 1.5x theirs plus a tenth of a bf16 rounding step (2^-8 of the reference's mean magnitude), the max
absolute error (a max over thousands of roundings, noisier) at most 2x theirs plus one step; and our mean
error under 2 % of the reference's mean magnitude, so that the two cannot be wrong together."""
import pytest
import torch
import transformers as hf

from data import log_mel_spectrogram
from encoders import SiglipVision, WhisperEncoder
from model import Qwen2
from test_qwen2 import TINY, decode_in_pieces, save_hf_qwen2
from test_siglip import VISION, randomise_biases
from test_whisper import save_hf_whisper, tone_and_noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the bf16 GPU parity tests run only where a GPU is present")
DEV = "cuda"
BF16 = torch.bfloat16
STEP = 2 ** -8  # bf16's relative rounding step (unit roundoff)


def errors(x, ref):
    e = (x.float().cpu() - ref).abs()
    return e.mean().item(), e.max().item()


def assert_bf16_parity(ours, theirs, ref, what, other="transformers"):
    """ours and theirs: bf16 results of the same computation (theirs from `other`); ref: its fp32 result."""
    ref = ref.float().cpu()
    (m_ours, x_ours), (m_theirs, x_theirs), scale = errors(ours, ref), errors(theirs, ref), ref.abs().mean().item()
    msg = (f"{what}: bf16 error against fp32, mean / max: ours {m_ours:.3g} / {x_ours:.3g}, "
           f"{other} {m_theirs:.3g} / {x_theirs:.3g}; reference mean magnitude {scale:.3g}")
    assert m_ours <= 1.5 * m_theirs + 0.1 * STEP * scale, msg
    assert x_ours <= 2.0 * x_theirs + STEP * scale, msg
    assert m_ours <= 0.02 * scale, msg


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """(transformers fp32 on the CPU, ours bf16 on the GPU, transformers bf16 on the GPU) of one random
    model with grouped-query attention (2 query heads per KV head; Qwen2-7B has 7), q/k/v biases, theta 1e6."""
    path = tmp_path_factory.mktemp("qwen2")
    ref = save_hf_qwen2(path, n_head=4, n_kv=2, theta=1e6)
    ours = Qwen2.from_pretrained(path, dtype=BF16, device=DEV).eval()
    theirs = hf.Qwen2ForCausalLM.from_pretrained(path, dtype=BF16).to(DEV).eval()
    return ref, ours, theirs


def ids(*shape, seed=0):
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def test_qwen2_logits_bf16(qwen2):
    ref, ours, theirs = qwen2
    idx = ids(2, 64)
    with torch.no_grad():
        logits = ours(idx.to(DEV))[0]
        assert logits.dtype == BF16
        assert_bf16_parity(logits, theirs(idx.to(DEV)).logits, ref(idx).logits, "Qwen2 logits")


def test_qwen2_kv_cache_decode_bf16(qwen2):
    """Prefill, a chunk of 3 (the masked path) and single tokens over the bf16 cache: their logits are as close
    to fp32 as the full bf16 forward's."""
    ref, ours, _ = qwen2
    idx = ids(2, 24, seed=1)
    x = idx.to(DEV)
    with torch.no_grad():
        full = ours(x)[0]
        logits, cache = decode_in_pieces(ours, x, 16)
        assert cache[0][0].dtype == BF16 and cache[0][0].shape == (2, 2, 24, 16)
        assert_bf16_parity(logits, full, ref(idx).logits, "KV-cache decode", "our full forward")


@pytest.mark.parametrize("seed", [7, 8])  # prompts whose greedy continuations vary before settling on one token
def test_qwen2_greedy_generate_bf16(qwen2, seed):
    """Greedy tokens of ours (shared prefill, KV cache) and transformers' generate, both bf16, agree up to the
    first step, if any, where the fp32 model's two best logits are closer than the bf16 noise (there either
    token is a right answer, and random tiny models have such near-ties); and each token we pick is, given our
    own prefix, within that noise of the fp32 argmax."""
    ref, ours, theirs = qwen2
    n, prompt = 16, ids(1, 9, seed=seed)
    with torch.no_grad():
        mine = ours.generate(ours.embed_tokens(prompt.to(DEV)), max_new_tokens=n, greedy=True)[0]
        out = theirs.generate(prompt.to(DEV), attention_mask=torch.ones_like(prompt).to(DEV), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
        hf_tokens = out[0, 9:].tolist()
        seq = torch.cat([prompt, torch.tensor([mine])], dim=1)
        want = ref(seq).logits[0, 8:-1]  # (n, V) fp32: the logits each generated token was chosen from
        got_ours, got_theirs = ours(seq.to(DEV))[0][0, 8:-1], theirs(seq.to(DEV)).logits[0, 8:-1]
    assert len(mine) == len(hf_tokens) == n
    assert_bf16_parity(got_ours, got_theirs, want, "Qwen2 logits on the generated sequence")
    # the noise: both sides' largest measured bf16 logit error, doubled since decoding runs other kernels
    noise = 2 * (errors(got_ours, want)[1] + errors(got_theirs, want)[1])
    top2 = want.topk(2, dim=-1).values
    for t in range(n):
        assert want[t, mine[t]] >= top2[t, 0] - noise, f"step {t}: token {mine[t]} is not the fp32 argmax (noise {noise:.3g})"
    first = next((t for t in range(n) if mine[t] != hf_tokens[t]), n)
    assert first == n or top2[first, 0] - top2[first, 1] <= noise, \
        f"ours {mine} and transformers {hf_tokens} part at step {first} without a near-tie"


def test_whisper_encoder_bf16(tmp_path):
    ref = save_hf_whisper(tmp_path, n_mels=128)  # large-v3's 128 mel bins
    ours = WhisperEncoder.from_pretrained(tmp_path, dtype=BF16, device=DEV).eval()
    theirs = hf.WhisperForConditionalGeneration.from_pretrained(tmp_path, dtype=BF16).get_encoder().to(DEV).eval()
    mel = torch.stack([log_mel_spectrogram(a, 128) for a in tone_and_noise().values()])
    with torch.no_grad():
        out = ours(mel.to(DEV, BF16))
        assert out.dtype == BF16 and out.shape == (2, 1500, 64)
        assert_bf16_parity(out, theirs(mel.to(DEV, BF16)).last_hidden_state, ref(mel).last_hidden_state, "Whisper encoder")


def test_siglip_bf16(tmp_path):
    torch.manual_seed(0)
    ref = hf.SiglipVisionModel(hf.SiglipVisionConfig(**VISION)).eval()
    randomise_biases(ref)
    ref.save_pretrained(tmp_path)
    ours = SiglipVision.from_pretrained(tmp_path, dtype=BF16, device=DEV).eval()
    theirs = hf.SiglipVisionModel.from_pretrained(tmp_path, dtype=BF16).to(DEV).eval()
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = ours(px.to(DEV, BF16))
        assert out.dtype == BF16 and out.shape == (2, 16, 64)
        # ours stops before post-layernorm: its match is the last hidden state
        theirs_last = theirs(px.to(DEV, BF16), output_hidden_states=True).hidden_states[-1]
        assert_bf16_parity(out, theirs_last, ref(px, output_hidden_states=True).hidden_states[-1], "SigLIP tower")
