"""Models and tokenizers: build the tiny GPT-2, load any HF causal LM, encode, generate, score.

Plain torch + transformers, no Ray: the Ray actors and train workers in `pipeline/` call these.
Every model lives on disk as a Hugging Face directory (safetensors + tokenizer), so the tiny
model built from config and a user's `from_pretrained` model take exactly the same path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from pipeline.config import ModelConfig

IGNORE = -100  # label of a token that is not trained on (prompt, padding)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer over `alphabet`, made locally (nothing downloaded)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
        unk_token="<unk>",
    )


def build_tiny_model(cfg: ModelConfig, tokenizer, seed: int) -> GPT2LMHeadModel:
    """A small GPT-2-style causal LM from config, with seeded random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.max_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # GPT-2's tanh GELU as one fused torch kernel: the same function (within 3e-7) as
        # GPT-2's default "gelu_new", which takes five elementwise passes; forward passes of
        # the default model are ~20% faster with it, training steps ~10%.
        activation_function="gelu_pytorch_tanh",
    )
    return GPT2LMHeadModel(config)


def save_model(model, tokenizer, directory: str | Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off: a process loading models prints nothing."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
):
    """(model, tokenizer) from a local HF directory, a storage URI (copied to this machine's
    cache once, see `pipeline.storage`) or a hub id, in eval mode."""
    from pipeline.storage import localize

    path = localize(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
    )
    return model.to(device).eval(), tokenizer


def _start_ids(tokenizer) -> list[int]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if start is None else [start]


@dataclass
class Encoded:
    input_ids: np.ndarray  # (N, L) int64, right-padded
    attention_mask: np.ndarray  # (N, L) int64
    labels: np.ndarray  # (N, L) int64, IGNORE on prompt and padding


def encode_examples(tokenizer, prompts, responses, *, max_length: int, add_eos: bool) -> Encoded:
    """Tokenize (prompt, response) pairs for training or scoring: loss on the response only."""
    rows = tokenize_examples(tokenizer, prompts, responses, max_length=max_length, add_eos=add_eos)
    return pad_examples(rows, tokenizer.pad_token_id)


def tokenize_examples(
    tokenizer, prompts, responses, *, max_length: int, add_eos: bool
) -> list[tuple[list[int], int]]:
    """Each pair's token ids (start token, prompt, response, EOS), fitted into `max_length`,
    and the position where its response starts."""
    prompt_ids = _tokenize_each_once(tokenizer, prompts)
    response_ids = token_ids(tokenizer, responses)
    start, end = _start_ids(tokenizer), [tokenizer.eos_token_id] if add_eos else []
    rows = []
    for p, r in zip(prompt_ids, response_ids):
        p, r = _fit(p, r + end, max_length - len(start))
        rows.append((start + p + r, len(start) + len(p)))
    return rows


def pad_examples(rows: list[tuple[list[int], int]], pad_token_id: int) -> Encoded:
    """Rows of `tokenize_examples` as one right-padded batch, labels on the responses."""
    input_ids, attention = _right_padded([ids for ids, _ in rows], pad_token_id)
    labels = np.full(input_ids.shape, IGNORE, dtype=np.int64)
    for i, (ids, n_prompt) in enumerate(rows):
        labels[i, n_prompt : len(ids)] = ids[n_prompt:]
    return Encoded(input_ids, attention, labels)


def _tokenize_each_once(tokenizer, texts) -> list[list[int]]:
    """Token ids of every text; a text that repeats (a prompt's k samples) is tokenized once."""
    texts = list(texts)
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, token_ids(tokenizer, distinct)))
    return [ids[text] for text in texts]


def token_ids(tokenizer, texts) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`. A fast tokenizer's Rust
    backend is called directly when the wrapper would only convert its output: the wrapper's
    per-row conversion took 13-17% of the time of scoring the default task's rows."""
    texts = list(texts)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is not None
        and backend.padding is None
        and backend.truncation is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _fit(prompt: list[int], response: list[int], room: int) -> tuple[list[int], list[int]]:
    """Truncate a too-long pair: the prompt loses its start (keeping at most half the room
    when the response needs it), the response its end, so every row keeps response tokens."""
    if len(prompt) + len(response) <= room:
        return prompt, response
    keep = max(room - len(response), min(len(prompt), room // 2))
    prompt = prompt[len(prompt) - keep :] if keep > 0 else []
    return prompt, response[: room - len(prompt)]


@torch.no_grad()
def token_losses(model, encoded: Encoded, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token cross-entropy of every labeled token.

    Returns:
        (losses, mask), both (N, L-1): losses[i, j] is the loss of predicting token j+1 of row i;
        mask marks the positions that count (response tokens).
    """
    device = next(model.parameters()).device
    n, length = encoded.input_ids.shape
    losses = np.zeros((n, max(length - 1, 0)), dtype=np.float32)
    for lo in range(0, n, batch_size):
        ids = torch.from_numpy(encoded.input_ids[lo : lo + batch_size]).to(device)
        mask = torch.from_numpy(encoded.attention_mask[lo : lo + batch_size]).to(device)
        labels = torch.from_numpy(encoded.labels[lo : lo + batch_size]).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        losses[lo : lo + batch_size] = (ce * (targets != IGNORE)).cpu().numpy()
    return losses, encoded.labels[:, 1:] != IGNORE


def example_losses(
    model, tokenizer, prompts, responses, *, max_length: int, add_eos: bool, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mean response-token loss, number of response tokens) per example.

    When rows share their prompt (a generation's k samples of each prompt) and that is the
    cheaper plan (`sharing_is_cheaper`), each prompt runs through the model once and its
    responses continue from its KV cache (`shared_prompt_losses`). Otherwise the examples are
    scored whole, shortest first, `batch_size` at a time, so that each batch pads only to its
    own longest row (on GSM8K rows, 512 at a time in batches of 32: padding 14% -> 2%, 23%
    less time). With right padding and causal attention a row's losses do not depend on the
    rows beside it."""
    max_length = min(max_length, context_length(model) or max_length)
    rows = tokenize_examples(tokenizer, prompts, responses, max_length=max_length, add_eos=add_eos)
    shared = sharing_plan(model, rows, batch_size)
    if shared is not None:
        with contextlib.suppress(NoCacheToShare):
            return shared_prompt_losses(model, rows, shared, tokenizer.pad_token_id)
    order = np.argsort([len(ids) for ids, _ in rows], kind="stable")
    mean = np.full(len(rows), np.nan, dtype=np.float32)
    counts = np.zeros(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), batch_size):
        index = order[lo : lo + batch_size]
        encoded = pad_examples([rows[i] for i in index], tokenizer.pad_token_id)
        losses, mask = token_losses(model, encoded, batch_size)
        n = mask.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[index] = np.where(n > 0, losses.sum(axis=1) / np.maximum(n, 1), np.nan)
        counts[index] = n
    return mean, counts


def hidden_size(model) -> int | None:
    return getattr(model.config, "hidden_size", None)


def prompt_groups(rows: list[tuple[list[int], int]]) -> list[list[int]]:
    """Indices of the rows of `tokenize_examples` that share a prompt (the start token and the
    prompt as fitted), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n_prompt) in enumerate(rows):
        groups.setdefault(tuple(ids[:n_prompt]), []).append(i)
    return list(groups.values())


def shared_prompt_batches(
    rows: list[tuple[list[int], int]], batch_size: int
) -> list[list[list[int]]] | None:
    """Batches of prompt groups (at most `batch_size` rows each) for `shared_prompt_losses`,
    or None when no prompt is shared or a row has no prompt token to continue from."""
    if any(n_prompt == 0 for _, n_prompt in rows):
        return None
    groups = prompt_groups(rows)
    if len(groups) == len(rows):
        return None
    # Groups larger than a batch are split; similar prompt lengths share a batch.
    pieces = [g[lo : lo + batch_size] for g in groups for lo in range(0, len(g), batch_size)]
    pieces.sort(key=lambda g: (rows[g[0]][1], max(len(rows[i][0]) for i in g)))
    return _fill_batches(pieces, batch_size)


def sharing_plan(
    model, rows: list[tuple[list[int], int]], batch_size: int
) -> list[list[list[int]]] | None:
    """The batches `shared_prompt_losses` scores `rows` in, or None when they are scored whole:
    the model cannot continue from a KV cache (`cache_argument`), no prompt is shared, or
    `sharing_is_cheaper` says no."""
    if cache_argument(model) is None:
        return None
    batches = shared_prompt_batches(rows, batch_size)
    if batches is None or not sharing_is_cheaper(rows, batches, batch_size, hidden_size(model)):
        return None
    return batches


def sharing_is_cheaper(
    rows: list[tuple[list[int], int]], batches, batch_size: int, hidden: int | None
) -> bool:
    """Whether `batches` of shared prompts cost less than the rows scored whole.

    The cost of a plan: token slots through the model, padding included, plus query-key
    pairs of attention / (2 x `hidden`), about their FLOPs against a layer's matmuls. Sharing
    wins on short prompts and answers (the default task's rows: about 0.54x the cost). On long rows
    whose answers differ in length (GSM8K), padding every answer to its batch's longest and
    attending over padded prompts costs more than running each prompt k times."""
    per_pair = 1.0 / (2 * (hidden or 1024))
    shared = 0.0
    for batch in batches:
        prompt = max(rows[g[0]][1] for g in batch)
        response = max(len(rows[i][0]) - rows[i][1] for g in batch for i in g)
        n = sum(len(g) for g in batch)
        shared += len(batch) * prompt + n * response
        shared += per_pair * (len(batch) * prompt**2 / 2 + n * response * (prompt + response))
    lengths = np.sort([len(ids) for ids, _ in rows])
    whole = 0.0
    for lo in range(0, len(lengths), batch_size):
        batch = lengths[lo : lo + batch_size]
        whole += len(batch) * batch[-1] + per_pair * len(batch) * batch[-1] ** 2 / 2
    return shared < whole


def shared_prompt_tokens(rows: list[tuple[list[int], int]], batches) -> int:
    """Tokens (no padding) that `shared_prompt_losses` puts through the model."""
    return sum(
        rows[g[0]][1] + sum(len(rows[i][0]) - rows[i][1] for i in g) for b in batches for g in b
    )


class NoCacheToShare(Exception):
    """The model cannot continue from a KV cache (its forward takes none at given positions,
    or returned none: older remote code): score rows whole."""


def cache_argument(model) -> str | None:
    """The keyword the model's forward takes a KV cache under, when it can continue from one
    at given positions: `cache` (recent transformers; 5.25 warns at `past_key_values`, and
    5.40 drops it) or `past_key_values` (before); None when it cannot."""
    import inspect

    accepts = inspect.signature(model.forward).parameters
    if "position_ids" not in accepts:
        return None
    return next((name for name in ("cache", "past_key_values") if name in accepts), None)


@torch.no_grad()
def shared_prompt_losses(
    model, rows: list[tuple[list[int], int]], batches: list[list[list[int]]], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """`example_losses` of rows grouped by shared prompt: each batch runs its prompts once
    (right-padded, keeping the KV cache), then every row's response continues from its
    prompt's cache. A response's first token is scored by its prompt's last logits. The
    losses are the full-sequence ones (within float rounding: 1e-6 on the default model)."""
    from transformers.cache_utils import Cache

    cache_keyword = cache_argument(model)
    if cache_keyword is None:
        raise NoCacheToShare(type(model).__name__)
    device = next(model.parameters()).device
    mean = np.full(len(rows), np.nan, dtype=np.float32)
    counts = np.zeros(len(rows), dtype=np.int64)
    for batch in batches:
        prompts = [rows[g[0]][0][: rows[g[0]][1]] for g in batch]
        owner = np.repeat(np.arange(len(batch)), [len(g) for g in batch])
        members = [i for g in batch for i in g]
        responses = [rows[i][0][rows[i][1] :] for i in members]
        prompt_ids, prompt_mask = _right_padded(prompts, pad_id)
        response_ids, response_mask = _right_padded(responses, pad_id)
        prompt_lengths = prompt_mask.sum(axis=1)
        to = dict(device=device)
        out = model(
            input_ids=torch.from_numpy(prompt_ids).to(**to),
            attention_mask=torch.from_numpy(prompt_mask).to(**to),
            use_cache=True,
        )
        cache = out.get(cache_keyword)  # the output names it as the forward does
        if not isinstance(cache, Cache):
            raise NoCacheToShare(type(model).__name__)
        owner_t = torch.from_numpy(owner).to(**to)
        cache.reorder_cache(owner_t)
        last = torch.from_numpy(prompt_lengths - 1).to(**to)
        first_logits = out.logits[torch.arange(len(batch), **to), last][owner_t]
        width = response_ids.shape[1]
        # Padding takes position 0: it is masked, and a position past the context would fail.
        positions = (prompt_lengths[owner][:, None] + np.arange(width)[None, :]) * response_mask
        logits = model(
            input_ids=torch.from_numpy(response_ids).to(**to),
            attention_mask=torch.from_numpy(
                np.concatenate([prompt_mask[owner], response_mask], axis=1)
            ).to(**to),
            position_ids=torch.from_numpy(positions).to(**to),
            use_cache=False,
            **{cache_keyword: cache},
        ).logits
        logits = torch.cat([first_logits[:, None], logits[:, :-1]], dim=1).float()
        targets = torch.from_numpy(response_ids).to(**to)
        keep = torch.from_numpy(response_mask).to(**to)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * keep
        n = response_mask.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[members] = np.where(n > 0, ce.sum(dim=1).cpu().numpy() / np.maximum(n, 1), np.nan)
        counts[members] = n
    return mean, counts


def _fill_batches(pieces: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive groups, packed into batches of at most `batch_size` rows."""
    batches, current, size = [], [], 0
    for piece in pieces:
        if current and size + len(piece) > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    return batches + [current] if current else batches


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids right-padded to the longest (at least 1 wide), and their attention mask."""
    width = max(1, max((len(s) for s in sequences), default=1))
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts,
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    greedy: bool,
    batch_size: int,
    max_length: int,
    synced_gpus: bool = False,
) -> list[str]:
    """Sample answers with the KV cache, batched; returns len(prompts) * k strings, prompt-major."""
    device = next(model.parameters()).device
    encoded, budget = prompt_ids_and_budget(
        tokenizer, prompts, max_new_tokens, min(max_length, context_length(model) or max_length)
    )
    k = 1 if greedy else samples_per_prompt
    out: list[str] = []
    for lo in range(0, len(encoded), batch_size):
        batch = encoded[lo : lo + batch_size]
        width = max(len(e) for e in batch)
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor(
            [[tokenizer.pad_token_id] * (width - len(e)) + e for e in batch], device=device
        )
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in batch], device=device)
        sampling = (
            dict(do_sample=False)
            if greedy
            else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        )
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=budget,
            use_cache=True,
            num_return_sequences=k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
            **sampling,
        )
        new_tokens = generated[:, width:].cpu().numpy()
        out.extend(decode_until_eos(tokenizer, new_tokens))
    if greedy and samples_per_prompt > 1:
        out = [text for text in out for _ in range(samples_per_prompt)]
    return out


def prompt_ids_and_budget(
    tokenizer, prompts, max_new_tokens: int, max_length: int
) -> tuple[list[list[int]], int]:
    """The token ids each prompt is generated from (the start token, then the prompt; new
    tokens get at least half of `max_length`, so a longer prompt keeps its end) and the
    number of new tokens every prompt of the call may sample."""
    start = _start_ids(tokenizer)
    keep = max_length - max(1, min(max_new_tokens, max_length // 2))
    encoded = [
        (start + ids)[-keep:]
        for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ]
    budget = max(1, min(max_new_tokens, max_length - max((len(e) for e in encoded), default=0)))
    return encoded, budget


def context_length(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says
    (`model`: a model, or its config alone)."""
    config = getattr(model, "config", model)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decode_until_eos(tokenizer, rows) -> list[str]:
    """Each row of new token ids as text, up to its first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    texts = []
    for row in rows:
        row = np.asarray(row, dtype=np.int64)
        stop = np.flatnonzero(row == eos)
        row = row[: stop[0]] if len(stop) else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts
