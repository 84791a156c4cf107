"""The smallest run that still goes through every stage of the loop (a 1-layer, 32-wide model
on a few hundred arithmetic examples), shared by the tests that run whole generations.
Later overrides win, so a test adds its own after these."""

TINY_RUN = [
    "task.seed_examples=200",
    "task.pool_prompts=48",
    "task.heldout_prompts=40",
    "task.validation_prompts=40",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.max_length=32",
    "loop.gen0_steps=30",
    "loop.gen0_target_accuracy=null",
    "train.steps=10",
    "train.batch_size=16",
    "train.lr=3e-3",
    "generate.batch_size=64",
    "eval.batch_size=40",
    "diagnostics.mix_embedding_rows=0",
]
