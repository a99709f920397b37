"""Text in and out: prompts to token ids (checked against the context), and generated ids back to text."""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from .errors import InvalidInput
from .types import GenerationParams

log = logging.getLogger(__name__)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the base's chat template, ending with the assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a generation prompt: a user message in the base's chat template when it has one."""
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


class InputEncoder:
    """Encodes requests for one base and refuses what its context cannot hold (422 naming the input)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_context: int, base_name: str):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.base_name = base_name

    def _check_lengths(self, lengths: list[int], extra: int, field: str) -> None:
        for i, length in enumerate(lengths):
            if length == 0:
                raise InvalidInput(f"{field}[{i}]", "input is empty")
            if length + extra > self.max_context:
                more = f" + {extra} new tokens" if extra else ""
                raise InvalidInput(
                    f"{field}[{i}]", f"input has {length} tokens{more}, over the model's context of {self.max_context}"
                )

    def for_classification(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer(text)["input_ids"] for text in texts]
        self._check_lengths([len(x) for x in ids], 0, "inputs")
        return ids

    def for_generation(self, prompts: list[str | list[int]], params: GenerationParams) -> list[list[int]]:
        """Token ids of each prompt: a text (wrapped as `params.chat` says) or ids already encoded (a conversation
        from messages())."""
        ids = [list(p) if isinstance(p, list) else encode_prompt(self.tokenizer, p, params.chat) for p in prompts]
        self._check_lengths([len(x) for x in ids], params.max_new_tokens, "inputs")
        self._check_ids(ids, "inputs")
        return ids

    def for_embedding(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Token ids of texts (encoded as for classification) or ids given as they are."""
        ids = [list(x) if isinstance(x, list) else self.tokenizer(x)["input_ids"] for x in inputs]
        self._check_lengths([len(x) for x in ids], 0, "input")
        self._check_ids(ids, "input")
        return ids

    def _check_ids(self, ids: list[list[int]], field: str) -> None:
        vocab = len(self.tokenizer)
        for i, row in enumerate(ids):
            if outside := [t for t in row if not 0 <= t < vocab]:
                raise InvalidInput(f"{field}[{i}]", f"token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})")

    def messages(self, messages: list[dict[str, str]], params: GenerationParams) -> list[int]:
        """Prompt ids of a whole conversation ({role, content} dicts) in the base's chat template."""
        if not self.tokenizer.chat_template:
            raise InvalidInput("messages", f"the base {self.base_name!r} has no chat template")
        ids = encode_chat(self.tokenizer, messages)
        self._check_lengths([len(ids)], params.max_new_tokens, "messages")
        return ids


def stop_cut(text: str, stop: tuple[str, ...]) -> int:
    """Where the answer ends: the earliest stop string's position in text, or -1."""
    return min((text.find(s) for s in stop if s in text), default=-1)


class TextDeltas:
    """Incremental decoding for streams: only text that can no longer change goes out.

    Held back: an unfinished multi-byte character (it decodes as U+FFFD until its last byte-token arrives), and as
    many characters as a stop string could still need to match (the answer is cut before a stop string).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold_back = max((len(s) - 1 for s in stop), default=0)
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        """The new stable text after one more generated token ("" if none)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = stop_cut(text, self.stop)
        if cut >= 0:
            stable = text[:cut]
        else:
            stable = text.rstrip("\ufffd")
            stable = stable[: max(len(stable) - self.hold_back, 0)]
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def finish(self, final_text: str) -> str:
        """What the final answer adds to the text already sent."""
        if not final_text.startswith(self.sent):  # not with prefix-stable decoding; the final result stays the truth
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final_text)
            return ""
        return final_text[len(self.sent):]
