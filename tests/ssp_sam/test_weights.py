"""``ssp-sam download-weights`` and weights folders (``ssp_sam/hub.py``), against a local server that plays the
Hugging Face endpoint and the SAM and CLIP download URLs, serving tiny files in the official formats."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch

from ssp_sam import hub
from ssp_sam.build import VARIANTS, ModelConfig, build_model, load_model
from ssp_sam.versioning import weights_version
from tests.local_http import closed_port


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ssp-sam")
    hub.register_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)



def download(out, *more: str) -> int:
    return run_cli(["download-weights", "--variant", "tiny", "--dataset", "refcoco", "--out", str(out), *more])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("download-weights:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ the official table

def test_the_official_files_fit_the_official_variants():
    official = {name for name, spec in VARIANTS.items() if spec.official}
    assert set(hub.OFFICIAL_WEIGHTS) == official == set(hub.VARIANT_MARKERS) == {"ssp-sam-224", "ssp-sam-336"}
    clip_names = {224: "ViT-B-16.pt", 336: "ViT-L-14-336px.pt"}
    for name in official:
        spec, (sam, clip) = VARIANTS[name], hub.OFFICIAL_WEIGHTS[name]
        assert spec.sam_encoder == "vit_h" and sam is hub.SAM_VIT_H
        assert sam.name == "sam_vit_h_4b8939.pth" and sam.md5.startswith("4b8939")   # the name carries its MD5
        assert clip.path == f"{clip.sha256}/{clip_names[spec.clip_image_size]}"     # the URL carries its SHA-256
        assert clip.name == "CS-" + clip_names[spec.clip_image_size]               # the official Surgery name
        assert str(spec.clip_image_size) in hub.VARIANT_MARKERS[name]
    assert hub.SAM_VIT_H.url({}) == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"
    assert hub.CLIP_VIT_B_16.url({}) == ("https://openaipublic.azureedge.net/clip/models/"
                                         "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")
    assert hub.SAM_VIT_H.url({"SAM_WEIGHTS_URL": "http://mirror/sam/"}) == "http://mirror/sam/sam_vit_h_4b8939.pth"


REPO = ["README.md", ".gitattributes", "data_seg/anns/refcoco.json",
        "ckpts/vpp-sam/merge/224px/pretrain/checkpoint0020.pth",
        "ckpts/vpp-sam/merge/336px/pretrain/checkpoint0020.pth",
        "ckpts/vpp-sam/unc/224px/checkpoint_best_miou.pth", "ckpts/vpp-sam/unc/224px/checkpoint.pth",
        "ckpts/vpp-sam/unc/336px/checkpoint_best_miou.pth", "ckpts/vpp-sam/unc+/224px/checkpoint_best_miou.pth",
        "ckpts/vpp-sam/gref_umd/336px/checkpoint_best_miou.pth",
        "ckpts/vpp-sam/gref/336px/checkpoint_best_miou.pth",
        "ckpts/SSP_SAM_CLIP_B_FT_referit/checkpoint_best_miou.pth", "ckpts/grefcoco_336/model.pt"]


@pytest.mark.parametrize("variant,dataset,expected", [
    ("ssp-sam-224", "refcoco", "ckpts/vpp-sam/unc/224px/checkpoint_best_miou.pth"),   # best_miou over checkpoint.pth
    ("ssp-sam-336", "refcoco", "ckpts/vpp-sam/unc/336px/checkpoint_best_miou.pth"),
    ("ssp-sam-224", "refcoco+", "ckpts/vpp-sam/unc+/224px/checkpoint_best_miou.pth"),  # unc+ is not unc
    ("ssp-sam-336", "refcocog", "ckpts/vpp-sam/gref_umd/336px/checkpoint_best_miou.pth"),  # not the google split
    ("ssp-sam-336", "refcocog-google", "ckpts/vpp-sam/gref/336px/checkpoint_best_miou.pth"),
    ("ssp-sam-224", "referit", "ckpts/SSP_SAM_CLIP_B_FT_referit/checkpoint_best_miou.pth"),  # the config's name
    ("ssp-sam-336", "grefcoco", "ckpts/grefcoco_336/model.pt"),
    ("ssp-sam-224", "merge", "ckpts/vpp-sam/merge/224px/pretrain/checkpoint0020.pth"),
])
def test_the_checkpoint_matching_rule(variant, dataset, expected):
    assert hub.select_checkpoint(REPO, variant, dataset) == expected


def test_the_rule_refuses_to_guess():
    with pytest.raises(hub.WeightsError, match=r"no file of .* matches variant ssp-sam-224 and dataset grefcoco.*"
                                               r"README\.md.*ckpts/grefcoco_336/model\.pt.*--file"):
        hub.select_checkpoint(REPO, "ssp-sam-224", "grefcoco")
    two = ["a/unc/224px/checkpoint_best_miou.pth", "b/unc/224px/checkpoint_best_miou.pth"]
    with pytest.raises(hub.WeightsError, match="2 files .* a/unc/224px.*b/unc/224px.*--file"):
        hub.select_checkpoint(two, "ssp-sam-224", "refcoco")
    both = ["x/unc/224px-to-336px/checkpoint_best_miou.pth"]                 # names both variants: neither
    with pytest.raises(hub.WeightsError):
        hub.select_checkpoint(both, "ssp-sam-224", "refcoco")


# ------------------------------------------------------------------------------------------------ downloads

def test_download_verifies_writes_the_manifest_and_the_environment(homes, tmp_path, capsys, tiny_files):
    out, env_file = tmp_path / "w", tmp_path / "deploy.env"
    env_file.write_text("POSTGRES_PASSWORD=secret\nSSP_SAM_VARIANT=demo\n")
    env_file.chmod(0o600)
    assert download(out, "--env-file", str(env_file)) == 0
    printed = capsys.readouterr().out.split()
    assert printed == ["SSP_SAM_VARIANT=tiny", f"SSP_SAM_WEIGHTS_DIR={out}"]
    assert env_file.read_text() == f"POSTGRES_PASSWORD=secret\nSSP_SAM_VARIANT=tiny\nSSP_SAM_WEIGHTS_DIR={out}\n"
    assert env_file.stat().st_mode & 0o777 == 0o600                       # it may hold secrets: mode kept

    manifest = json.loads((out / "weights.json").read_text())
    assert (manifest["variant"], manifest["dataset"]) == ("tiny", "refcoco")
    names = {"checkpoint": "checkpoint_best_miou.pth", "sam": homes.sam.name, "clip": "CS-tiny.pt"}
    for role, name in names.items():
        rec = manifest["files"][role]
        assert rec["name"] == name and (out / name).read_bytes() == tiny_files[role]
        assert rec["sha256"] == hashlib.sha256(tiny_files[role]).hexdigest() and rec["size"] == len(tiny_files[role])
    ck = manifest["files"]["checkpoint"]
    assert ck["path"] == homes.CHECKPOINT and ck["commit"] == homes.server.COMMIT and "LFS" in ck["verified"]
    assert ck["source"] == f"{homes.server.origin}/{hub.HF_REPO}/blob/{homes.server.COMMIT}/{homes.CHECKPOINT}"
    assert "MD5" in manifest["files"]["sam"]["verified"]
    assert [homes.downloads(r) for r in names] == [[0], [0], [0]]
    assert not list(out.glob("*.part")) and not (out / hub.PROGRESS_FILE).exists()

    # again: everything is present and verified, so nothing is asked of any server
    hits = len(homes.server.hits)
    assert download(out) == 0
    assert len(homes.server.hits) == hits
    assert "nothing to download" in capsys.readouterr().err


def test_a_weights_folder_stands_in_for_the_three_paths(homes, tmp_path, tiny_files):
    out = tmp_path / "w"
    assert download(out) == 0
    m = hub.read_manifest(out)
    assert m.paths() == {"checkpoint": str(out / "checkpoint_best_miou.pth"),
                         "sam_checkpoint": str(out / homes.sam.name), "clip_checkpoint": str(out / "CS-tiny.pt")}
    cfg = hub.apply_weights_dir(ModelConfig(weights_dir=str(out), sam_checkpoint="/elsewhere/sam.pth"))
    assert cfg.variant == "tiny"                                         # the folder's, not the default demo
    assert (cfg.checkpoint, cfg.clip_checkpoint) == (m.path("checkpoint"), m.path("clip"))
    assert cfg.sam_checkpoint == "/elsewhere/sam.pth"                     # an explicit path wins
    with pytest.raises(hub.WeightsError, match="holds tiny weights, but variant ssp-sam-224 was asked for"):
        hub.apply_weights_dir(ModelConfig(variant="ssp-sam-224", weights_dir=str(out)))

    loaded = load_model(ModelConfig(weights_dir=str(out), device="cpu"))
    src = build_model("tiny", seed=0)                                     # what the three files were made from
    got, want = loaded.model.state_dict(), src.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.endswith("position_ids"))
    assert not loaded.report.missing and not loaded.report.mismatched
    assert loaded.version == weights_version("tiny", m.path("checkpoint")) == \
        "tiny-" + hashlib.sha256(tiny_files["checkpoint"]).hexdigest()[:8]

    (out / homes.sam.name).write_bytes(b"cut")                           # a file that changed is not used
    with pytest.raises(hub.WeightsError, match=rf"lacks {homes.sam.name} .*ssp-sam download-weights"):
        hub.apply_weights_dir(ModelConfig(weights_dir=str(out)))
    with pytest.raises(hub.WeightsError, match="has no weights.json"):
        hub.read_manifest(tmp_path)


def test_a_broken_off_download_resumes(homes, tmp_path):
    out = tmp_path / "w"
    homes.server.truncate[homes.keys["sam"]] = 100                        # the connection drops after 100 bytes
    out.mkdir()
    (out / "CS-tiny.pt.part").write_bytes(homes.files["clip"][:64])       # an earlier run stopped after 64 bytes
    assert download(out) == 0
    assert homes.downloads("sam") == [0, 100]                             # asked again from byte 100 (Range)
    assert homes.downloads("clip") == [64]
    assert (out / homes.sam.name).read_bytes() == homes.files["sam"]
    assert (out / "CS-tiny.pt").read_bytes() == homes.files["clip"]


def test_a_wrong_hash_deletes_the_partial_file(homes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "w"
    homes.server.files[homes.keys["clip"]] = b"a mirror's other file"
    assert download(out) == 1
    line = one_line_error(capsys)
    assert "SHA-256" in line and "deleted" in line and "CLIP_WEIGHTS_URL" in line
    assert not (out / "CS-tiny.pt").exists() and not (out / "CS-tiny.pt.part").exists()
    assert not (out / "weights.json").exists()


@pytest.mark.parametrize("home", ["HF_ENDPOINT", "SAM_WEIGHTS_URL", "CLIP_WEIGHTS_URL"])
def test_no_network_is_one_line_and_a_failure(homes, tmp_path, capsys, monkeypatch, home):
    port = closed_port()
    monkeypatch.setenv(home, f"http://127.0.0.1:{port}")
    assert download(tmp_path / "w") != 0
    line = one_line_error(capsys)
    assert f"cannot reach 127.0.0.1:{port} (connection refused)" in line and home in line, line


def test_offline_uses_the_cache_and_says_so_without_it(homes, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download(tmp_path / "a") == 1
    assert "offline (HF_HUB_OFFLINE is set)" in one_line_error(capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert download(tmp_path / "b") == 0                                  # online once: the cache has it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hits = [h for h, _ in homes.server.hits]
    assert download(tmp_path / "c") == 0                                  # offline, from the cache
    new = [h for h, _ in homes.server.hits][len(hits):]
    assert not [h for h in new if "/api/" in h or "/resolve/" in h], new  # nothing asked of the hub
    assert (tmp_path / "c" / "checkpoint_best_miou.pth").read_bytes() == homes.files["checkpoint"]


def test_nothing_matches_lists_the_files_and_file_overrides(homes, tmp_path, capsys):
    assert run_cli(["download-weights", "--variant", "tiny", "--dataset", "grefcoco", "--out",
                    str(tmp_path / "g")]) == 1
    line = one_line_error(capsys)
    assert "matches variant tiny and dataset grefcoco" in line
    assert all(f in line for f in ("README.md", homes.CHECKPOINT, homes.OTHER_DATASET)), line

    assert download(tmp_path / "w", "--file", homes.OTHER_DATASET) == 0
    rec = hub.read_manifest(tmp_path / "w").files["checkpoint"]
    assert rec["path"] == homes.OTHER_DATASET
    assert (tmp_path / "w" / rec["name"]).read_bytes() == homes.server.repos[hub.HF_REPO][homes.OTHER_DATASET][0]
    assert download(tmp_path / "x", "--file", "nope.pth") == 1
    assert "has no file 'nope.pth'" in one_line_error(capsys)


def test_a_folder_keeps_to_its_weights(homes, tmp_path, capsys):
    out = tmp_path / "w"
    assert download(out) == 0
    assert run_cli(["download-weights", "--variant", "tiny", "--dataset", "refcoco+", "--out", str(out)]) == 1
    assert "already holds tiny weights for refcoco" in one_line_error(capsys)
    assert run_cli(["download-weights", "--variant", "demo", "--out", str(out)]) == 1
    assert "no official weights for variant 'demo'" in one_line_error(capsys)
    assert download(out, "--file", homes.OTHER_DATASET) == 0               # the same weights, another checkpoint
    other = homes.server.repos[hub.HF_REPO][homes.OTHER_DATASET][0]
    assert (out / "checkpoint_best_miou.pth").read_bytes() == other
    assert hub.read_manifest(out).files["checkpoint"]["sha256"] == hashlib.sha256(other).hexdigest()
    assert homes.downloads("sam") == homes.downloads("clip") == [0]       # SAM and CLIP were kept
