"""Tiny weight files in the official formats, for the tests of loaders and downloads: a segment-anything state dict,
an OpenAI CLIP state dict and an official SSP-SAM checkpoint (``{"model": ..., "epoch": ..., "args": ...}`` under the
official module names), all of the ``tiny`` variant."""

from __future__ import annotations

import io

import torch

from ssp_sam import checkpoints
from ssp_sam.build import build_model
from tests.ssp_sam.helpers_clip import hf_to_openai


def official_state(model) -> dict:
    """This model's weights under the official SSP_SAM names (inverse of the prefix map)."""
    inverse = [(new, old) for old, new in checkpoints.OFFICIAL_PREFIXES]
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("clip.") or k.endswith("position_ids"):
            continue
        for new, old in inverse:
            if k.startswith(new):
                out[old + k[len(new):]] = v.clone()
                break
    return out


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tiny_weight_files(seed: int = 0) -> dict[str, bytes]:
    """``{"checkpoint", "sam", "clip"}`` -> file content, all from one ``tiny`` model (seed ``seed``)."""
    model = build_model("tiny", seed=seed)
    return {
        "checkpoint": _saved({"model": official_state(model), "epoch": 80, "args": {"batch_size": 8}}),
        "sam": _saved(model.sam.state_dict()),
        "clip": _saved(hf_to_openai(model.clip.model.state_dict())),
    }


class WeightsHomes:
    """A ``LocalWeightsServer`` set up as the homes of the ``tiny`` variant's "official" weights, and everything pointed
    at it: ``hub.OFFICIAL_WEIGHTS["tiny"]`` and its marker ``32px`` (monkeypatched), ``HF_ENDPOINT``,
    ``SAM_WEIGHTS_URL``, ``CLIP_WEIGHTS_URL``, and huggingface_hub's cache in ``tmp_path`` (online mode, no token).

    The repository holds the checkpoint for refcoco (``unc``) and one for refcoco+, a 224px one and a README.
    ``keys``: the server paths of the three downloads (for its fault tables)."""

    CHECKPOINT = "ckpts/vpp-sam/unc/32px/checkpoint_best_miou.pth"
    OTHER_DATASET = "ckpts/vpp-sam/unc+/32px/checkpoint_best_miou.pth"

    def __init__(self, tmp_path, monkeypatch, files: dict[str, bytes]):
        import hashlib

        from huggingface_hub import constants

        from ssp_sam import hub
        from tests.local_http import LocalWeightsServer

        self.files = files
        self.server = server = LocalWeightsServer().start()
        sha = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
        md5 = hashlib.md5(files["sam"]).hexdigest()
        self.sam = hub.RemoteFile("sam", f"sam_tiny_{md5[:6]}.pth", f"sam_tiny_{md5[:6]}.pth", sha256=sha["sam"],
                                  md5=md5, size=len(files["sam"]))
        self.clip = hub.RemoteFile("clip", "CS-tiny.pt", f"{sha['clip']}/tiny.pt", sha256=sha["clip"])
        monkeypatch.setitem(hub.OFFICIAL_WEIGHTS, "tiny", (self.sam, self.clip))
        monkeypatch.setitem(hub.VARIANT_MARKERS, "tiny", ("32px",))
        self.keys = {
            "sam": "/segment_anything/" + self.sam.path,
            "clip": "/clip/models/" + self.clip.path,
            "checkpoint": server.add_repo_file(hub.HF_REPO, self.CHECKPOINT, files["checkpoint"]),
        }
        server.add_file(self.keys["sam"], files["sam"])
        server.add_file(self.keys["clip"], files["clip"])
        server.add_repo_file(hub.HF_REPO, self.OTHER_DATASET, files["checkpoint"][:-1] + b"\0")
        server.add_repo_file(hub.HF_REPO, "ckpts/vpp-sam/unc/224px/checkpoint_best_miou.pth", b"not tiny")
        server.add_repo_file(hub.HF_REPO, "README.md", b"# SSP-SAM (test)\n", lfs=False)
        monkeypatch.setenv("HF_ENDPOINT", server.origin)
        monkeypatch.setenv("SAM_WEIGHTS_URL", server.url("/segment_anything"))
        monkeypatch.setenv("CLIP_WEIGHTS_URL", server.url("/clip/models"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def downloads(self, role: str) -> list[int]:
        """The first byte of every GET of ``role``'s file that sent a body."""
        return [start for key, start in self.server.downloads if key == self.keys[role]]

    def stop(self) -> None:
        for gate in self.server.gate.values():     # a request a test still holds must not block the shutdown
            gate.set()
        self.server.stop()
