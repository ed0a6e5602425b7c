"""Webhook payloads shaped exactly as Label Studio 1.23.2 posts them (tests and benchmarks build events with these)."""

from __future__ import annotations

import numpy as np

from ssp_sam.data.masks import mask_to_brush_rle


TEST_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image" editable="true" rows="1" placeholder="describe the object"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
</View>"""


def brush_result(mask: np.ndarray, region_id: str, origin: str = "manual", label: str = "object",
                 from_name: str = "tag", to_name: str = "image") -> dict:
    """A ``brushlabels`` result item as the Label Studio frontend saves it (RLE of the 0/255 RGBA mask)."""
    h, w = np.asarray(mask).shape
    return {"id": region_id, "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": int(w), "original_height": int(h), "image_rotation": 0, "origin": origin,
            "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]}}


def bitmask_data_url(mask: np.ndarray) -> str:
    """A ``bitmasklabels`` region's ``imageDataURL`` as LS 1.23.2's editor writes it (``BitmaskRegion``
    ``getImageSnapshotCanvas``): an RGBA PNG, black where the mask is, transparent elsewhere."""
    import base64
    import io

    from PIL import Image

    rgba = np.zeros((*np.asarray(mask).shape, 4), np.uint8)
    rgba[..., 3] = np.asarray(mask, bool) * 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def textarea_result(text: str, region_id: str, from_name: str = "prompt", to_name: str = "image",
                    parent_id: str | None = None) -> dict:
    r = {"id": region_id, "from_name": from_name, "to_name": to_name, "type": "textarea", "origin": "manual",
         "value": {"text": [text]}}
    if parent_id:
        r["parentID"] = parent_id
    return r


def annotation_event(action: str, annotation_id: int, task_id: int, project_id: int, image: str, sentence: str,
                     mask: np.ndarray | None = None, *, origin: str = "manual", region_id: str = "r1",
                     completed_by: int = 1, was_cancelled: bool = False, ground_truth: bool = False,
                     lead_time: float = 12.5, model_version: str | None = None, parent_prediction: int | None = None,
                     updated_at: str = "2026-01-01T00:00:00.000000Z", task_text: str | None = None,
                     extra_results: list | None = None, label_config: str = TEST_LABEL_CONFIG) -> dict:
    """``{"action", "annotation", "project", "task"}`` exactly as Label Studio's webhook posts it."""
    result = []
    if mask is not None:
        result.append(brush_result(mask, region_id, origin))
    if sentence is not None:
        result.append(textarea_result(sentence, f"t-{region_id}"))
    result += list(extra_results or [])
    ann = {"id": annotation_id, "result": result, "completed_by": completed_by, "was_cancelled": was_cancelled,
           "ground_truth": ground_truth, "lead_time": lead_time, "task": task_id, "project": project_id,
           "created_at": updated_at, "updated_at": updated_at, "draft_created_at": None,
           "result_count": len(result), "unique_id": f"u-{annotation_id}", "import_id": None,
           "last_action": None, "bulk_created": False, "updated_by": completed_by,
           "parent_prediction": parent_prediction, "parent_annotation": None, "last_created_by": None,
           "prediction": {"id": parent_prediction, "model_version": model_version} if model_version else {}}
    data = {"image": image}
    if task_text is not None:
        data["text"] = task_text
    return {"action": action, "annotation": ann,
            "project": {"id": project_id, "title": "p", "label_config": label_config},
            "task": {"id": task_id, "data": data, "meta": {}, "project": project_id, "is_labeled": True,
                     "overlap": 1, "total_annotations": 1, "total_predictions": 1 if model_version else 0}}
