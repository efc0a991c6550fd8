"""Importers: public datasets turned into the day-partitioned Parquet logs the pipeline reads.

    hyrank import movielens-100k --out data/ml100k       # pipeline/data/importers/movielens.py

Each importer reads a dataset as its publisher ships it (never downloaded or committed here: the data keeps its
own licence), derives the label, the id/attribute columns, the context and the behaviour sequences in vectorised
numpy, and writes `<out>/<partition_key>=YYYY-MM-DD/part-00000.parquet` plus `_SUCCESS`, one complete day at a
time, like `hyrank gen-logs` (pipeline/data/synth.py).
"""
