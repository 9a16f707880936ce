"""Zero-shot classification by captions, and a linear probe, for an image-text pair of encoders.

- **Fashion-MNIST** (never trained on): the first ``test`` images of a fixed permutation of its
  test split, each resized to the image encoder's size and its grey repeated over red, green and
  blue (thann.data.images.grey_to_rgb, as the from-scratch ViT classifier sees them). Each class
  is one caption per template ("a photo of a {}"), whose text embeddings are averaged (CLIP's
  prompt ensembling); an image's predicted class is the nearest class embedding. The **linear
  probe** fits a logistic regression on the frozen pooled image states (before the projection)
  of the first ``train`` images of a fixed permutation of the train split and scores it on the
  same test images: what the image encoder alone has learnt.
- **Emoji categories**: each held-out emoji image against one caption per category of the
  package ("Smileys & Emotion", ...; Component, the skin-tone swatches, left out).
"""

from dataclasses import dataclass

import numpy as np

_SUBSET_SEED = 10  # fixes which images form the subsets: every run evaluates the same ones
EXCLUDED_CATEGORIES = ("Component",)


@dataclass(frozen=True)
class FashionMNIST:
    train_pixels: np.ndarray  # uint8 [N, size, size, 3]
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]

    @classmethod
    def subset(cls, train: int, test: int, size: int) -> "FashionMNIST":
        from thann.data.classification import load
        from thann.data.images import fashion_names, grey_to_rgb

        parts = []
        for split, count in (("train", train), ("test", test)):
            data = load("fashion_mnist", split)
            chosen = np.random.default_rng(_SUBSET_SEED).permutation(len(data))[:count]
            parts.append((grey_to_rgb(data.inputs[chosen], size).numpy(), data.labels.numpy()[chosen]))
        names = fashion_names(load("fashion_mnist", "test").class_names)
        return cls(*parts[0], *parts[1], names)


def captions(names: list[str], templates: list[str]) -> list[str]:
    """Every template for every name, name after name."""
    return [template.format(name) for name in names for template in templates]
