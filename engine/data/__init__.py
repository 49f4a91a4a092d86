"""Datasets: reading files, folders and hub ids lazily, detecting and normalising formats,
previewing the loss mask as TRL computes it, and token statistics.
"""

from engine.data.formats import FORMAT_CHOICES, FORMATS
from engine.data.load import (
    DEMO_SOURCE,
    DatasetStream,
    LoadedDataset,
    load_dataset_rows,
    open_dataset,
    parse_column_map,
    split_rows,
)

__all__ = [
    "DEMO_SOURCE", "FORMAT_CHOICES", "FORMATS", "DatasetStream", "LoadedDataset", "load_dataset_rows", "open_dataset",
    "parse_column_map", "split_rows",
]
