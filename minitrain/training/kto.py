"""KTO's data side: the mismatched prompt-completion pair of every labelled sample, a fixed function of the data.

KTO (Ethayarajh et al. 2024; TRL's KTOTrainer) estimates the KL term from prompts paired with completions written for
other prompts. TRL rotates the completions of each batch by one: (x_1, y_n), (x_2, y_1), ..., (x_n, y_(n-1)). Here
the batch of that rule is the whole file, so the pair is known before training and its reference log-prob is
computed once, offline (reference.py), and every step reads it, resumed ones too:

    the KL sequence of sample i = the prompt of i + the completion of partner(i)
    partner(i) = the nearest sample before i in file order (cyclically: the first one's is the last) whose prompt
                 differs from i's

With every prompt distinct, partner(i) = i - 1: TRL's rotation by one. Samples that share a prompt (several
completions of one prompt, next to each other in the file) borrow from before their run of samples, so that a KL
sequence is never a matched pair. A file whose samples all share one prompt has no mismatched pair: refused.

A sample's prompt is its tokens before its completion, which starts at its first token trained after the shift
(data.completion_start); the completion is every token from there on, with its labels (the KL sequence trains the
same tokens of it as its own sample does).
"""

import numpy as np

from minitrain.training.data import IGNORE, DataError, TokenCache


def kl_partners(cache: TokenCache, path: str = "") -> np.ndarray:
    """(num_samples,) int64: partner(i) of every labelled sample, from the prompt hashes of the cache. Equal hashes are
    taken as equal prompts, so a collision can only move a partner further back: never onto the same prompt."""
    hashes = np.asarray(cache.prompt_hashes)
    n = len(hashes)
    starts = np.flatnonzero(hashes != np.roll(hashes, 1))  # where a run of samples with one prompt starts (cyclic)
    if len(starts) == 0:
        what = "its only sample" if n == 1 else f"all {n} samples share one prompt"
        raise DataError(f"{path}: {what}, so no prompt can be paired with another prompt's completion for KTO's KL "
                        f"estimate; KTO needs samples of at least two prompts")
    # each sample's run start: the latest start at or before it; before the first start, the last (the runs wrap)
    run_start = starts[np.searchsorted(starts, np.arange(n), side="right") - 1]
    return (run_start - 1) % n


def kl_lengths(cache: TokenCache, partners: np.ndarray) -> np.ndarray:
    """Tokens of each KL sequence: the sample's prompt + its partner's completion."""
    prompts = np.asarray(cache.prompt_lengths)
    return prompts + (cache.lengths[partners] - prompts[partners])


def own_sequence(cache: TokenCache, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of labelled sample i as it is."""
    start, end = int(cache.offsets[i]), int(cache.offsets[i + 1])
    return cache.input_ids[start:end], cache.labels[start:end]


def kl_sequence(cache: TokenCache, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of sample i's prompt followed by sample j's completion, only the completion trained."""
    start, prompt = int(cache.offsets[i]), int(cache.prompt_lengths[i])
    begin, end = int(cache.offsets[j]) + int(cache.prompt_lengths[j]), int(cache.offsets[j + 1])
    ids = np.concatenate([cache.input_ids[start : start + prompt], cache.input_ids[begin:end]])
    labels = np.concatenate([np.full(prompt, IGNORE, dtype=np.int32), cache.labels[begin:end]])
    return ids, labels


def too_long(cache: TokenCache, partners: np.ndarray, path: str, max_tokens: int) -> DataError | None:
    """The first KL sequence longer than a row (--max-tokens-per-gpu), as an error naming both lines; else None."""
    lengths = kl_lengths(cache, partners)
    over = np.flatnonzero(lengths > max_tokens)
    if not len(over):
        return None
    i = int(over[0])
    return DataError(f"{path}:{cache.lines[i]}: KTO's KL sequence of this sample (its prompt + the completion of line "
                     f"{cache.lines[partners[i]]}) is {lengths[i]} tokens, longer than --max-tokens-per-gpu "
                     f"{max_tokens} ({len(over)} are); raise --max-tokens-per-gpu or re-run process_data.py with a "
                     f"smaller --max-sample-num-tokens")
