"""Per-token diagnostics: accounting against hand-computed numbers, embedding distances on
constructed vectors, two real tiny models, and `genloop diagnose` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data import DataError
from pipeline.diagnose_cmd import DiagnoseSettings, load_examples
from pipeline.diagnostics import (
    CATEGORY_COLUMNS,
    FALLBACK,
    SPECIAL,
    category_breakdown,
    compare_evals,
    compare_models,
    diagnose,
    diagnose_generation,
    embedding_mmd,
    mean_embedding_cosine,
    median_bandwidth,
    token_category,
    token_loss_table,
    top_risers,
)

PNG = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- categories


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\n", "whitespace/newline"),
        (" ", "whitespace/newline"),
        ("\t\n ", "whitespace/newline"),
        (",", "punctuation"),
        (" .", "punctuation"),
        ("?!", "punctuation"),
        ("_", "punctuation"),
        ("7", "digits"),
        (" 42", "digits"),
        ("the", "word pieces"),
        (" the", "word pieces"),
        ("a1", "word pieces"),
        ("", "word pieces"),
    ],
)
def test_token_category_defaults(text, expected):
    assert token_category(text) == expected


def test_token_category_custom_map_first_match_wins():
    categories = {"vowel": r"[aeiou]", "letter": r"[a-z]", "any": r"."}
    assert token_category("e", categories) == "vowel"
    assert token_category("b", categories) == "letter"
    assert token_category("7", categories) == "any"
    assert token_category("xy", categories) == FALLBACK


# --------------------------------------------------------------------------- accounting

# A tiny vocabulary and two rows of 4 positions. Scored (mask) occurrences:
#   row 0: "\n" A 1.0 B 2.0 | "," A 2.0 B 1.0 | "7" A 1.0 B 1.5   (position 0 is the prompt)
#   row 1: "a"  A 2.0 B 3.0 | "\n" A 1.0 B 3.0 | "a" A 4.0 B 4.0  (position 3 is padding)
VOCAB = {0: "a", 1: "\n", 2: ",", 3: "7", 9: "<pad>"}
IDS = np.array([[0, 1, 2, 3], [0, 1, 0, 9]])
MASK = np.array([[False, True, True, True], [True, True, True, False]])
LOSS_A = np.array([[5.0, 1.0, 2.0, 1.0], [2.0, 1.0, 4.0, 0.0]])
LOSS_B = np.array([[9.0, 2.0, 1.0, 1.5], [3.0, 3.0, 4.0, 0.0]])


def test_token_loss_table_by_hand():
    table = token_loss_table(IDS, LOSS_A, LOSS_B, MASK, VOCAB).set_index("token_id")
    assert list(table.index) == [0, 1, 2, 3]  # 9 (padding) is never scored
    assert list(table["token"]) == ["a", "\n", ",", "7"]
    assert list(table["category"]) == ["word pieces", "whitespace/newline", "punctuation", "digits"]
    assert list(table["count"]) == [2, 2, 1, 1]
    np.testing.assert_allclose(table["loss_a"], [3.0, 1.0, 2.0, 1.0])
    np.testing.assert_allclose(table["loss_b"], [3.5, 2.5, 1.0, 1.5])
    np.testing.assert_allclose(table["delta"], [0.5, 1.5, -1.0, 0.5])
    np.testing.assert_allclose(table["delta_sum"], [1.0, 3.0, -1.0, 0.5])


def test_category_breakdown_by_hand():
    table = token_loss_table(IDS, LOSS_A, LOSS_B, MASK, VOCAB)
    breakdown = category_breakdown(table)
    assert list(breakdown.columns) == CATEGORY_COLUMNS
    # Default order: whitespace/newline, punctuation, digits, then word pieces.
    assert list(breakdown["category"]) == [
        "whitespace/newline",
        "punctuation",
        "digits",
        "word pieces",
    ]
    assert list(breakdown["tokens"]) == [2, 1, 1, 2]
    np.testing.assert_allclose(breakdown["share"], [2 / 6, 1 / 6, 1 / 6, 2 / 6])
    np.testing.assert_allclose(breakdown["loss_a"], [1.0, 2.0, 1.0, 3.0])
    np.testing.assert_allclose(breakdown["loss_b"], [2.5, 1.0, 1.5, 3.5])
    np.testing.assert_allclose(breakdown["mean_delta"], [1.5, -1.0, 0.5, 0.5])
    np.testing.assert_allclose(breakdown["delta_sum"], [3.0, -1.0, 0.5, 1.0])
    # Rising ids add 3.0 ("\n") + 0.5 ("7") + 1.0 ("a") = 4.5; "," fell and does not offset.
    np.testing.assert_allclose(breakdown["share_of_increase"], [3 / 4.5, 0.0, 0.5 / 4.5, 1 / 4.5])
    assert breakdown["share_of_increase"].sum() == pytest.approx(1.0)


def test_top_risers_by_hand():
    table = token_loss_table(IDS, LOSS_A, LOSS_B, MASK, VOCAB)
    assert list(top_risers(table, 10)["token_id"]) == [1, 0, 3]  # by added loss 3.0, 1.0, 0.5
    assert list(top_risers(table, 2)["token_id"]) == [1, 0]
    # By mean rise: 1.5, then a tie at 0.5 broken by token id.
    assert list(top_risers(table, 10, by="delta")["token_id"]) == [1, 0, 3]
    with pytest.raises(ValueError, match="by must be"):
        top_risers(table, by="loss")


def test_diagnose_by_hand_and_ragged_rows_agree():
    d = diagnose(IDS, LOSS_A, LOSS_B, MASK, VOCAB, top=2)
    assert (d.n_rows, d.n_tokens) == (2, 6)
    assert d.loss_a == pytest.approx(11 / 6)  # 1 + 2 + 1 + 2 + 1 + 4
    assert d.loss_b == pytest.approx(14.5 / 6)  # 2 + 1 + 1.5 + 3 + 3 + 4
    assert d.perplexity_a == pytest.approx(math.exp(11 / 6))
    assert d.perplexity_b == pytest.approx(math.exp(14.5 / 6))
    assert list(d.risers["token_id"]) == [1, 0]
    # The same positions as ragged rows (different lengths, no padding).
    ragged = diagnose(
        [IDS[0, 1:], IDS[1, :3]],
        [LOSS_A[0, 1:], LOSS_A[1, :3]],
        [LOSS_B[0, 1:], LOSS_B[1, :3]],
        [np.ones(3, bool), np.ones(3, bool)],
        VOCAB,
    )
    pd.testing.assert_frame_equal(ragged.categories, d.categories)
    assert json.loads(json.dumps(d.summary()))["tokens"] == 6


def test_nothing_rose_gives_nan_shares_and_no_risers():
    table = token_loss_table(IDS, LOSS_B, LOSS_A, MASK, VOCAB)  # swapped: "," rises only
    table = table[table["token_id"] != 2]
    breakdown = category_breakdown(table)
    assert breakdown["share_of_increase"].isna().all()
    assert top_risers(table).empty


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        token_loss_table(IDS, LOSS_A, LOSS_B[:, :3], MASK, VOCAB)


def test_custom_categories_and_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("a,\n7", add_special_tokens=False)["input_ids"] + [
        tiny_tokenizer.eos_token_id
    ]
    ones = np.ones(len(ids))
    table = token_loss_table([ids], [ones], [ones], [np.ones(len(ids), bool)], tiny_tokenizer)
    assert dict(zip(table["token"], table["category"])) == {
        "a": "word pieces",
        ",": "punctuation",
        "\n": "whitespace/newline",
        "7": "digits",
        "<eos>": SPECIAL,
    }
    custom = {"letters": r"[a-z]+"}
    table = token_loss_table(
        [ids], [ones], [ones], [np.ones(len(ids), bool)], tiny_tokenizer, categories=custom
    )
    assert list(category_breakdown(table, custom)["category"]) == ["letters", FALLBACK, SPECIAL]


# --------------------------------------------------------------------------- two evaluations


def _eval_frame(ids, losses, mask):
    return pd.DataFrame({"token_ids": ids, "token_losses": losses, "token_mask": mask})


def test_compare_evals_ignores_padding_and_checks_tokens():
    a = _eval_frame(list(IDS), list(LOSS_A), list(MASK))
    # B was batched differently: row 0 carries two more padding positions.
    pad = lambda row, value: np.concatenate([row, [value, value]])  # noqa: E731
    b = _eval_frame(
        [pad(IDS[0], 9), IDS[1]],
        [pad(LOSS_B[0], 0.0), LOSS_B[1]],
        [pad(MASK[0], False), MASK[1]],
    )
    d = compare_evals(a, b, VOCAB)
    expected = diagnose(IDS, LOSS_A, LOSS_B, MASK, VOCAB)
    pd.testing.assert_frame_equal(d.categories, expected.categories)
    other = b.copy()
    other.at[1, "token_ids"] = np.array([3, 1, 0, 9])
    with pytest.raises(DataError, match="row 2: the two evaluations scored different tokens"):
        compare_evals(a, other, VOCAB)
    with pytest.raises(DataError, match="missing per-token column"):
        compare_evals(a, b.drop(columns="token_mask"), VOCAB)


def test_diagnose_generation_reads_two_eval_files(tmp_path, tiny_models):
    ids = np.array([[4, 5, 6], [6, 5, 4]])
    mask = np.ones_like(ids, dtype=bool)
    for gen, losses in ((0, [[1.0, 1.0, 1.0]] * 2), (1, [[1.0, 2.0, 1.0]] * 2)):
        directory = tmp_path / f"gen_{gen:02d}"
        directory.mkdir()
        _eval_frame(list(ids), list(np.array(losses)), list(mask)).to_parquet(
            directory / "eval.parquet"
        )
    (tmp_path / "gen_01" / "model").symlink_to(tiny_models["a"])
    d = diagnose_generation(tmp_path / "gen_00", tmp_path / "gen_01")
    assert d.n_tokens == 6
    assert d.tokens.set_index("token_id").loc[5, "delta_sum"] == pytest.approx(2.0)
    with pytest.raises(DataError, match="not been evaluated"):
        diagnose_generation(tmp_path / "gen_00", tmp_path / "gen_02")


# --------------------------------------------------------------------------- embeddings


def test_mean_embedding_cosine_on_constructed_vectors():
    assert mean_embedding_cosine([[1, 0], [2, 0]], [[0, 3]]) == pytest.approx(0.0)
    # Rows are unit-scaled first: the centroid of (1,0) and (0,5) points at 45 degrees.
    assert mean_embedding_cosine([[1, 0], [0, 5]], [[2, 2]]) == pytest.approx(1.0)
    assert mean_embedding_cosine([[1, 0]], [[1, 1]]) == pytest.approx(1 / math.sqrt(2))
    assert mean_embedding_cosine([[1, 0]], [[-3, 0]]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="widths differ"):
        mean_embedding_cosine([[1, 0]], [[1, 0, 0]])
    with pytest.raises(ValueError, match="non-empty"):
        mean_embedding_cosine(np.zeros((0, 2)), [[1, 0]])


def test_embedding_mmd_on_constructed_vectors():
    # Two points at 0 against two at 1, bandwidth 1: 1 + 1 - 2 exp(-1/2).
    assert embedding_mmd([[0.0], [0.0]], [[1.0], [1.0]], bandwidth=1.0) == pytest.approx(
        2 - 2 * math.exp(-0.5)
    )
    # The same two points on both sides: the unbiased estimate is exp(-1/2) - 1 (below 0).
    same = [[0.0], [1.0]]
    assert embedding_mmd(same, same, bandwidth=1.0) == pytest.approx(math.exp(-0.5) - 1)
    # Median heuristic: pooled distances 3, 4, 3, 4, 1 (the zero pair excluded) -> 3.
    assert median_bandwidth([[0.0], [0.0]], [[3.0], [4.0]]) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        embedding_mmd([[0.0]], [[1.0], [2.0]])


def test_embedding_mmd_separates_shifted_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    shifted = rng.normal(size=(150, 8)) + 1.0
    width = median_bandwidth(a, b)
    same = embedding_mmd(a, b, bandwidth=width)
    different = embedding_mmd(a, shifted, bandwidth=width)
    assert abs(same) < 0.01
    assert different > 10 * max(abs(same), 1e-3)


# --------------------------------------------------------------------------- two real models

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,\n"


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from pipeline.model import build_char_tokenizer

    return build_char_tokenizer(ALPHABET)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """Two tiny GPT-2s over one character vocabulary (seeds 0 and 1), one over another."""
    from pipeline.config import ModelConfig
    from pipeline.model import build_char_tokenizer, build_tiny_model, save_model

    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, max_length=48)
    root = tmp_path_factory.mktemp("diagnose_models")
    dirs = {}
    for name, tokenizer, seed in (
        ("a", tiny_tokenizer, 0),
        ("b", tiny_tokenizer, 1),
        ("other_vocab", build_char_tokenizer("xyz"), 0),
    ):
        save_model(build_tiny_model(cfg, tokenizer, seed), tokenizer, root / name)
        dirs[name] = str(root / name)
    return dirs


EXAMPLES = pd.DataFrame(
    {"prompt": ["12+3=", "", "ab"], "response": ["15", "hello, world.\n", " cd"]}
)


def test_compare_models_matches_independent_scoring(tiny_models):
    from pipeline.model import example_losses, load_model

    d = compare_models(
        tiny_models["a"], tiny_models["b"], EXAMPLES, max_length=48, add_eos=True, batch_size=2
    )
    assert d.n_rows == 3
    assert d.n_tokens == 2 + 14 + 3 + 3  # response characters plus one <eos> per row
    for path, ppl in ((tiny_models["a"], d.perplexity_a), (tiny_models["b"], d.perplexity_b)):
        model, tokenizer = load_model(path)
        mean, counts = example_losses(
            model,
            tokenizer,
            EXAMPLES["prompt"],
            EXAMPLES["response"],
            max_length=48,
            add_eos=True,
            batch_size=8,
        )
        assert ppl == pytest.approx(math.exp((mean * counts).sum() / counts.sum()), rel=1e-5)
    assert d.categories["tokens"].sum() == d.n_tokens
    assert set(d.categories["category"]) <= {
        "whitespace/newline",
        "punctuation",
        "digits",
        "word pieces",
        "special",
    }


def test_compare_models_with_itself_changes_nothing(tiny_models):
    d = compare_models(
        tiny_models["a"], tiny_models["a"], EXAMPLES, max_length=48, add_eos=False, batch_size=8
    )
    assert d.perplexity_a == pytest.approx(d.perplexity_b)
    assert np.allclose(d.tokens["delta"], 0.0)
    assert d.risers.empty


def test_compare_models_refuses_bad_models(tiny_models, tmp_path):
    common = dict(max_length=48, add_eos=True, batch_size=8)
    with pytest.raises(DataError, match="different tokenizers"):
        compare_models(tiny_models["a"], tiny_models["other_vocab"], EXAMPLES, **common)
    with pytest.raises(DataError, match="model directory not found"):
        compare_models(tiny_models["a"], str(tmp_path / "nope"), EXAMPLES, **common)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        compare_models(str(tmp_path / "empty"), tiny_models["a"], EXAMPLES, **common)
    long = pd.DataFrame({"prompt": [""], "response": ["a" * 60]})
    with pytest.raises(DataError, match="at most 48 tokens"):
        compare_models(tiny_models["a"], tiny_models["b"], long, **{**common, "max_length": 100})


# --------------------------------------------------------------------------- genloop diagnose


def _argv(model_a, model_b, data, out, *settings) -> list[str]:
    models = ["--model", str(model_a), "--model", str(model_b)]
    return ["diagnose", *models, "--data", str(data), "--out", str(out), *settings]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("the quick brown fox, 42 times.\njumps over the lazy dog.\n" * 6)
    return path


def test_diagnose_cli_on_text(tiny_models, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    settings = "--limit 5 max_length=40 batch_size=4 chunk_chars=28".split()
    code = main(_argv(tiny_models["a"], tiny_models["b"], text_file, out, *settings))
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "perplexity A -> B:" in printed
    assert "by token category:" in printed and "whitespace/newline" in printed
    assert "5 text chunks of 28 characters (of 12)" in printed
    categories = pd.read_parquet(out / "categories.parquet")
    assert list(categories.columns) == CATEGORY_COLUMNS
    assert categories["tokens"].sum() == 5 * 28  # five chunks, no <eos> for text
    assert len(pd.read_parquet(out / "tokens.parquet")) > 5
    assert (out / "categories.png").read_bytes().startswith(PNG)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == 140 and summary["add_eos"] is False


def test_diagnose_cli_on_jsonl_with_field_names(tiny_models, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    settings = ["fields.prompt=question", "fields.response=answer", "max_length=16"]
    code = main(_argv(tiny_models["a"], tiny_models["b"], data, out, *settings))
    assert code == 0, capsys.readouterr().err
    assert "6 prompt/response pairs" in capsys.readouterr().out
    digits = pd.read_parquet(out / "categories.parquet").set_index("category")
    # Answers 0, 2, ..., 10: seven digit tokens; six <eos>.
    assert digits.loc["digits", "tokens"] == 7 and digits.loc["special", "tokens"] == 6


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing data", "file not found"),
        ("missing model", "model directory not found"),
        ("tokenizer mismatch", "different tokenizers"),
        ("one model", "give --model exactly twice"),
        ("unknown setting", "unknown setting 'max_len'"),
        ("bad value", "max_length: expected a positive integer"),
        ("no usable column", "needs prompt and response columns, or a text column"),
    ],
)
def test_diagnose_cli_bad_input_exits_2(case, message, tiny_models, text_file, tmp_path, capsys):
    a, b, data, extra = tiny_models["a"], tiny_models["b"], str(text_file), []
    if case == "missing data":
        data = str(tmp_path / "absent.txt")
    elif case == "missing model":
        b = str(tmp_path / "no_such_model")
    elif case == "tokenizer mismatch":
        b = tiny_models["other_vocab"]
    elif case == "unknown setting":
        extra = ["max_len=10"]
    elif case == "bad value":
        extra = ["max_length=-3"]
    elif case == "no usable column":
        data = str(tmp_path / "rows.jsonl")
        (tmp_path / "rows.jsonl").write_text('{"question": "q"}\n')
    argv = _argv(a, b, data, tmp_path / "o", *extra)
    if case == "one model":
        argv = argv[:1] + argv[3:]  # drop "--model A"
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_load_examples_limit_spreads_over_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    frame, description, pairs = load_examples(path, DiagnoseSettings(chunk_chars=6), limit=3)
    # "row 0\nrow 1\nrow 2" in chunks of 6: "row 0\n", "row 1\n", "row 2".
    assert list(frame["response"]) == ["row 0\n", "row 1\n", "row 2"] and not pairs
    frame, description, _ = load_examples(path, DiagnoseSettings(chunk_chars=2), limit=3)
    assert description == "3 text chunks of 2 characters (of 9)"
    assert list(frame["response"]) == ["ro", "w ", "2"]  # chunks 0, 4 and 8 of 9
