"""DistributedDataParallel: two CPU processes (gloo) of batch b train the tiny variant to the weights one process of
batch 2b reaches on the same data and seed, and end identical to each other.

The run goes through every case the wrapper has to handle: box-only steps of the grounding warm-up (SAM not run:
unused parameters), the mask decoder frozen for the first epoch and unfrozen in the second (DDP rebuilt), the
referent-patch head (wrapped with the model) and its linear probe (every rank takes part). Every sample has a target,
so the mean of the two ranks' batch losses is the loss of the global batch. The VAD's attention dropout (0.1, as
official) is the one random draw of a step and each process draws its own, so the test turns it off.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PER_RANK_BATCH = 2
STEPS = 10                # 6 steps an epoch (24 samples, global batch 4): epoch 2 unfreezes the decoder
WARMUP_STEPS = 3          # box-only steps: the clock below runs 10 s a step, the warm-up lasts 30 s

# The two runs differ only in how the batch's sums are split between processes, which changes float32 rounding.
# Adam divides by the gradient's running RMS, so for a parameter whose gradient is near Adam's eps (1e-8) a rounding
# difference changes an update of up to lr (1e-3 here). Measured (one torch thread, CPU): 7.6e-7 after one step,
# 2.7e-6 after the 10 steps of this run, both ranks bit-identical. What the test guards against is larger by orders:
# Adam state created for the parameters a box-only step does not use (DDP filling their gradients with zeros where
# one process leaves them unset) moved weights by 2.9e-3 when tried; a rank's gradient not averaged, by ~lr per step.
ATOL = 2e-5


def _data():
    from ssp_sam.data.synthetic import SyntheticConfig, SyntheticDataset

    targets_only = SyntheticConfig(kind_weights={"attr": 0.5, "multi": 0.5})
    return SyntheticDataset(24, seed=0, config=targets_only), SyntheticDataset(6, seed=1)


def _clock(run) -> float:
    """A deterministic wall clock for every process and run: 10 s a step."""
    return 10.0 * run.step


def _run(out_dir: str, batch_size: int, model_seed: int):
    from ssp_sam import train as train_mod
    from ssp_sam.build import build_model

    cfg = train_mod.config_from_preset("tiny", out_dir=out_dir, batch_size=batch_size, epochs=2, max_steps=STEPS,
                                       freeze_decoder_epochs=1, ground_first_min=WARMUP_STEPS * 10 / 60,
                                       patch_loss_weight=2.0, patch_head_fit_steps=5, aug_translate=True)
    train_set, val_set = _data()
    model = build_model("tiny", seed=model_seed)
    model.vad.img2text_attn.dropout = 0.0
    res = train_mod.train(cfg, model=model, train_set=train_set, val_set=val_set)
    return {"state": res.model.state_dict(), "steps": res.steps, "val": res.history[-1]["val/mIoU"],
            "history": res.history}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    import ssp_sam.train

    ssp_sam.train.Run.elapsed = _clock
    try:
        # different initial weights on purpose: DDP gives every rank rank 0's
        torch.save(_run(f"{tmp}/run", PER_RANK_BATCH, model_seed=rank), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_of_twice_the_batch(tmp_path, monkeypatch):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)
    import ssp_sam.train

    monkeypatch.setattr(ssp_sam.train.Run, "elapsed", _clock)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _run(str(tmp_path / "one"), 2 * PER_RANK_BATCH, model_seed=0)
    finally:
        torch.set_num_threads(n)

    assert a["steps"] == b["steps"] == one["steps"] == STEPS and a["val"] == b["val"]
    assert "train/dice" in a["history"][0] and a["history"][0]["train/patch"] > 0
    init = __import__("ssp_sam.build", fromlist=["build_model"]).build_model("tiny", seed=0).state_dict()
    worst, changed = 0.0, set()
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k                  # the ranks never drift apart
        worst = max(worst, float((v.float() - one["state"][k].float()).abs().max()))
        if not torch.equal(v, init[k]):
            changed.add(k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("sam.") else ""))
    assert worst <= ATOL, worst
    assert {"sam.mask_decoder", "sam.image_encoder", "prompt_generator", "vad", "clip"} <= changed
    assert (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "rank1").exists()


def test_the_sampler_gives_one_process_the_union_of_the_ranks_batches():
    """The property the test above rests on, checked on indices alone: DistributedSampler batches of b on two ranks
    are, step by step, the batches of 2b one process sees."""
    from torch.utils.data import DistributedSampler

    data = list(range(24))
    one = list(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True))
    two = [list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True))
           for r in (0, 1)]
    for step in range(len(data) // 4):
        union = two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2]
        assert sorted(union) == sorted(one[4 * step:4 * step + 4])
