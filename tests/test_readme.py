"""The README says what the code does: its labeling configs parse into what it describes, its ``ssp-sam`` commands
parse, its settings are the documented ones, its links and picture exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from backend.labelstudio.label_config import parse_label_config
from tests.test_deploy import documented_names, parse_ssp_sam

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_labeling_configs_parse_into_the_four_modes():
    configs = _blocks(_section("Labeling configs"), "xml")
    assert len(configs) == 4
    per_task, class_level, interactive, corrections = (parse_label_config(c) for c in configs)
    # a sentence per task: no TextArea, one label
    assert per_task.prompt_name is None and per_task.labels == ("object",)
    # class-level: predicted_values give one sentence each, a hint gives its sentence
    assert dict(class_level.label_sentences) == {"car": ("the car", "the truck"),
                                                 "person": ("the person closest to the camera",)}
    # interactive: the TextArea is the prompt
    assert interactive.prompt_name == "prompt" and interactive.brush_name == "tag"
    assert interactive.prompt_controls == ()
    # interactive correction: the same, plus smart clicks and boxes on the image whose labels are the mask's
    assert (corrections.prompt_name, corrections.brush_name, corrections.mask_type) == ("prompt", "tag", "brushlabels")
    assert [(name, kind) for name, kind, _ in corrections.prompt_controls] == [("click", "click"), ("box", "box")]
    assert all(set(labels) <= set(corrections.labels) for _, _, labels in corrections.prompt_controls)
    # and each of them with <BitmaskLabels>
    for c in configs:
        assert parse_label_config(c.replace("BrushLabels", "BitmaskLabels")).mask_type == "bitmasklabels"
    assert all(' smart="true"' in c for c in re.findall(r"<(?:KeyPointLabels|RectangleLabels)[^>]*>", configs[3]))


def _ssp_sam_commands() -> list[list[str]]:
    commands = []
    for block in _blocks(README, "bash"):
        for line in block.splitlines():
            words = shlex.split(line.split(" #")[0]) if line.strip() else []
            for i, word in enumerate(words):
                if word.endswith("ssp-sam") and word != "scripts/ssp-sam":
                    commands.append(words[i + 1:])
                    break
    return commands


def test_ssp_sam_commands_parse():
    commands = _ssp_sam_commands()
    assert any(c and c[0] == "download-weights" for c in commands)
    bad = []
    for argv in commands:
        ns, error = parse_ssp_sam(argv)
        if ns is None:
            bad.append(f"ssp-sam {' '.join(argv)}: {error}")
    assert not bad, bad


def test_configuration_table_names_documented_settings():
    table = _section("Configuration")
    first_cells = re.findall(r"^\|([^|]*)\|", table, flags=re.M)
    names = {n for cell in first_cells for n in re.findall(r"`([A-Z][A-Z0-9_]{2,})`", cell)}
    assert {"LABEL_STUDIO_URL", "SSP_SAM_WEIGHTS_DIR", "AUTO_DOWNLOAD", "DATASTORE_URL"} <= names
    assert names <= documented_names(), sorted(names - documented_names())


def test_local_links_and_picture_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert "docs/img/prelabel.png" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
