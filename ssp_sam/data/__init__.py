"""Datasets: the official layout, a team's own JSON-lines format, and the synthetic referring benchmark.

Every dataset yields :class:`ssp_sam.data.Sample` (image uint8 HxWx3, sentence, mask uint8 HxW {0,1},
box_xyxy or None, meta).

- ``ssp_sam.data.synthetic``: seeded generator of referring scenes (``generate_sample``, ``SyntheticDataset``,
  ``SYNTHETIC_VOCABULARY``) with a ``base`` and a ``novel`` domain; CLI ``ssp-sam synth``.
- ``ssp_sam.data.datasets``: the official SimREC-style layout (``OfficialRefDataset``) and the JSON-lines format
  for a team's own data (``JsonlDataset``, ``write_jsonl``).
"""

from ssp_sam.data.sample import Sample, mask_to_box

__all__ = ["Sample", "mask_to_box"]
