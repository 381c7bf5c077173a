"""radio_scale.data: webdataset shards → one shared random crop → student view + teacher views."""
from radio_scale.data.bundled import bundled_manifest, bundled_shards, default_root, ensure_bundled_data
from radio_scale.data.loader import DataStats, DistillLoader, build_loader
from radio_scale.data.shards import DataError, resolve_shards
from radio_scale.data.views import STUDENT_MEAN, STUDENT_STD, Batch, ViewSpec, student_view

__all__ = [
    "Batch",
    "DataError",
    "DataStats",
    "DistillLoader",
    "STUDENT_MEAN",
    "STUDENT_STD",
    "ViewSpec",
    "build_loader",
    "bundled_manifest",
    "bundled_shards",
    "default_root",
    "ensure_bundled_data",
    "resolve_shards",
    "student_view",
]
