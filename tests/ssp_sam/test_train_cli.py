"""``ssp-sam embed`` (resumable cache read by training) and ``ssp-sam eval`` on the tiny variant."""

import argparse
import json

import pytest
import torch

from ssp_sam.build import build_model
from ssp_sam.checkpoints import save_bundle
from ssp_sam.data.synthetic import SyntheticDataset
from ssp_sam.embed import EmbeddingStore, embed_dataset
from ssp_sam.tokenizer import load_tokenizer
from ssp_sam.train import config_from_preset, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_embed_is_resumable_and_feeds_training(tmp_path, monkeypatch):
    model = build_model("tiny", seed=0)
    data = SyntheticDataset(6, seed=0)
    first = embed_dataset(model, [data[i] for i in range(3)], tmp_path / "emb", progress=False)
    assert first == {"written": 3, "skipped": 0}
    again = embed_dataset(model, data, tmp_path / "emb", progress=False)
    assert again == {"written": 3, "skipped": 3}
    store = EmbeddingStore(tmp_path / "emb", data)
    assert store.missing() == [] and 0 in store
    with torch.no_grad():
        from ssp_sam.transforms import sam_input

        direct = model.encode_image(sam_input(data[0].image, model.spec.sam_image_size)[None])[0]
    assert torch.allclose(store[0], direct, atol=1e-5)
    assert not list((tmp_path / "emb").glob(".*tmp*"))  # atomic writes leave nothing behind

    # training with the cache never runs the SAM encoder
    enc = model.sam.image_encoder
    monkeypatch.setattr(enc, "forward", lambda x: (_ for _ in ()).throw(AssertionError("encoder ran")))
    cfg = config_from_preset("tiny", out_dir=str(tmp_path / "run"), train_sam_encoder=False,
                             embeddings_dir=str(tmp_path / "emb"), epochs=2, max_steps=2, save_checkpoints=False)
    res = train(cfg, model=model, train_set=data, val_set=SyntheticDataset(2, seed=0))
    assert res.steps == 2
    with pytest.raises(FileNotFoundError, match="ssp-sam embed"):
        train(cfg, model=model, train_set=SyntheticDataset(3, seed=5), val_set=None)


def test_eval_cli_writes_json(tmp_path, capsys):
    from ssp_sam import evaluate

    model = build_model("tiny", seed=0)
    path = save_bundle(model, load_tokenizer(model.spec), tmp_path / "tiny.pt")
    parser = argparse.ArgumentParser()
    evaluate.register_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", "--variant", "tiny", "--checkpoint", str(path), "--data",
                              "synthetic:5:seed=3", "--out", str(tmp_path / "m.json"), "--device", "cpu"])
    assert args.func(args) == 0
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["metrics"]["n"] == 5 and 0 <= out["metrics"]["mIoU"] <= 1
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "original resolution" in printed


def test_eval_cli_with_clicks(tmp_path, capsys):
    from ssp_sam import evaluate

    model = build_model("tiny", seed=0)
    path = save_bundle(model, load_tokenizer(model.spec), tmp_path / "tiny.pt")
    parser = argparse.ArgumentParser()
    evaluate.register_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", "--variant", "tiny", "--checkpoint", str(path), "--data", "synthetic:6:seed=3",
                              "--out", str(tmp_path / "m.json"), "--device", "cpu", "--clicks", "5"])
    assert args.func(args) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    for key in ("clicks/sentence/mIoU", "clicks/clicks/IoU@5", "clicks/sentence+clicks/NoC@85",
                "clicks/clicks/NoC@90"):
        assert key in metrics
    assert 0 <= metrics["clicks/clicks/NoC@90"] <= 5
    printed = capsys.readouterr().out
    assert "NoC@85" in printed and "sentence+clicks" in printed
