"""Converters from real datasets to the shard format of :mod:`aol_dist.data.shards`.

- :mod:`.mimic`   MIMIC-CXR-JPG (SPEC 5.1): four NLP label sets, official split, reports, tokens.
- :mod:`.openi`   OpenI / Indiana University XML reports + PNG images: evaluation shards with ``truth``.
- :mod:`.generic` any image folder or ``.npz`` plus label columns, simulated or human annotators.

Shared pieces: :mod:`.images` (decode + resize once), :mod:`.tokenize` (local Hugging Face tokenizer),
:mod:`.annotators` (confusion-matrix annotators, paper 000 A.2.1), :mod:`.common` (CSV reading with
errors that name file, row and column; the split writer; the conversion report).

Every converter is parallel over shards, resumable (finished shards are kept), atomic per shard, and
ends with ``OUT/conversion_report.json``: samples kept per split, dropped by reason, failed files.
"""
