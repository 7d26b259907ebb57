"""The transformers side: ``from_pretrained`` of ARMOR checkpoints (``quantizer``), checkpoint names
through transformers' key conversion (``keys``), and the dense reconstruction as a model (``dense``)."""
