"""THANN's tokenizer as an HF tokenizer (what ``AutoTokenizer.from_pretrained`` loads from an
export): the same ids for every text, THANN's special tokens at their ids, and THANN's chat
template (thann.data.chat) as a Jinja chat template.

cl100k_base becomes a byte-level BPE ``tokenizer.json`` through transformers' own tiktoken
converter; the gaps in cl100k's ids (ids no token has) stay gaps. An HF tokenizer used in
training is written as it is.

One difference is by design: THANN encodes special-token text inside a document as text, HF
tokenizers read it as the special token (that is how a chat template's markers become tokens).
``tokenizer(text, split_special_tokens=True)`` encodes such text as THANN does.
"""

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from thann.data.tokenizer import CHAT_SPECIAL_TOKENS, Tokenizer

# thann.data.chat.render, and encode_prompt's open assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


class _Tiktoken(TikTokenConverter):
    """transformers' converter, reading the ranks THANN's encoding holds (no file) and keeping
    the special tokens at their tiktoken ids. Its default pattern is cl100k's: tiktoken now spells
    it with possessive quantifiers, which the tokenizers library's regex engine reads otherwise
    (``\\p{N}{1,3}+`` splits long numbers differently)."""

    def __init__(self, ranks: dict[bytes, int], special_ids: dict[str, int]):
        super().__init__(extra_special_tokens=list(special_ids))
        self.ranks, self.special_ids = ranks, special_ids

    def load_tiktoken_bpe(self, url):
        return self.ranks

    def extract_vocab_merges_from_model(self, url):
        vocab, merges = super().extract_vocab_merges_from_model(url)
        # In the vocabulary, the special tokens keep these ids when they are added as special.
        return {**vocab, **self.special_ids}, merges


def hf_tokenizer(tokenizer: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """``tokenizer`` as an HF fast tokenizer that pads on the left (for batched generation)."""
    if tokenizer.kind == "tiktoken":
        encoding = tokenizer._encoding
        backend = _Tiktoken(encoding._mergeable_ranks, tokenizer.special_ids).converted()
    else:
        from tokenizers import Tokenizer as Backend

        # A copy as read from its file, without THANN's encode-special-tokens-as-text switch.
        backend = Backend.from_str(tokenizer._tokenizer.to_str())
    end = tokenizer.decode([tokenizer.eod])
    chat = all(token in tokenizer.special_ids for token in CHAT_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=end, pad_token=end, padding_side="left",
                                   model_max_length=max_length, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE if chat else None)
