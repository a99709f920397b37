"""Text in and out: prompts to token ids (checked against the context), and generated ids back to text.

A refused input costs little: text over `max_chars` (the context times the longest token's characters: no text
that long fits) is refused before any tokenization, and a longer text is tokenized a prefix at a time, so the work
stops soon after the context is known to be exceeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from .errors import InvalidInput
from .types import GenerationParams

log = logging.getLogger(__name__)


PREFIX_CHARS_PER_TOKEN = 16  # the first prefix tokenized holds this many characters per token of context
BOUNDARY_SLACK = 32  # tokens a cut at the end of a prefix may add (a word split in two), never counted as over


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A conversation in the base's chat template, ending with the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the base's chat template."""
    return tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a generation prompt: a user message in the base's chat template when it has one."""
    if chat and tokenizer.chat_template:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token of the vocabulary stands for (its text; byte-level tokens: one per byte)."""
    return max(len(token) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def check_text(text: str, field: str) -> None:
    """InvalidInput for text that is not valid Unicode (a lone surrogate: JSON allows "\\udfff", UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(field, f"not valid Unicode text: a lone surrogate (U+{ord(text[exc.start]):04X}) at "
                           f"character {exc.start}") from None


class InputEncoder:
    """Encodes requests for one base and refuses what its context cannot hold (422 naming the input)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_context: int, base_name: str):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.base_name = base_name
        self.max_chars = max_context * longest_token_chars(tokenizer)  # no longer text fits in the context

    def _check_lengths(self, lengths: list[int], extra: int, field: str) -> None:
        for i, length in enumerate(lengths):
            if length == 0:
                raise InvalidInput(f"{field}[{i}]", "input is empty")
            if length > self.max_context:  # a capped count (_encode): the whole text has more
                raise InvalidInput(f"{field}[{i}]", f"input has more than {self.max_context} tokens, over the "
                                   f"model's context of {self.max_context}")
            if length + extra > self.max_context:
                more = f" + {extra} new tokens" if extra else ""
                raise InvalidInput(
                    f"{field}[{i}]", f"input has {length} tokens{more}, over the model's context of {self.max_context}"
                )

    def _encode(self, text: str, field: str, encode: Callable[[str], list[int]]) -> list[int]:
        """Token ids of a text, or as many as tell that it is over the context (more than max_context ids): text
        over max_chars is refused untokenized, and a long text is tokenized a growing prefix at a time."""
        check_text(text, field)
        if len(text) > self.max_chars:
            raise InvalidInput(field, f"input has {len(text)} characters: no text over {self.max_chars} fits the "
                               f"model's context of {self.max_context} tokens")
        chars = PREFIX_CHARS_PER_TOKEN * self.max_context
        while chars < len(text):
            ids = encode(text[:chars])
            if len(ids) > self.max_context + BOUNDARY_SLACK:
                return ids
            chars *= 2
        return encode(text)

    def _text_ids(self, text: str, field: str) -> list[int]:
        return self._encode(text, field, lambda part: self.tokenizer(part)["input_ids"])

    def _prompt_ids(self, prompt: str, chat: bool, field: str) -> list[int]:
        check_text(prompt, field)
        if chat and self.tokenizer.chat_template:
            return self._chat_ids([{"role": "user", "content": prompt}], field)
        return self._text_ids(prompt, field)

    def _chat_ids(self, messages: list[dict[str, str]], field: str) -> list[int]:
        for i, message in enumerate(messages):
            check_text(message["content"], f"{field}[{i}].content")
        text = chat_text(self.tokenizer, messages)
        return self._encode(text, field, lambda part: self.tokenizer(part, add_special_tokens=False)["input_ids"])

    def for_classification(self, texts: list[str]) -> list[list[int]]:
        ids = [self._text_ids(text, f"inputs[{i}]") for i, text in enumerate(texts)]
        self._check_lengths([len(x) for x in ids], 0, "inputs")
        return ids

    def for_generation(self, prompts: list[str | list[int]], params: GenerationParams) -> list[list[int]]:
        """Token ids of each prompt: a text (wrapped as `params.chat` says) or ids already encoded (a conversation
        from messages())."""
        ids = [list(p) if isinstance(p, list) else self._prompt_ids(p, params.chat, f"inputs[{i}]")
               for i, p in enumerate(prompts)]
        self._check_lengths([len(x) for x in ids], params.max_new_tokens, "inputs")
        self._check_ids(ids, "inputs")
        return ids

    def for_embedding(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Token ids of texts (encoded as for classification) or ids given as they are."""
        ids = [list(x) if isinstance(x, list) else self._text_ids(x, f"input[{i}]") for i, x in enumerate(inputs)]
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
        ids = self._chat_ids(messages, "messages")
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
