"""
One gDPO training step (forward and backward) two ways, on the same model and the same pair:
- ours: the video's features from the cache, the prompt prefix run once, and the chosen, rejected and
  ground-truth captions as one batch over its KV cache; the reference log-probs were recorded when the
  pair was sampled (train_mrdpo.py);
- the released code's: for each of policy-chosen, policy-rejected, reference-chosen, reference-rejected
  (no grad, LoRA off) and ground-truth CE, re-encode the video (tower and Whisper) and run the whole
  sequence: 5 encoder passes and 5 LLM passes per step.
The sizes are the 7B run's scaled down to a CPU with its proportions kept: prefix / caption tokens about 25
(20,000 video tokens to 800), LLM matmul / attention FLOPs per prefix token about 3 (Qwen2-7B at 21,000
tokens: 3.1), MLP / width 5.3 as Qwen2-7B, grouped-query attention (4 query heads per KV head; Qwen2-7B: 7), and
a tower costing about a fifth of an LLM forward (so400m on 110 frames against the 7B LLM on 21,000 tokens: about 0.2).

$ python bench/gdpo_step.py            # prints the table and, last, "speedup: X.XX"
$ python bench/gdpo_step.py --smoke    # tiny, a few seconds
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
from config import configure, run  # noqa: E402
from model import AVConfig, VideoSALMONN2  # noqa: E402
from train_mrdpo import gdpo_loss, pair_step  # noqa: E402

# -----------------------------------------------------------------------------
n_embd = 512  # LLM width (8 heads of 64, 2 KV heads)
n_layer = 4  # LLM layers
frames = 20  # video frames: 20 x (12 x 13 = 156 tokens) + 60 audio tokens = about 3,200 prefix tokens
caption_tokens = 128  # per caption: prefix / caption about 25, as 20,000 / 800
repeats = 3  # timed steps of each scheme (interleaved); the median is reported
smoke = False  # tiny sizes, for the test
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 1337
# -----------------------------------------------------------------------------


def build(c):
    D, grid = c["n_embd"], 24  # a 24 x 24 patch grid: 12 x 12 pooled + 12 newlines per frame
    cfg = AVConfig.from_dict(dict(
        llm=dict(vocab_size=4096, hidden_size=D, intermediate_size=D * 18944 // 3584, num_hidden_layers=c["n_layer"],
                 num_attention_heads=D // 64, num_key_value_heads=max(1, D // 256)),
        vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3,
                    image_size=grid * 4, patch_size=4),
        whisper=dict(num_mel_bins=80, d_model=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
                     max_source_positions=1500),
        qformer=dict(encoder_width=128, hidden=128, heads=2, intermediate=256, llm_dim=D),
        pool=2, segment_seconds=30.0, time_aligned=False))
    model = VideoSALMONN2(cfg).to(c["device"])
    lora.apply_lora(model.llm, r=16, alpha=32, dropout=0.0)
    lora.mark_only_lora_trainable(model)
    return model.eval()


def five_pass_loss(model, media, prompt, captions, beta, ce_weight):
    """The released code's gDPO loss: for each of policy-chosen, policy-rejected, reference-chosen and
    -rejected (LoRA off, no grad) and ground-truth CE, re-encode the video and run the whole sequence."""
    pixels, mel, times, duration = media

    def logp(ids, grad=True):
        feats = (*model.encode(pixels, mel), times, duration)
        e, P = model.embed_sequence(feats, prompt, ids)
        with torch.set_grad_enabled(grad):
            logits = model.llm(embeds=e)[0][0, P - 1:-1]  # (len(ids), V)
            return -F.cross_entropy(logits.float(), torch.tensor(ids, device=e.device), reduction="sum")
    pc, pr = logp(captions[0]), logp(captions[1])
    with lora.disabled(model):
        rc, rr = logp(captions[0], False), logp(captions[1], False)
    ce = -logp(captions[2]) / len(captions[2])
    return gdpo_loss(pc[None], pr[None], rc[None], rr[None], ce, beta, ce_weight)[0]


def main(argv):
    c = configure(globals(), argv)
    if c["smoke"]:
        c.update(n_embd=64, n_layer=2, frames=6, caption_tokens=40, repeats=2)
    torch.manual_seed(c["seed"])
    dev = torch.device(c["device"])
    model = build(c)
    cfg = model.cfg
    pixels = torch.randn(c["frames"], 3, cfg.vision.image_size, cfg.vision.image_size, device=dev)
    mel = torch.randn(max(1, -(-c["frames"] // 30)), 80, 3000, device=dev)
    times, duration = [float(t) for t in range(c["frames"])], float(c["frames"])
    prompt = ([1, 2, 3, 4, 5], [6, 7, 8, 9])
    captions = [torch.randint(10, 4096, (c["caption_tokens"],)).tolist() for _ in range(3)]  # chosen, rejected, gt
    for layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # mid-round: the policy differs from the reference
    cached = (*model.encode(pixels, mel), times, duration)  # the feature cache, filled when the pair was sampled
    with torch.no_grad(), lora.disabled(model):
        ref = model.continuation_logps(cached, prompt, captions[:2])[0]
    pair = {"chosen_ids": captions[0], "rejected_ids": captions[1], "gt_ids": captions[2],
            "ref_chosen": ref[0].item(), "ref_rejected": ref[1].item()}
    prefix_len = len(prompt[0]) + len(prompt[1]) + model.av_tokens(*cached).size(0)

    def ours():
        loss = pair_step(model, [(cached, prompt, pair)], dev, {"beta": 0.1, "ce_weight": 0.1})[0]
        loss.backward()
        return loss

    def five_pass():
        loss = five_pass_loss(model, (pixels, mel, times, duration), prompt, captions, 0.1, 0.1)
        loss.backward()
        return loss

    def timed(fn):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, loss.item()

    (_, a), (_, b) = timed(ours), timed(five_pass)  # warm-up; and the two losses must agree
    ta, tb = [], []
    for _ in range(c["repeats"]):
        ta.append(timed(ours)[0])
        tb.append(timed(five_pass)[0])
    ma, mb = statistics.median(ta), statistics.median(tb)
    print(f"device {dev}, LLM {c['n_embd']} x {c['n_layer']} layers, prefix {prefix_len} tokens, "
          f"captions 3 x {c['caption_tokens']} tokens, median of {c['repeats']}")
    print(f"loss: ours {a:.6f}, 5-pass {b:.6f}")
    print(f"{'scheme':<22}{'s/step':>10}")
    print(f"{'shared prefix (ours)':<22}{ma:>10.3f}")
    print(f"{'5-pass (released)':<22}{mb:>10.3f}")
    print(f"speedup: {mb / ma:.2f}")


if __name__ == "__main__":
    run(main)
