import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model import IGNORE, encode_examples, example_losses, generate, load_model


def test_char_tokenizer_roundtrip(tiny_model_dir):
    _, tokenizer = load_model(tiny_model_dir)
    ids = tokenizer("12+3= ab\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == 9
    assert tokenizer.decode(ids) == "12+3= ab\n"


def test_encode_masks_prompt_and_padding(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    enc = encode_examples(tok, ["1+1=", "10+1="], ["2", "11"], max_length=16, add_eos=True)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # row 0: <eos> 1 + 1 = 2 <eos> <pad> <pad>; row 1 is two tokens longer
    assert enc.input_ids.shape == (2, 9)
    assert enc.input_ids[0, 0] == eos and enc.input_ids[0, -1] == pad
    two = tok.convert_tokens_to_ids("2")
    assert enc.labels[0].tolist() == [IGNORE] * 5 + [two, eos] + [IGNORE] * 2
    assert enc.attention_mask[0].tolist() == [1] * 7 + [0] * 2
    assert (enc.labels[1] != IGNORE).sum() == 3  # "1", "1", eos


def test_example_losses_match_a_manual_cross_entropy(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    prompts, responses = ["12+3=", "9+9="], ["51", "81"]
    mean, count = example_losses(
        model, tok, prompts, responses, max_length=32, add_eos=True, batch_size=1
    )
    assert count.tolist() == [3, 3]
    enc = encode_examples(tok, prompts[:1], responses[:1], max_length=32, add_eos=True)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(enc.input_ids)).logits[0, :-1]
    targets = torch.from_numpy(enc.labels[0, 1:])
    keep = targets != IGNORE
    manual = F.cross_entropy(logits[keep], targets[keep]).item()
    assert np.isclose(mean[0], manual, atol=1e-5)


def test_example_losses_are_the_same_in_length_sorted_batches(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    prompts = ["1+1=", "123+456=", "7+8=", "99+1=", "12+3=", "5+5="]
    responses = ["2", "975", "51", "001", "51", "01"]
    args = dict(max_length=32, add_eos=True)
    alone, alone_count = example_losses(model, tok, prompts, responses, batch_size=1, **args)
    # In batches of 4 the rows go shortest first; each comes back in its own place.
    batched, batched_count = example_losses(model, tok, prompts, responses, batch_size=4, **args)
    assert batched_count.tolist() == alone_count.tolist() == [2, 4, 3, 4, 3, 3]
    assert batched == pytest.approx(alone, abs=1e-5)
    # No response token left (truncated away): NaN, with a count of 0.
    empty, count = example_losses(
        model, tok, ["1+1="], [""], batch_size=4, max_length=32, add_eos=False
    )
    assert np.isnan(empty[0]) and count[0] == 0


def test_generate_returns_k_samples_per_prompt(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    out = generate(
        model,
        tok,
        ["1+2=", "30+40="],
        samples_per_prompt=3,
        max_new_tokens=4,
        temperature=1.0,
        top_p=0.9,
        greedy=False,
        batch_size=8,
        max_length=64,
    )
    assert len(out) == 6 and all(len(s) <= 4 for s in out)
    greedy = generate(
        model,
        tok,
        ["1+2="],
        samples_per_prompt=2,
        max_new_tokens=4,
        temperature=1.0,
        top_p=1.0,
        greedy=True,
        batch_size=8,
        max_length=64,
    )
    assert len(greedy) == 2 and greedy[0] == greedy[1]


def test_long_pairs_keep_response_tokens(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    enc = encode_examples(tok, ["a" * 50, "b" * 3], ["1" * 30, "2"], max_length=20, add_eos=True)
    assert enc.input_ids.shape == (2, 20)
    # Row 0: start + 9 prompt chars (its end) + 10 response chars (its start), no eos.
    assert (enc.labels[0] != IGNORE).sum() == 10
    assert tok.decode(enc.input_ids[0, 1:10]) == "a" * 9
    assert (enc.labels[1] != IGNORE).sum() == 2  # "2" and eos: short rows are untouched


def test_length_bucketed_batches_cover_each_row_once_with_little_padding():
    import numpy as np

    from pipeline.train import length_bucketed_batches

    lengths = np.random.default_rng(0).integers(5, 200, size=1000)
    batches = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert all(len(b) == 16 for b in batches) and len(batches) == 1000 // 16
    assert len(set(rows.tolist())) == len(rows)  # no row twice; 8 left out this epoch
    again = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again))  # deterministic under a seed

    def padding(bs):
        return sum(lengths[b].max() * len(b) - lengths[b].sum() for b in bs)

    shuffled = np.random.default_rng(1).permutation(1000)[:992].reshape(-1, 16)
    assert padding(batches) < 0.2 * padding(list(shuffled))


def test_tokenize_then_pad_equals_encode(tiny_model_dir):
    from pipeline.model import encode_examples, load_model, pad_examples, tokenize_examples

    _, tokenizer = load_model(tiny_model_dir)
    prompts, responses = ["12+34=", "1+2="], ["64", "3"]
    whole = encode_examples(tokenizer, prompts, responses, max_length=16, add_eos=True)
    rows = tokenize_examples(tokenizer, prompts, responses, max_length=16, add_eos=True)
    parts = pad_examples(rows, tokenizer.pad_token_id)
    for a, b in zip(whole.__dict__.values(), parts.__dict__.values()):
        assert (a == b).all()
