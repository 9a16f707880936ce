"""Images and their captions for image-text training, read offline.

    emoji(size, resize)                    the emoji of the npm package emoji-datasource-google
                                           16.0.0 (MIT): 64x64 PNGs; a group per emoji (emoji
                                           sharing a caption are one), its captions the name and
                                           short names, its skin-tone variants more images
    caption_file(path, size, resize)       a user's JSON lines {"image": path, "caption": text or
                                           [texts]}; lines naming the same image add captions
    fashion_mnist(size, templates, limit)  Fashion-MNIST's training images, a group per class, its
                                           captions the class name through templates

A group's images and captions are all positives of each other: an image may have several
captions and a caption several images. Images are read with Pillow, transparency composited on
white, as RGB bytes [H, W, 3]; an image of another size than the encoder's is an error unless
``resize`` (bicubic). Every failure is an ImageDataError of one line naming the file (and the
caption file's line).
"""

import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from thann.data import sources

EMOJI = ("emoji-datasource-google", "16.0.0")
EMOJI_SIZE = 64  # the package's img/google/64


class ImageDataError(ValueError):
    pass


@dataclass
class Captioned:
    pixels: np.ndarray  # uint8 [N, H, W, 3]
    groups: np.ndarray  # int64 [N]: each image's group
    captions: list[list[str]]  # each group's captions
    categories: list[str]  # each group's category ("" where there is none)

    def subset(self, groups: np.ndarray) -> "Captioned":
        """The images and captions of ``groups`` (renumbered 0.. in that order)."""
        number = {int(g): i for i, g in enumerate(groups)}
        keep = np.array([int(g) in number for g in self.groups], dtype=bool)
        return Captioned(self.pixels[keep], np.array([number[int(g)] for g in self.groups[keep]], dtype=np.int64),
                         [self.captions[g] for g in groups], [self.categories[g] for g in groups])

    def split(self, heldout: float, seed: int) -> tuple["Captioned", "Captioned"]:
        """(train, held-out) by group: no group has images or captions on both sides."""
        order = np.random.default_rng(seed).permutation(len(self.captions))
        cut = max(1, round(heldout * len(order)))
        return self.subset(np.sort(order[cut:])), self.subset(np.sort(order[:cut]))

    def pairs(self) -> list[tuple[int, int]]:
        """(image, caption of its group) for every image and each of its group's captions."""
        return [(i, c) for i, g in enumerate(self.groups) for c in range(len(self.captions[g]))]


def read_image(path: str, size: int, resize: bool, where: str | None = None,
               resize_field: str = "data.resize") -> np.ndarray:
    """RGB bytes [size, size, 3] of the image file at ``path``; ``where`` names it in errors, and
    ``resize_field`` the setting that would resize it (the caller's name for ``resize``)."""
    from PIL import Image, UnidentifiedImageError

    where = where or path
    try:
        with Image.open(path) as image:
            rgba = image.convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageDataError(f"{where}: not a readable image ({e})") from None
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if rgb.size != (size, size):
        if not resize:
            raise ImageDataError(f"{where}: {rgb.size[0]}x{rgb.size[1]} pixels, the image encoder reads "
                                 f"{size}x{size} ({resize_field}=true resizes)")
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # writable: torch warns on read-only memory


def to_tensor(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Bytes [N, H, W, 3] -> floats [N, 3, H, W] in [-1, 1]."""
    return torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def grey_to_rgb(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Grey bytes [N, 1, h, w] (MNIST, Fashion-MNIST) -> RGB bytes [N, size, size, 3]: resized
    bicubic, the grey repeated over red, green and blue."""
    resized = torch.nn.functional.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def _caption(text: str) -> str:
    return re.sub(r"[_-]+", " ", text).strip().lower()


def emoji(size: int = EMOJI_SIZE, resize: bool = False) -> Captioned:
    """Every emoji of the package with a Google image, in the package's order. Emoji that share a
    caption are one group (the package names two emoji "MAN IN TUXEDO", and short names repeat:
    "cat" is the cat and the cat face), so no caption is both a positive and a negative, and no
    caption is on both sides of a split."""
    root = sources.npm_package(*EMOJI)
    with open(os.path.join(root, "emoji.json"), encoding="utf-8") as f:
        records = [r for r in json.load(f) if r.get("has_img_google")]
    names = [list(dict.fromkeys([_caption(r["name"])] + [_caption(s) for s in r["short_names"]])) for r in records]
    root_of = list(range(len(records)))  # union-find over records sharing a caption

    def find(i: int) -> int:
        while root_of[i] != i:
            root_of[i] = root_of[root_of[i]]
            i = root_of[i]
        return i

    first = {}
    for i, captions in enumerate(names):
        for caption in captions:
            root_of[find(i)] = find(first.setdefault(caption, i))
    number, captions, categories, pixels, groups = {}, [], [], [], []
    for i, record in enumerate(records):
        group = number.setdefault(find(i), len(number))
        if group == len(captions):
            captions.append([])
            categories.append(record["category"])
        captions[group] = list(dict.fromkeys(captions[group] + names[i]))
        images = [record["image"]] + [v["image"] for v in (record.get("skin_variations") or {}).values()
                                      if v.get("has_img_google")]
        for image in images:
            pixels.append(read_image(os.path.join(root, "img", "google", str(EMOJI_SIZE), image), size, resize))
            groups.append(group)
    return Captioned(np.stack(pixels), np.array(groups, dtype=np.int64), captions, categories)


def fashion_names(class_names: list[str]) -> list[str]:
    """Fashion-MNIST's class names as caption words ("T-shirt/top" -> "t-shirt or top")."""
    return [name.lower().replace("/", " or ") for name in class_names]


def fashion_mnist(size: int, templates: list[str], limit: int | None = None) -> Captioned:
    """Fashion-MNIST's training images (the first ``limit``; None: all 60,000) at ``size``
    (grey_to_rgb), a group per class whose captions are its name through each template ("a photo
    of a {}"): every image of a class is a positive of every caption of it, and a held-out split
    holds out whole classes."""
    from thann.data.classification import load

    data = load("fashion_mnist", "train")
    inputs, labels = data.inputs[:limit], data.labels[:limit]
    pixels = np.concatenate([grey_to_rgb(inputs[i:i + 4096], size).numpy() for i in range(0, len(inputs), 4096)])
    captions = [[template.format(name) for template in templates] for name in fashion_names(data.class_names)]
    return Captioned(pixels, labels.numpy().astype(np.int64), captions, [""] * len(captions))


def captioned(data_cfg, size: int) -> Captioned:
    """The images and captions a data config names (``source``: emoji, fashion_mnist or a caption
    file), at the image encoder's ``size``."""
    if data_cfg.source == "emoji":
        return emoji(size, data_cfg.resize)
    if data_cfg.source == "fashion_mnist":
        return fashion_mnist(size, list(data_cfg.templates), data_cfg.get("limit"))
    return caption_file(data_cfg.source, size, data_cfg.resize)


def caption_file(path: str, size: int, resize: bool) -> Captioned:
    """A JSON-lines file of {"image": path (relative to the file's folder), "caption": text or
    [texts]}; lines naming the same image add captions to its group."""
    folder, number = os.path.dirname(os.path.abspath(path)), {}
    pixels, captions = [], []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageDataError(f"{path}: cannot read the caption file ({e})") from None
    for line_number, line in enumerate(lines, 1):
        where = f"{path}:{line_number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ImageDataError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise ImageDataError(f'{where}: a line needs "image": a path to an image file')
        text = record.get("caption")
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ImageDataError(f'{where}: a line needs "caption": a non-empty text or list of texts')
        image = os.path.normpath(os.path.join(folder, record["image"]))
        if image not in number:
            number[image] = len(captions)
            pixels.append(read_image(image, size, resize, where=f"{where}: {record['image']}"))
            captions.append([])
        captions[number[image]].extend(t.strip() for t in texts)
    if not captions:
        raise ImageDataError(f"{path}: no captioned images")
    return Captioned(np.stack(pixels), np.arange(len(captions), dtype=np.int64), captions, [""] * len(captions))
