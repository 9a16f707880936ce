"""The one chat template of THANN (ChatML) and its loss mask.

A conversation is rendered as

    <|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n ...

with ``<|im_start|>``/``<|im_end|>`` as single special tokens (never produced from text), then
the end-of-document token. The assistant mask is 1 on the tokens of each assistant reply and
its ``<|im_end|>`` (what a fine-tuned model must learn to write, including when to stop), 0 on
everything else.

Both chat forms in the wild are read: smoltalk's ``{"messages": [{"role", "content"}, ...]}``
and ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``.
"""

from thann.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Speaker names found in ShareGPT-style data -> template roles.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                 "bard": "assistant", **{r: r for r in ROLES}}
_FORMS = {"messages": ("role", "content"), "conversations": ("from", "value")}


class RecordError(ValueError):
    """A record that is not a usable document; the message says why."""


def messages_of(record: dict) -> list[tuple[str, str]]:
    """(role, content) pairs of a chat record in either form; RecordError if it is malformed."""
    key = next((k for k in _FORMS if k in record), None)
    if key is None:
        raise RecordError(f"no {' or '.join(map(repr, _FORMS))} key")
    role_key, content_key = _FORMS[key]
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(f"{key!r} is {type(turns).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise RecordError(f"{key}[{i}] is not an object with a string {content_key!r}")
        role = _ROLE_ALIASES.get(turn.get(role_key))
        if role is None:
            raise RecordError(f"{key}[{i}] has unknown {role_key} {turn.get(role_key)!r} "
                              f"(known: {sorted(_ROLE_ALIASES)})")
        messages.append((role, turn[content_key]))
    if not any(content.strip() for _, content in messages):
        raise RecordError("empty document")
    return messages


def render(messages: list[tuple[str, str]]) -> str:
    """The template as text (what the token ids decode to, without the end-of-document token)."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)


def encode_prompt(tokenizer: Tokenizer, prompt: str, template: str) -> list[int]:
    """Token ids that ask for a reply to ``prompt`` in the form the documents had: ``template``
    "chat" makes it a user turn followed by an open assistant turn; any other template is a
    format string with ``{prompt}``."""
    if template != "chat":
        return tokenizer.encode(template.format(prompt=prompt))
    ids, _ = encode_chat(tokenizer, [("user", prompt)])
    return ids[:-1] + [tokenizer.special("<|im_start|>"), *tokenizer.encode("assistant\n")]


def encode_chat(tokenizer: Tokenizer, messages: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation plus the end-of-document token, and the assistant mask."""
    start, end = tokenizer.special("<|im_start|>"), tokenizer.special("<|im_end|>")
    heads = tokenizer.encode_batch([f"{role}\n" for role, _ in messages])
    bodies = tokenizer.encode_batch([content for _, content in messages])
    newline = tokenizer.encode("\n")
    ids, mask = [], []
    for (role, _), head, body in zip(messages, heads, bodies):
        learn = int(role == "assistant")
        ids += [start, *head, *body, end, *newline]
        mask += [0] * (1 + len(head)) + [learn] * (len(body) + 1) + [0] * len(newline)
    return ids + [tokenizer.eod], mask + [0]
