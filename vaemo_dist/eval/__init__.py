"""Downstream evaluation: labelled sources, split files, embeddings, linear probes, metrics."""
