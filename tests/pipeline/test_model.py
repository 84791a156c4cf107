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


def _whole_row_losses(model, tok, prompts, responses, *, max_length, add_eos):
    """Reference: every row through the model on its own, start to end."""
    from pipeline.model import token_losses

    out = []
    for p, r in zip(prompts, responses):
        enc = encode_examples(tok, [p], [r], max_length=max_length, add_eos=add_eos)
        losses, mask = token_losses(model, enc, 1)
        out.append(losses[0][mask[0]].mean() if mask[0].any() else np.nan)
    return np.array(out, dtype=np.float32)


def test_rows_that_share_a_prompt_score_as_whole_rows(tiny_model_dir):
    from pipeline.model import (
        hidden_size,
        prompt_groups,
        shared_prompt_batches,
        shared_prompt_losses,
        tokenize_examples,
    )

    model, tok = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefgh 0123456789"))
    # Ragged prompts (2 to 50 chars) with 1 to 6 samples each; some responses are long enough
    # to be truncated at the 64-token context, one is empty. In one batch, a short prompt
    # with a long response sits beside a long prompt with a short one.
    distinct = ["".join(rng.choice(letters, size=rng.integers(2, 50))) for _ in range(12)]
    prompts = [p for p in distinct for _ in range(rng.integers(1, 7))]
    responses = ["".join(rng.choice(letters, size=rng.integers(1, 70))) for _ in prompts]
    responses[3] = ""
    args = dict(max_length=64, add_eos=False)
    rows = tokenize_examples(tok, prompts, responses, **args)
    expected = _whole_row_losses(model, tok, prompts, responses, **args)
    for batch_size in (1, 3, 16):  # groups larger than a batch are split
        # The plan, whether or not it is the cheaper one here.
        batches = shared_prompt_batches(rows, batch_size)
        assert sorted(i for b in batches for g in b for i in g) == list(range(len(rows)))
        assert all(sum(len(g) for g in b) <= batch_size for b in batches)
        mean, count = shared_prompt_losses(model, rows, batches, tok.pad_token_id)
        assert np.isnan(mean[3]) and count[3] == 0
        assert mean == pytest.approx(expected, abs=1e-5, nan_ok=True)
        assert count.sum() == sum(len(ids) - n for ids, n in rows)
    # A prompt cut shorter to fit a long response is a prompt of its own.
    assert 12 < len(prompt_groups(rows)) < len(rows)
    assert hidden_size(model) == 32


def test_prompts_are_shared_when_that_is_the_cheaper_plan(tiny_model_dir):
    from pipeline.model import (
        cache_argument,
        shared_prompt_batches,
        shared_prompt_tokens,
        sharing_is_cheaper,
        tokenize_examples,
    )

    model, tok = load_model(tiny_model_dir)

    def rows(prompts, responses):
        return tokenize_examples(tok, prompts, responses, max_length=64, add_eos=True)

    # k=4 samples of "123+456=" (9 prompt tokens with the start token) and of "1+2=" (5):
    # each prompt runs once.
    short = rows(["123+456="] * 4 + ["1+2="] * 4, ["9753", "9753", "975", "97"] + ["3"] * 4)
    plan = shared_prompt_batches(short, 8)
    assert sharing_is_cheaper(short, plan, 8, hidden=32)
    assert shared_prompt_tokens(short, plan) == 9 + (5 + 5 + 4 + 3) + 5 + 4 * 2
    # A short prompt whose answers differ a lot in length: padding every answer to the
    # longest costs more than running the prompt k times.
    ragged = rows(["ab"] * 2 + ["cd"] * 2, ["a" * 50, "b", "c" * 50, "d"])
    assert not sharing_is_cheaper(ragged, shared_prompt_batches(ragged, 2), 2, hidden=32)
    assert shared_prompt_batches(rows(["1+1=", "2+2="], ["2", "4"]), 8) is None  # none shared
    no_start = tok.__class__.from_pretrained(tiny_model_dir)
    no_start.bos_token = no_start.eos_token = None
    empty_prompts = tokenize_examples(
        no_start, ["", ""], ["ab", "cd"], max_length=64, add_eos=False
    )
    assert shared_prompt_batches(empty_prompts, 8) is None  # no token to continue from
    # Either way, example_losses gives each row its own loss. Here sharing is the cheaper
    # plan: the prompt runs once, then the responses continue from its KV cache, passed under
    # the keyword this transformers' forward takes (`cache` in recent ones, `past_key_values`
    # before). With the wrong one, scoring quietly fell back to whole rows, 1.8x slower.
    calls = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(set(kwargs)), with_kwargs=True
    )
    try:
        mean, _ = example_losses(
            model, tok, ["123+456="] * 4, ["9753"] * 4, max_length=64, add_eos=True, batch_size=8
        )
    finally:
        hook.remove()
    assert mean == pytest.approx([mean[0]] * 4, abs=1e-6)
    assert len(calls) == 2 and cache_argument(model) in calls[1]


def test_token_ids_are_the_tokenizers(tiny_model_dir):
    from pipeline.model import token_ids

    _, tok = load_model(tiny_model_dir)
    texts = ["12+34=", "", "hello, world\n", "a b"]
    assert token_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
