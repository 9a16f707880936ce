"""Datasets in training: blending by weight, the assistant loss mask, the tokenizer of a resume."""


from conftest import data_cfg, run_pretrain, tiny_run_overrides
from thann.data.datasets import build_datasets
from thann.data.preprocess import preprocess
from thann.data.readers import Document
from thann.data.tokenizer import TiktokenTokenizer, train_bpe


def _data_cfg(paths, weights=None, loss_mask="all"):
    return data_cfg(paths=paths, weights=weights, split="90,10,0", loss_mask=loss_mask)


def test_blended_samples_follow_the_weights(tmp_path):
    tokenizer = TiktokenTokenizer()
    words = {"a": " alpha", "b": " omega"}
    for name, word in words.items():  # datasets of very different sizes: weights, not sizes, decide
        preprocess([Document(f"{name}{i}", text=word * (20 + i % 7)) for i in range(300 if name == "a" else 40)],
                   str(tmp_path / name))
    word_ids = {name: set(tokenizer.encode(word)) for name, word in words.items()}
    weights = [0.3, 0.7]
    train, _ = build_datasets(_data_cfg([str(tmp_path / "a"), str(tmp_path / "b")], weights), tokenizer,
                              seq_length=32, seed=1234, train_samples=10_000, valid_samples=100)
    counts = {"a": 0, "b": 0}
    for i in range(10_000):
        content = set(train[i]["tokens"].tolist()) - {tokenizer.eod}
        source = [name for name, ids in word_ids.items() if content <= ids]
        assert len(source) == 1, content
        counts[source[0]] += 1
    for name, weight in zip(counts, weights):
        assert abs(counts[name] / 10_000 - weight) < 0.02, counts


def test_assistant_loss_mask_reaches_the_training_samples(tmp_path):
    tokenizer = TiktokenTokenizer()
    chats = [Document(f"c{i}", messages=(("user", " no" * (5 + i % 4)), ("assistant", " yes" * (3 + i % 5))))
             for i in range(200)]
    preprocess(chats, str(tmp_path / "chat"), loss_mask=True)
    yes, end = set(tokenizer.encode(" yes")), tokenizer.special("<|im_end|>")
    train, valid = build_datasets(_data_cfg([str(tmp_path / "chat")], loss_mask="assistant"), tokenizer,
                                  seq_length=48, seed=1, train_samples=200, valid_samples=20)
    learnt = seen = 0
    for sample in (train[i] for i in range(200)):
        labels, mask = sample["labels"].numpy(), sample["loss_mask"].numpy()
        counted = set(labels[mask == 1].tolist())
        assert counted <= yes | {end}, tokenizer.decode(sorted(counted - yes - {end}))
        assert set(labels[mask == 0].tolist()).isdisjoint(yes)  # every assistant token is learnt
        learnt += int(mask.sum())
        seen += mask.size
    assert 0.2 < learnt / seen < 0.6


def test_resume_with_another_tokenizer_fails_clearly(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert run_pretrain(tiny_run_overrides(tiny_corpus, run_dir, steps=2)).returncode == 0
    texts = [f"document {i} about tokenizers and checkpoints" for i in range(400)]
    bpe = train_bpe(iter(texts), vocab_size=300, output_dir=str(tmp_path / "bpe"))
    preprocess([Document(str(i), text=t) for i, t in enumerate(texts)], str(tmp_path / "bpe_data"),
               "huggingface", bpe.model)
    out = run_pretrain(tiny_run_overrides(str(tmp_path / "bpe_data"), run_dir, steps=4)
                       + ["data.tokenizer.type=huggingface", f"data.tokenizer.model={tmp_path / 'bpe'}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "invalid config: data.tokenizer=" in out.stderr and "was trained with tokenizer" in out.stderr
