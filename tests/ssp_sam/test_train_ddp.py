"""Two CPU processes (gloo) train the tiny variant for a few steps; their parameters must stay identical."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, tmp: str, per_image: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    try:
        from ssp_sam.build import build_model
        from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset
        from ssp_sam.train import config_from_preset, train

        model = build_model("tiny", seed=rank)  # different inits on purpose: rank 0's weights are broadcast
        cfg = config_from_preset("tiny", out_dir=f"{tmp}/run", max_steps=3, epochs=1, sentences_per_image=per_image,
                                 aug_flip=0.5 if per_image > 1 else 0.0,  # + the patch loss, its head fitted first
                                 patch_loss_weight=2.0 if per_image > 1 else 0.0, patch_head_fit_steps=5)
        data = SyntheticDataset(24, seed=0, config=SyntheticConfig(sentences_per_scene=per_image))
        res = train(cfg, model=model, train_set=data, val_set=SyntheticDataset(6, seed=1))
        torch.save({"state": res.model.state_dict(), "steps": res.steps, "val": res.history[-1]["val/mIoU"]},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("per_image", [1, 3], ids=["one-sentence-per-image", "grouped-by-image"])
def test_two_processes_stay_in_sync(tmp_path, per_image):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, str(tmp_path), per_image), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert a["steps"] == b["steps"] == 3 and a["val"] == b["val"]
    init = __import__("ssp_sam.build", fromlist=["build_model"]).build_model("tiny", seed=0).state_dict()
    changed = 0
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
        changed += int(not torch.equal(v, init[k]))
    assert changed > 0  # training moved the weights
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "rank1").exists()
