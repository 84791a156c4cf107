"""The selection study's pure parts: documents, draw orders, the weighted loss, summaries."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.selection_study import (
    OrderingStudy,
    SubsetStudy,
    draw_order,
    mixed_loss,
    ordering_documents,
    quick,
    subsets_summary,
)


@pytest.fixture
def corpora(tmp_path):
    text = tmp_path / "text.txt"
    letters = np.random.default_rng(0).integers(97, 123, size=20_000)
    text.write_text("".join(map(chr, letters)))
    rare = tmp_path / "rare.jsonl"
    rare.write_text("".join(f'{{"question": "q{i}?", "answer": "#### {i}"}}\n' for i in range(100)))
    return str(text), str(rare)


def test_ordering_documents_hold_out_unseen_text_at_the_ratio(corpora):
    text, rare = corpora
    study = OrderingStudy(
        text=text, rare=rare, doc_chars=100, common_docs=120, ratio=20, heldout_docs=10
    )
    docs, held = ordering_documents(study)
    assert (docs.part == "common").sum() == 120 and (docs.part == "rare").sum() == 6
    assert all(len(d) == 100 for d in docs.loc[docs.part == "common", "response"])
    # Held-out text comes from the last tenth of the corpus, never from training documents.
    assert not set(held["common"].response) & set(docs.response)
    assert not set(held["rare"].response) & set(docs.response)
    assert len(held["common"]) == 10 and len(held["rare"]) == 10
    from pipeline.data import DataError

    with pytest.raises(DataError, match="too small for 5000"):
        ordering_documents(OrderingStudy(text=text, rare=rare, doc_chars=100, common_docs=5000))


def test_draw_orders_spend_the_same_draws_differently():
    labels = np.array([0] * 90 + [1] * 10)  # one large, one small cluster
    n = 4 * len(labels)
    random = draw_order("random", labels, n, 4, seed=0)
    assert (np.bincount(random, minlength=100) == 4).all()  # 4 plain epochs
    balanced = draw_order("balanced", labels, n, 4, seed=0)
    clipped = draw_order("clusterclip-6", labels, n, 4, seed=0)
    assert len(balanced) == len(clipped) == n
    small = labels == 1
    # Balanced sampling gives the small cluster half of the draws: ~20 per document.
    assert 0.4 < small[balanced].mean() < 0.6
    # The clip caps each document at 6 draws, so the small cluster runs dry early.
    assert np.bincount(clipped, minlength=100).max() <= 6
    assert small[clipped].sum() == 60 and small[clipped[n // 2 :]].sum() == 0
    with pytest.raises(ValueError, match="unknown order"):
        draw_order("sorted", labels, n, 4, seed=0)


def test_mixed_loss_weights_the_parts_by_their_training_tokens():
    docs = pd.DataFrame(
        {"response": ["x" * 100] * 20 + ["y" * 300], "part": ["common"] * 20 + ["rare"]}
    )
    result = {"common_loss": 1.0, "rare_loss": 4.0}
    # 20 common documents of 100 tokens for every rare one of 300: weights 2000 and 300.
    assert mixed_loss(result, 20, docs) == pytest.approx((2000 * 1.0 + 300 * 4.0) / 2300)


def test_subsets_summary_compares_each_method_with_random_and_full():
    rows = [dict(method="full", fraction=1.0, seed=0, heldout_loss=2.0)]
    rows += [dict(method="s2l", fraction=0.1, seed=0, heldout_loss=2.2)]
    rows += [
        dict(method="random", fraction=0.1, seed=s, heldout_loss=v)
        for s, v in enumerate([2.3, 2.5, 2.4])
    ]
    text = subsets_summary(pd.DataFrame(rows), SubsetStudy(), 400_000, 50_000)
    assert "| 0.1 | s2l | 2.2000 | 9.025 | -0.2000 | +0.2000 |" in text
    assert "| 0.1 | random | 2.4000 ± 0.1000 |" in text
    assert "8.0x smaller" in text


def test_quick_studies_keep_the_proxy_smaller_than_the_target():
    study = quick(SubsetStudy())
    assert study.proxy.n_embd * 4 <= study.target.n_embd and study.steps < 10
    assert quick(OrderingStudy()).epochs == 2


def test_a_missing_data_file_is_a_usage_error(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["selection-study", "subsets", "--out", str(tmp_path), "--data", "nope.jsonl"])
    assert code == 2
    assert "--data nope.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "cells").exists()  # nothing written for a bad command


def test_data_too_small_for_the_study_is_refused_before_ray_and_writes_nothing(tmp_path, capsys):
    import ray

    from pipeline.cli import main

    data = tmp_path / "small.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n' * 20)
    out = tmp_path / "study"
    code = main(["selection-study", "subsets", "--out", str(out), "--data", str(data), "--quick"])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"genloop: error: {data}: 20 rows, the study needs ")
        and err.count("\n") == 1
    )
    assert not ray.is_initialized() and not out.exists()


def test_subset_steps_are_equal_or_in_proportion_to_the_subset():
    from pipeline.selection_study import subset_steps

    assert subset_steps(SubsetStudy(steps=300), 240) == 300
    study = SubsetStudy(epochs=3)  # batch 16
    assert subset_steps(study, 2400) == 450 and subset_steps(study, 240) == 45
    assert subset_steps(study, 5) == 1


def test_ordering_summary_averages_the_seeds_of_each_order():
    from pipeline.selection_study import ordering_summary

    docs = pd.DataFrame({"response": ["x"] * 3, "part": ["common", "common", "rare"]})
    rows = [
        dict(
            order=o,
            seed=s,
            rare_loss=r,
            common_loss=1.0,
            overall_loss=1.5,
            rare_share_of_draws=0.1,
            rare_share_second_half=0.0,
            rare_draws_per_doc_max=m,
        )
        for o, s, r, m in [("random", 0, 2.0, 4), ("random", 1, 2.2, 5), ("balanced", 0, 1.8, 9)]
    ]
    text = ordering_summary(pd.DataFrame(rows), OrderingStudy(seeds=(0, 1)), docs)
    assert (
        "| random | 2.1000 ± 0.1414 | 1.0000 ± 0.0000 | 1.5000 ± 0.0000 | 0.100 | 0.000 | 5 |"
        in text
    )
    assert "| balanced | 1.8000 | 1.0000 | 1.5000 |" in text


def test_a_rerun_resumes_only_the_same_study(tmp_path, corpora):
    from pipeline.cli import UsageError
    from pipeline.selection_study import STUDY_FILE, check_rerun, study_settings

    text, rare = corpora
    settings = study_settings("ordering", quick(OrderingStudy(text=text, rare=rare)))
    out = tmp_path / "study"
    check_rerun(out, settings)  # nothing there yet
    out.mkdir()
    (out / STUDY_FILE).write_text(json.dumps(settings))
    (out / "cells").mkdir()
    check_rerun(out, settings)
    more_seeds = quick(OrderingStudy(text=text, rare=rare, seeds=(0, 1)))
    check_rerun(out, study_settings("ordering", more_seeds))  # more cells, same cells kept
    other = study_settings("ordering", quick(OrderingStudy(text=rare, rare=rare)))
    with pytest.raises(UsageError) as caught:
        check_rerun(out, other)
    assert str(caught.value) == (
        f"--out {out}: its study ran with text={text}, not {rare}; rerun it with the same "
        "settings to resume, or choose a new --out"
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty and holds no readable study.json"):
        check_rerun(tmp_path / "mine", settings)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["subsets", "--text", "t.txt"], "--text: for the ordering study"),
        (["ordering", "--data", "d.jsonl"], "--data: for the subsets study"),
        (["ordering", "--seeds", ""], "--seeds '': expected integers like 0,1,2"),
    ],
)
def test_flags_of_the_other_study_or_empty_seeds_are_refused(tmp_path, capsys, argv, says):
    from pipeline.cli import main

    assert main(["selection-study", *argv, "--out", str(tmp_path / "s")]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
