"""The Qwen2 chat prompt around the audio-visual block, tokenized piece by piece as released."""
from conftest import make_tokenizer
from data import encode_prompt, encode_response


def test_prompt_pieces_decode_to_the_template():
    tok = make_tokenizer()
    before, after = encode_prompt(tok, "Describe the video in detail.")
    text = tok.decode(before + after, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "\n\nDescribe the video in detail.<|im_end|>\n<|im_start|>assistant\n")
    nl = tok.encode("\n").ids
    prompt_ids = tok.encode("\nDescribe the video in detail.").ids  # "\n" then "\nPrompt", as released
    assert after[:len(nl) + len(prompt_ids)] == nl + prompt_ids
    assert before[0] == tok.token_to_id("<|im_start|>")


def test_response_ends_with_im_end():
    tok = make_tokenizer()
    ids = encode_response(tok, "A tone plays.")
    assert ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids[:-1]) == "A tone plays."
