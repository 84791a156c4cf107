import numpy as np
import pytest

from pipeline.config import TaskConfig
from pipeline.data import DataError
from pipeline.tasks import arithmetic_answer, make_task


def test_arithmetic_answer_is_reversed_and_padded():
    assert arithmetic_answer(123, 45, 3) == "8610"  # 168 -> 0168 -> 8610
    assert arithmetic_answer(999, 999, 3) == "8991"  # 1998 reversed
    assert arithmetic_answer(0, 0, 3) == "0000"


def test_arithmetic_task_sizes_and_consistency():
    task = make_task(TaskConfig(seed_examples=50, heldout_prompts=20, validation_prompts=10), 0)
    assert (len(task.real), len(task.heldout), len(task.validation)) == (50, 20, 10)
    for prompt, response in zip(task.real["prompt"], task.real["response"]):
        a, b = prompt.rstrip("=").split("+")
        assert response == arithmetic_answer(int(a), int(b), 3)
    assert task.verifiable and task.max_new_tokens == 4


def test_pools_depend_on_seed_and_generation_only():
    cfg = TaskConfig(pool_prompts=30)
    a, b = make_task(cfg, 0), make_task(cfg, 0)
    assert a.prompt_pool(3).equals(b.prompt_pool(3))
    assert not a.prompt_pool(3).equals(a.prompt_pool(4))
    assert not a.prompt_pool(3).equals(make_task(cfg, 1).prompt_pool(3))
    assert a.heldout.equals(b.heldout)


def test_verifier_exact_match():
    task = make_task(TaskConfig(seed_examples=1, heldout_prompts=1), 0)
    assert task.verify(["8610", "8611", " 8610 "], ["8610"] * 3).tolist() == [True, False, True]


def test_text_task_on_shakespeare(shakespeare):
    cfg = TaskConfig(
        name="text", path=str(shakespeare), real_chars=20_000, heldout_limit=50, synthetic_chars=960
    )
    task = make_task(cfg, 0)
    assert len(task.real) == 20_000 // 128 and set(task.real["response"].str.len()) == {128}
    assert len(task.heldout) == 50 and (task.heldout["prompt"] == "").all()
    pool = task.prompt_pool(1)
    assert len(pool) == 10
    assert set(pool["prompt"].str.len()) == {32} and set(pool["reference"].str.len()) == {96}
    assert not task.verifiable
    # Held-out text never appears in the real training text.
    assert task.heldout["response"].iloc[0] not in task.real_text


def test_text_task_refuses_a_file_too_short_for_its_blocks(tmp_path):
    """3,000 characters passed the old check (20 blocks) and then held out no block at all,
    reported as "None: 30 characters"."""
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be\n" * 158)
    with pytest.raises(DataError) as error:
        make_task(TaskConfig(name="text", path=str(path)), 0)
    assert str(error.value) == (
        f"{path}: 3,002 characters; the text task needs at least 12,800 (100 blocks of "
        "task.block_chars, every 10th held out); lower task.block_chars"
    )
    assert len(make_task(TaskConfig(name="text", path=str(path), block_chars=30), 0).heldout)


def test_text_task_refuses_prompts_longer_than_its_training_text(tmp_path):
    """It used to fail in generation 1 with numpy's "high <= 0"."""
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be\n" * 158)
    cfg = TaskConfig(
        name="text", path=str(path), block_chars=8, prompt_chars=2000, continuation_chars=1000
    )
    with pytest.raises(DataError) as error:
        make_task(cfg, 0)
    assert str(error.value) == (
        f"{path}: 2,702 characters of training text, too few for one prompt: "
        "task.prompt_chars + task.continuation_chars is 3,000"
    )


def test_text_task_refuses_held_out_text_shorter_than_a_block(tmp_path, shakespeare):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij")
    with pytest.raises(DataError) as error:
        make_task(TaskConfig(name="text", path=str(shakespeare), heldout_path=str(short)), 0)
    assert str(error.value) == (
        f"{short}: 10 characters; held-out text needs at least one block of task.block_chars (128)"
    )


def test_pairs_task_loads_gsm8k_with_a_field_mapping(gsm8k):
    cfg = TaskConfig(
        name="pairs",
        path=str(gsm8k),
        verifier="final-number",
        fields={"prompt": "question", "response": "answer"},
        heldout_fraction=0.05,
        heldout_limit=100,
        pool_prompts=20,
    )
    task = make_task(cfg, 0)
    assert len(task.heldout) == 100
    assert len(task.real) == 7473 - round(0.05 * 7473)
    reference = task.real["response"].iloc[0]
    final = reference.rsplit("####", 1)[1].strip()
    assert task.verify(
        [f"so the answer is #### {final}", "#### -1"], [reference, reference]
    ).tolist() == [True, False]
    assert len(task.prompt_pool(1)) == 20
    # Generation 0's early stop checks its validation answers the same way (it used to
    # compare whole GSM8K solutions as text, so it almost never stopped).
    assert task.answer_check == "final-number"


def test_answers_match_by_final_number_or_exact_text():
    from pipeline.tasks import answers_match

    responses, references = ["so #### 1,234", " 1234 ", "#### 5"], ["#### 1234"] * 3
    assert answers_match(responses, references, "final-number").tolist() == [True, True, False]
    assert answers_match(responses, ["1234"] * 3, "exact").tolist() == [False, True, False]


def test_pairs_numbers_with_commas():
    cfg = TaskConfig(name="pairs", path="unused", verifier="final-number")
    from pipeline.tasks import _final_number

    assert _final_number("x #### 1,234") == "1234"
    assert _final_number("no number") is None
    assert np.all(cfg.heldout_fraction == 0.1)
