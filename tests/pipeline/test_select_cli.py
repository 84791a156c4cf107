"""`genloop select`: argument checks, outputs, and features computed on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.select_cmd import parse_options, select_frame

N_ROWS = 30


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pairs(tmp_path) -> Path:
    rows = [
        {"prompt": f"{i}+{i}=", "response": str(2 * i), "id": i, "meta": {"source": "x/y"}}
        for i in range(N_ROWS)
    ]
    return _write_jsonl(tmp_path / "pairs.jsonl", rows)


def _select(data: Path, out: Path, method: str, budget: str, *extra: str) -> int:
    argv = ["select", "--data", str(data), "--method", method, "--budget", budget]
    return main([*argv, "--out", str(out), *extra])


# --------------------------------------------------------------------------- fast, no Ray


def test_random_to_jsonl_keeps_every_column(pairs, tmp_path, capsys):
    out = tmp_path / "subset.jsonl"
    assert _select(pairs, out, "random", "10") == 0
    rows = _read_jsonl(out)
    assert len(rows) == 10
    assert set(rows[0]) == {"prompt", "response", "id", "meta", "cluster", "selection_reason"}
    assert len({row["id"] for row in rows}) == 10
    for row in rows:
        assert (
            row["response"] == str(2 * row["id"]) and row["prompt"] == f"{row['id']}+{row['id']}="
        )
        assert row["cluster"] == -1 and row["selection_reason"] == "random"
        assert row["meta"] == {"source": "x/y"}
    assert '"x/y"' in out.read_text()  # written as people type it, not "x\/y"
    printed = capsys.readouterr().out
    assert "random" in printed and f"{N_ROWS} rows in" in printed
    assert f"{N_ROWS} in -> 10 out" in printed and str(out) in printed


def test_random_to_parquet_with_a_fraction_is_seeded(pairs, tmp_path):
    first, again, other = (tmp_path / f"{name}.parquet" for name in ("a", "b", "c"))
    assert _select(pairs, first, "random", "0.5", "--seed", "3") == 0
    assert _select(pairs, again, "random", "0.5", "--seed", "3") == 0
    assert _select(pairs, other, "random", "0.5", "--seed", "4") == 0
    a, b, c = (pd.read_parquet(p) for p in (first, again, other))
    assert len(a) == 15 and list(a.columns[-2:]) == ["cluster", "selection_reason"]
    assert a["id"].tolist() == b["id"].tolist() != c["id"].tolist()
    assert a["id"].is_unique


def test_the_data_file_is_never_the_output(pairs, capsys):
    before = pairs.read_bytes()
    assert _select(pairs, pairs.parent / "." / pairs.name, "random", "5") == 2
    assert "is the --data file; write the selection elsewhere" in capsys.readouterr().err
    assert pairs.read_bytes() == before


def test_field_mapping_writes_the_files_own_column_names(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(12)]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "qa_subset.jsonl"
    assert (
        _select(data, out, "random", "1.0", "fields.prompt=question", "fields.response=answer") == 0
    )
    written = _read_jsonl(out)
    assert len(written) == 12
    assert set(written[0]) == {"question", "answer", "cluster", "selection_reason"}


def test_a_text_column_is_enough(tmp_path):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"content": f"line {i}"} for i in range(8)])
    out = tmp_path / "text_subset.parquet"
    assert _select(data, out, "random", "3", "fields.text=content") == 0
    assert pd.read_parquet(out).columns.tolist() == ["content", "cluster", "selection_reason"]


@pytest.mark.parametrize("budget", ["0", "-1", str(N_ROWS + 1), "1.5", "ten"])
def test_a_bad_budget_is_one_line_and_exit_2(pairs, tmp_path, capsys, budget):
    out = tmp_path / "never.jsonl"
    assert _select(pairs, out, "random", budget) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genloop: error: --budget") and "\n" not in err
    assert not out.exists()


def test_budget_errors_say_what_is_valid(pairs, tmp_path, capsys):
    _select(pairs, tmp_path / "o.jsonl", "random", "31")
    assert f"[1, {N_ROWS}]" in capsys.readouterr().err
    _select(pairs, tmp_path / "o.jsonl", "random", "1.5")
    assert "for a count, pass an int" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method, data, extra, message",
    [
        ("nope", "pairs", [], "unknown method 'nope'; valid: random, s2l, clusterclip"),
        ("random", "missing", [], "missing.jsonl: file not found"),
        ("random", "qa", [], "needs prompt and response columns (or text); it has question"),
        ("random", "pairs", ["n_clusters=4"], "unknown key 'n_clusters' for method 'random'"),
        ("clusterclip", "pairs", ["max_repeats=0"], "max_repeats: must be >= 1, got 0"),
        ("semdedup-random", "pairs", ["threshold=2"], "threshold: must be in (0, 1], got 2"),
        ("s2l", "pairs", ["train.lr=-1"], "train.lr: must be > 0"),
        ("s2l", "pairs", ["proxy.n_layer=two"], "proxy.n_layer: expected an integer"),
        ("loss-lowest", "pairs", ["model=./no/such/dir"], "no such model directory"),
    ],
)
def test_mistakes_exit_2_with_the_reason(tmp_path, pairs, capsys, method, data, extra, message):
    files = {
        "pairs": pairs,
        "missing": tmp_path / "missing.jsonl",
        "qa": _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]),
    }
    assert _select(files[data], tmp_path / "o.jsonl", method, "2", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        parse_options("clusterclip", ["clusters=4"])
    assert "valid keys: batch_size, embedding_model, fields.prompt" in str(e.value)
    assert "max_repeats, n_clusters, n_iter" in str(e.value)


def test_a_wrong_output_suffix_is_refused(pairs, tmp_path, capsys):
    assert _select(pairs, tmp_path / "subset.csv", "random", "2") == 2
    assert "use .parquet or .jsonl" in capsys.readouterr().err


def test_select_frame_uses_given_features():
    frame = pd.DataFrame({"prompt": list("abcdef"), "response": list("uvwxyz")})
    losses = np.array([0.5, 3.0, 0.1, 2.0, np.nan, 1.0])
    chosen = select_frame(frame, "loss-highest", 2, losses=losses)
    assert chosen["prompt"].tolist() == ["b", "d"]
    assert chosen["selection_reason"].str.startswith("loss-highest: loss 3").iloc[0]
    with pytest.raises(ValueError, match="needs losses"):
        select_frame(frame, "loss-highest", 2)


# --------------------------------------------------------------------------- real Ray


@pytest.fixture
def gsm8k_100(gsm8k, tmp_path) -> Path:
    path = tmp_path / "gsm8k_100.jsonl"
    with gsm8k.open() as f:
        path.write_text("".join(next(f) for _ in range(100)))
    return path


def test_clusterclip_with_shipped_minilm_embeddings(ray_local, gsm8k_100, tmp_path, capsys):
    out = tmp_path / "clusterclip.parquet"
    fields = ["fields.prompt=question", "fields.response=answer"]
    options = [*fields, "n_clusters=5", "workers=1"]
    assert _select(gsm8k_100, out, "clusterclip", "20", *options) == 0
    chosen = pd.read_parquet(out)
    source = pd.read_json(gsm8k_100, lines=True)
    assert len(chosen) == 20 and chosen["question"].is_unique
    assert set(chosen["question"]) <= set(source["question"])
    assert chosen.columns.tolist() == ["question", "answer", "cluster", "selection_reason"]
    assert set(chosen["cluster"]) <= set(range(5)) and chosen["cluster"].nunique() >= 3
    assert chosen["selection_reason"].str.match(r"clusterclip: cluster \d \(size \d+\)").all()
    printed = capsys.readouterr().out
    assert "embeddings: 100 x 384" in printed and "clusters: 5" in printed
    assert ray_local.is_initialized()  # a Ray the command did not start is left running


def test_embed_texts_matches_the_encoder_row_by_row(ray_local):
    from pipeline.embed import EmbedActor, default_embedding_model, embed_here, embed_texts

    texts = ["a much longer sentence about clips sold in April and May", "hi", "", "two words"]
    embeddings = embed_texts(texts, model=None, workers=1, batch_size=2)
    actor = EmbedActor(default_embedding_model(), batch_size=8, use_gpu=False)
    expected = np.stack(actor(pd.DataFrame({"text": texts}))["embedding"].tolist())
    assert embeddings.shape == (4, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)  # same rows, same order
    np.testing.assert_allclose(embed_here(texts), expected, atol=1e-5)  # in this process


@pytest.mark.slow
def test_s2l_with_a_tiny_proxy(ray_local, gsm8k_100, tmp_path, capsys):
    out = tmp_path / "s2l.jsonl"
    options = [
        "fields.prompt=question",
        "fields.response=answer",
        "n_clusters=4",
        "checkpoints=2",
        "steps=20",
        "proxy.n_layer=1",
        "proxy.n_embd=32",
        "proxy.n_head=2",
        "train.workers=1",
        "train.batch_size=16",
        "workers=1",
    ]
    assert _select(gsm8k_100, out, "s2l", "0.2", *options) == 0
    chosen = _read_jsonl(out)
    assert len(chosen) == 20 and len({row["question"] for row in chosen}) == 20
    assert all(row["selection_reason"].startswith("s2l:") for row in chosen)
    trajectories = pd.read_parquet(tmp_path / "s2l.select" / "trajectories.parquet")
    assert trajectories.columns.tolist() == ["row", "loss_ckpt_00", "loss_ckpt_01"]
    assert len(trajectories) == 100 and np.isfinite(trajectories.to_numpy()).all()
    # Training lowers the proxy's loss from the first checkpoint to the second.
    assert trajectories["loss_ckpt_01"].mean() < trajectories["loss_ckpt_00"].mean()
    # The last column is each row's own loss under the last checkpoint (rows not shuffled).
    from pipeline.model import example_losses, load_model

    proxy = json.loads((tmp_path / "s2l.select" / "proxy.json").read_text())
    model, tokenizer = load_model(proxy["checkpoints"][-1]["path"])
    source = pd.read_json(gsm8k_100, lines=True)
    expected, _ = example_losses(
        model,
        tokenizer,
        source["question"],
        source["answer"],
        max_length=proxy["max_length"],
        add_eos=True,
        batch_size=50,
    )
    np.testing.assert_allclose(trajectories["loss_ckpt_01"], expected, rtol=1e-4)
    printed = capsys.readouterr().out
    assert "checkpoint 2/2: step 40" in printed and "clusters: 4" in printed


@pytest.mark.slow
def test_s2l_on_fewer_rows_than_a_proxy_batch(ray_local, tmp_path, capsys):
    """6 rows against a proxy batch of 16 over 2 workers: the proxy trains on copies of them
    (it used to fail after the retries: each worker's shard was smaller than its batch)."""
    data = _write_jsonl(
        tmp_path / "six.jsonl", [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(6)]
    )
    out = tmp_path / "s2l.jsonl"
    options = ["n_clusters=2", "checkpoints=1", "steps=2", "train.workers=2", "train.batch_size=16"]
    assert _select(data, out, "s2l", "3", *options, "proxy.n_layer=1", "proxy.n_embd=32") == 0
    assert len(_read_jsonl(out)) == 3
    trajectories = pd.read_parquet(tmp_path / "s2l.select" / "trajectories.parquet")
    assert len(trajectories) == 6 and np.isfinite(trajectories["loss_ckpt_00"]).all()
    assert "checkpoint 1/1: step 2" in capsys.readouterr().out
