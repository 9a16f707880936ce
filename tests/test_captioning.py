"""THANN reading an image before its text (thann_vlm, the LLaVA pattern): decoding with the KV
cache, the image fed once with the prefill, gives the logits of a full forward of the same image
and text; the image changes them; the loss is the cross entropy of the text's logits; only the
projector learns unless the decoder does; the caption scores against a count done by hand."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY_MODEL

IMAGE_TOKENS, IMAGE_WIDTH = 4, 8


def _vlm(layout, train_decoder: bool = False):
    from thann.data.tokenizer import build_tokenizer
    from thann.models import registry

    args = OmegaConf.merge(OmegaConf.load(TINY_MODEL), {
        "arch": "thann_vlm", "image_tokens": IMAGE_TOKENS, "image_hidden_size": IMAGE_WIDTH,
        "train_decoder": train_decoder})
    tokenizer = build_tokenizer("tiktoken", "cl100k_base")
    model, _ = registry.build(args, layout, vocab_size=tokenizer.vocab_size, max_sequence_length=32, bf16=False)
    return model.eval(), tokenizer


def test_cached_image_conditioned_decoding_gives_the_logits_of_a_full_forward(single_rank):
    from thann.inference.generator import Generator
    from thann.inference.sampling import SamplingParams

    model, tokenizer = _vlm(single_rank)
    images = torch.randn(2, IMAGE_TOKENS, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
    # Prompts of different lengths: the shorter one is prefilled with the image, the longer one's
    # rest is fed token by token after it.
    prompts = [tokenizer.encode("Emoji: a"), tokenizer.encode("Emoji: the large red")]
    results = Generator([model], tokenizer, 32).generate(prompts, SamplingParams(max_new_tokens=6),
                                                          keep_logits=True, image_states=images)
    for row, result in enumerate(results):
        tokens = torch.tensor([prompts[row] + result.tokens[:-1]])
        with torch.no_grad():
            full = model(tokens, torch.arange(tokens.size(1))[None], None, image_states=images[row:row + 1])[0]
            other = model(tokens, torch.arange(tokens.size(1))[None], None, image_states=-images[row:row + 1])[0]
        assert full.shape[0] == tokens.size(1)  # the text's positions only
        first = len(prompts[row]) - 1  # the position that chose the first new token
        for k, logits in enumerate(result.logits):
            torch.testing.assert_close(logits, full[first + k, :tokenizer.vocab_size], rtol=1e-5, atol=1e-5)
        assert (full - other).abs().max() > 1e-3, "the image did not change the logits"


def test_the_loss_is_the_cross_entropy_of_the_text_and_only_the_projector_learns(single_rank):
    model, tokenizer = _vlm(single_rank)
    images = torch.randn(2, IMAGE_TOKENS, IMAGE_WIDTH, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([tokenizer.encode("Emoji: grinning face")] * 2)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    losses = model(tokens, positions, None, labels=labels, image_states=images)
    with torch.no_grad():
        logits = model(tokens, positions, None, image_states=images)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("image_projector.") for name in trainable)
    losses.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_projector.parameters())
    decoder, _ = _vlm(single_rank, train_decoder=True)
    assert all(p.requires_grad for p in decoder.parameters())


@pytest.mark.parametrize("predictions, references, exact, f1", [
    (["red apple", "Green  Apple pie"], [["apple", "red apple"], ["red apple"]], 0.5, (1.0 + 0.4) / 2),
    (["santa"], [["father christmas", "santa"]], 1.0, 1.0),
    (["a b"], [["c d"]], 0.0, 0.0),
])
def test_caption_scores_against_a_count_by_hand(predictions, references, exact, f1):
    from thann.recipes.captioning.quality import caption_scores

    # "green apple pie" against "red apple": one shared token, precision 1/3, recall 1/2, F1 0.4.
    assert caption_scores(predictions, references) == pytest.approx({"exact": exact, "f1": f1})
