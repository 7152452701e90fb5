"""Evaluation metrics.

- `safe.eval.vqa`: the VQA v2 accuracy (official answer normalisation, leave-one-annotator-out).
- `safe.eval.captions`: captioning metrics through pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr-D,
  SPICE/SPIDEr when SPICE's jars are present).

Import the submodules directly; this package imports nothing so `import safe.eval` stays cheap.
"""
